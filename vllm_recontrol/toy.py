"""Tiny self-made models for tests and the offline demo (nothing is downloaded).

A tokenizer built with ``tokenizers`` (word-level, or byte-level BPE like Llama 3's and
Qwen2's) and a random-weight Llama or Qwen2 saved in the Hugging Face layout, so that vLLM and
transformers load them through their real code paths.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def default_words(count: int = 250) -> list[str]:
    """A deterministic vocabulary of pronounceable words (plus chat-template words)."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "s", "t", "l"]
    words = ["user:", "assistant:", "system:", "the", "a", "is", "and", "good", "bad"]
    for c, v, e in itertools.product(onsets, vowels, codas):
        if len(words) >= count:
            break
        words.append(c + v + e)
    return words


def _word_level(words: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab_words = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab_words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return core


def _byte_level_bpe(words: Sequence[str], vocab_size: int = 700):
    """Byte-level BPE trained on the word list: every byte is a token, so any text encodes,
    and grammar engines (structured outputs) see real token strings, spaces included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([" ".join(words)] * 3 + list(words), trainer)  # deterministic
    return core


def build_tokenizer(directory: str | Path, words: Sequence[str] | None = None,
                    kind: str = "word"):
    """Save a tokenizer with BOS/EOS and a chat template: ``word`` (one token per
    whitespace-separated word of ``words``) or ``byte-bpe`` (byte-level BPE trained on them)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    builders = {"word": _word_level, "byte-bpe": _byte_level_bpe}
    if kind not in builders:
        raise ValueError(f"tokenizer kind must be one of {list(builders)}, got {kind!r}")
    core = builders[kind](list(words or default_words()))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_tiny_model(
    directory: str | Path,
    architecture: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float = 0.1,
    words: Sequence[str] | None = None,
    tokenizer_kind: str = "word",
) -> Path:
    """Write a random-weight Llama or Qwen2 (float32, head_dim 32 by default) plus tokenizer
    (``tokenizer_kind``: see ``build_tokenizer``).

    vLLM's CPU attention rejects head_dim 16, hence hidden 64 with 2 heads.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(directory)
    tokenizer = build_tokenizer(path, words, tokenizer_kind)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=512,
        initializer_range=initializer_range, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if architecture not in configs:
        raise ValueError(f"architecture must be one of {sorted(configs)}, got {architecture!r}")
    config = configs[architecture](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
