"""A toy world where RE-Control has something to steer: a tiny LM that learned a latent mood.

Why: a random-weight model's hidden state holds no plan for the rest of its response, so a
value head trained on it cannot steer anything (measured: greedy reward unchanged). A tiny
Llama trained for a few seconds on synthetic two-sentence documents, whose adjectives share
one mood per sentence, does hold such a plan: once it has picked the mood of a sentence, every
later adjective follows. The reward ``positive_share`` (share of positive adjectives in the
response) is then predictable from the states, and pushing the state towards a high value
flips the mood of the generated sentence.

Documents are ``<first sentence> <second sentence>``; the second sentence keeps the first one's
mood with probability ``mood_carry`` (0.75), so the prompt (the first sentence) already tells
something about the reward, and a value head's V(s_0) can beat a constant predictor.
Everything is built locally and deterministically from a seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

POSITIVE = ["good", "happy", "bright", "kind", "warm", "calm", "sweet", "brave", "gentle",
            "lovely"]
NEGATIVE = ["bad", "sad", "dark", "cruel", "cold", "angry", "bitter", "weak", "grim", "nasty"]
NOUNS = ["cat", "dog", "house", "tree", "river", "man", "girl", "city", "bird", "garden",
         "boy", "hill"]
VERBS = ["sees", "likes", "finds", "has", "meets", "loves", "hears", "follows"]
DETERMINERS = ["the", "a"]
# The chat template of vllm_recontrol.toy writes these role words; keep them in the vocabulary.
ROLE_WORDS = ["user:", "assistant:", "system:"]
WORDS = ROLE_WORDS + DETERMINERS + POSITIVE + NEGATIVE + NOUNS + VERBS + ["."]

_POSITIVE_SET, _NEGATIVE_SET = frozenset(POSITIVE), frozenset(NEGATIVE)


# ----------------------------------------------------------------------------- text
def sentence(rng: random.Random, positive: bool) -> str:
    """``DET ADJ+ NOUN VERB DET ADJ+ NOUN .`` with every adjective of one mood."""
    moods = POSITIVE if positive else NEGATIVE

    def phrase() -> list[str]:
        adjectives = [rng.choice(moods) for _ in range(rng.randint(1, 2))]
        return [rng.choice(DETERMINERS), *adjectives, rng.choice(NOUNS)]

    return " ".join([*phrase(), rng.choice(VERBS), *phrase(), "."])


def document(rng: random.Random, mood_carry: float = 0.75) -> tuple[str, str]:
    """(first sentence, second sentence); the second keeps the first's mood w.p. mood_carry."""
    first_positive = rng.random() < 0.5
    second_positive = first_positive if rng.random() < mood_carry else not first_positive
    return sentence(rng, first_positive), sentence(rng, second_positive)


def prompts(count: int, seed: int, mood_carry: float = 0.75) -> list[str]:
    """First sentences of ``count`` fresh documents: the prompts of collection and evaluation."""
    rng = random.Random(seed)
    return [document(rng, mood_carry)[0] for _ in range(count)]


def write_prompts_jsonl(path: str | Path, texts: Iterable[str]) -> Path:
    """A ``{"prompt": ...}`` JSONL file, the local prompt format of ``vllm-recontrol collect``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"prompt": text}) + "\n")
    return path


# ----------------------------------------------------------------------------- reward
def positive_share(prompt: str, response: str) -> float:
    """Share of positive adjectives among the response's adjectives (0.0 when it has none).

    A response without adjectives (for example one collapsed into special tokens by too
    strong a control) scores 0, so degenerate output is never rewarded.
    """
    words = response.split()
    positive = sum(w in _POSITIVE_SET for w in words)
    negative = sum(w in _NEGATIVE_SET for w in words)
    return positive / (positive + negative) if positive + negative else 0.0


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ToyLMConfig:
    """How the toy LM is built and trained (defaults: about 5-10 s on a 2-core CPU)."""

    seed: int = 0
    documents: int = 4000
    mood_carry: float = 0.75
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2  # head_dim 32: vLLM's CPU attention rejects 16
    intermediate_size: int = 128
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3


def build_toy_lm(directory: str | Path, config: ToyLMConfig | None = None,
                 overwrite: bool = False) -> Path:
    """Train the toy LM and save it (model + word tokenizer) in the Hugging Face layout.

    An existing complete model in ``directory`` is reused unless ``overwrite``. Returns the
    folder, loadable by vLLM and transformers.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .toy import build_tokenizer

    config = config or ToyLMConfig()
    path = Path(directory)
    info_path = path / "toy_world.json"
    if not overwrite and info_path.is_file() and (path / "model.safetensors").is_file():
        if json.loads(info_path.read_text(encoding="utf-8")).get("config") == asdict(config):
            return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, WORDS)
    rng = random.Random(config.seed)
    texts = [" ".join(document(rng, config.mood_carry)) for _ in range(config.documents)]
    input_ids, labels = _training_tensors(tokenizer, texts)

    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    model.train()
    loss = float("nan")
    # One thread: for a model this small, extra threads only add contention (measured 3x
    # slower with 2 threads on a busy 2-core machine), and one thread is reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(config.steps):
            batch = torch.randint(0, len(texts), (config.batch_size,), generator=generator)
            step_loss = model(input_ids=input_ids[batch], labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            loss = step_loss.item()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    info = {"config": asdict(config), "final_loss": loss,
            "train_seconds": round(time.perf_counter() - started, 2),
            "note": "vllm_recontrol.toy_world: tiny Llama trained on two-sentence mood documents"}
    info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def _training_tensors(tokenizer, texts: Sequence[str]):
    """Token ids padded with EOS; labels mask everything after the first EOS.

    Padding with a real token (or leaving pad labels in the loss) teaches the model to emit
    that token forever; EOS padding with masked labels teaches it to stop once.
    """
    import torch

    eos = tokenizer.eos_token_id
    rows = [tokenizer(text)["input_ids"] + [eos] for text in texts]  # BOS ... EOS
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), eos, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row)
    return input_ids, labels


# ----------------------------------------------------------------------------- evaluation
def controlled_rewards(
    model: str | Path,
    value_head: str | Path,
    prompts: Sequence[str],
    settings: Sequence[tuple[float, int]] = ((0.0, 0), (0.5, 10), (1.0, 20)),
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    engine_args: dict | None = None,
    in_process: bool = False,
) -> list[dict]:
    """Mean ``positive_share`` of the same prompts under each (alpha, steps), in one engine.

    One RE-Control engine serves every setting (control is per request; ``steps == 0`` means
    uncontrolled). Returns one dict per setting: alpha, steps, mean_reward, texts.
    """
    import os

    from vllm import LLM, SamplingParams

    args = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "seed": seed,
            "kv_cache_memory_bytes": 64 << 20, **(engine_args or {})}
    if in_process:  # engine core in this process: fast start for a tiny model on a CPU
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        args.setdefault("distributed_executor_backend", "uni")
    llm = LLM(model=str(model), model_impl="recontrol",
              additional_config={"recontrol": {"value_head": str(value_head), "default_on": False,
                                               "max_steps": max(s for _, s in settings) or 1}},
              **args)
    results = []
    try:
        for alpha, steps in settings:
            extra = ({"recontrol_alpha": float(alpha), "recontrol_steps": int(steps)}
                     if steps else {"recontrol": 0})
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                     seed=seed + i, extra_args=extra)
                      for i in range(len(prompts))]
            outputs = llm.generate(list(prompts), params, use_tqdm=False)
            texts = [o.outputs[0].text for o in outputs]
            rewards = [positive_share(p, t) for p, t in zip(prompts, texts)]
            results.append({"alpha": float(alpha), "steps": int(steps),
                            "mean_reward": sum(rewards) / len(rewards), "texts": texts})
    finally:
        from ._vllm_adapter import shutdown_llm

        shutdown_llm(llm)
    return results


# ----------------------------------------------------------------------------- the world
def build_world(directory: str | Path, train_prompts: int = 600, eval_prompts: int = 64,
                config: ToyLMConfig | None = None) -> dict[str, Path]:
    """The toy LM plus prompt files: ``train.jsonl`` (seed 1) and held-out ``eval.jsonl`` (seed 2).

    These are the inputs of ``vllm-recontrol collect`` (then ``label --reward-fn
    vllm_recontrol.toy_world:positive_share`` and ``train``); the tests use the same recipe.
    """
    root = Path(directory)
    model = build_toy_lm(root / "toy-lm", config)
    carry = (config or ToyLMConfig()).mood_carry
    return {
        "model": model,
        "train_prompts": write_prompts_jsonl(root / "train.jsonl",
                                             prompts(train_prompts, seed=1, mood_carry=carry)),
        "eval_prompts": write_prompts_jsonl(root / "eval.jsonl",
                                            prompts(eval_prompts, seed=2, mood_carry=carry)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vllm_recontrol.toy_world",
                                     description="Build the toy world (model + prompt files).")
    parser.add_argument("--out", type=Path, default=Path("toy-world"))
    parser.add_argument("--train-prompts", type=int, default=600)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_world(args.out, args.train_prompts, args.eval_prompts,
                        ToyLMConfig(seed=args.seed))
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
