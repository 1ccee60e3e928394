"""Quality metrics beside the mean reward: win rate against base, the paper's diversity and
coherence (SimCSE embeddings as the paper's evaluation computes them).

Diversity guards against reward hacking (repetition collapse); coherence against answers that
drift away from the prompt. Coherence needs a sentence-embedding model; when none can be
loaded it is reported as unavailable with the reason, never replaced by a made-up number.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DIVERSITY_ORDERS = (2, 3, 4)


@functools.lru_cache(maxsize=1)
def word_tokenizer() -> tuple[Callable[[str], list[str]], str]:
    """(tokenize, description) of the words diversity counts.

    The paper's evaluation tokenizes with nltk's ``word_tokenize`` (punctuation and
    contractions split off), and with the +1 in rep_n's denominator the token count moves
    the score: on short answers by more than the paper's gap between methods. That needs
    nltk's punkt_tab data (``python -m nltk.downloader punkt_tab``); without it (offline, or
    never downloaded) the same Treebank word
    tokenizer runs on the sentences of punkt's own splitter without that data (its rules
    for quotes, brackets and Markdown around a period, but no abbreviation list: "Dr." ends
    a sentence there),
    and without nltk (the ``eval`` extra has it) words are split at whitespace. The report
    names which one ran."""
    try:
        from nltk.tokenize import NLTKWordTokenizer, word_tokenize
    except ImportError:
        return str.split, "whitespace (nltk is not installed: not the paper's tokenization)"
    try:
        word_tokenize("Data. Found.")
        return word_tokenize, "nltk word_tokenize (the paper's)"
    except LookupError:  # no punkt_tab data
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        words, split = NLTKWordTokenizer().tokenize, PunktSentenceTokenizer().tokenize
        return (lambda text: [w for sentence in split(text) for w in words(sentence)],
                "nltk's Treebank words on punkt's sentences without its English data (no "
                "punkt_tab data: not exactly the paper's)")


def diversity(text: str, orders: Sequence[int] = DIVERSITY_ORDERS) -> float:
    """prod_n (1 - rep_n), rep_n = 1 - unique n-grams / (total n-grams + 1), on word tokens
    (``word_tokenizer``)."""
    words = word_tokenizer()[0](text)
    score = 1.0
    for n in orders:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        score *= len(set(grams)) / (len(grams) + 1)
    return score


def win_rate(rewards: Sequence[float], base: Sequence[float]) -> float:
    """Share of prompts whose response out-scores base's on the same prompt (ties count
    half): the paper's win rate, judged by the evaluation's own reward instead of GPT-4. It
    tells a method that lifts most prompts a little from one that lifts a few a lot."""
    return mean(win_outcomes(rewards, base))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


BOOTSTRAP_RESAMPLES = 1000


def win_outcomes(rewards: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per prompt: 1 when the response out-scores base's, 0.5 on a tie, else 0 (their mean
    is ``win_rate``)."""
    if len(rewards) != len(base):
        raise ValueError(f"win rate needs one reward per prompt on both sides, got "
                         f"{len(rewards)} and {len(base)}")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, base)]


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt ``values``, the prompts
    resampled with replacement. The draws depend on the prompt count and ``seed`` alone, so
    two sides of a paired comparison (a method's rewards, its win outcomes against base)
    are resampled at the same prompts.

    Why: a table of means over a few hundred prompts invites reading differences that are
    noise; the interval says how much a mean moves when the prompts are drawn again. In
    numpy, in blocks of resamples: 20k prompts take well under a second (a Python loop took
    16 s per method and statistic).
    """
    import numpy as np

    count = len(values)
    if count < 2:  # one prompt resamples to itself: a zero-width "interval" says nothing
        return math.nan, math.nan
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // count)  # index blocks of ~32 MB
    means = np.concatenate([
        data[rng.integers(0, count, size=(min(block, resamples - start), count))].mean(axis=1)
        for start in range(0, resamples, block)])
    means.sort()
    tail = (1.0 - level) / 2
    return (float(means[int(tail * (resamples - 1))]),
            float(means[int((1.0 - tail) * (resamples - 1))]))


class SimCSEEncoder:
    """Embeds texts as the SimCSE tool does (``simcse.SimCSE``, which the paper's evaluation
    calls with princeton-nlp/sup-simcse-bert-base-uncased): [CLS] through BERT's pooler for a
    supervised model, the [CLS] state before it for an unsupervised one ("unsup" in its
    name), inputs cut at 128 tokens (or the model's positions). Why not sentence-transformers for such a model: it has
    no sentence-transformers config, and that library then mean-pools over up to 512 tokens,
    another embedding than the paper's."""

    MAX_LENGTH = 128

    def __init__(self, model_name: str, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        self.model = AutoModel.from_pretrained(model_name).to(device).eval()
        self.device = device
        self.before_pooler = "unsup" in model_name
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(self.MAX_LENGTH, positions or self.MAX_LENGTH)

    def encode(self, texts: list[str], convert_to_tensor: bool = True,
               normalize_embeddings: bool = True, batch_size: int = 64):
        """``SentenceTransformer.encode``'s signature, so ``Coherence`` takes either."""
        import torch

        parts = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], padding=True,
                                       truncation=True, max_length=self.max_length,
                                       return_tensors="pt").to(self.device)
                out = self.model(**batch, return_dict=True)
                pooled = getattr(out, "pooler_output", None)
                use_cls = self.before_pooler or pooled is None
                parts.append((out.last_hidden_state[:, 0] if use_cls else pooled).float())
        embeddings = torch.cat(parts) if parts else torch.empty(0, 0)
        return torch.nn.functional.normalize(embeddings, dim=-1) if normalize_embeddings \
            else embeddings


def is_sentence_transformers_model(model_name: str) -> bool:
    """Whether ``model_name`` (a folder or a hub id) carries a sentence-transformers config
    (``modules.json``): then that library embeds it with its own pooling."""
    folder = Path(model_name)
    if folder.is_dir():
        return (folder / "modules.json").is_file()
    if "/" not in model_name:  # a short name ("all-MiniLM-L6-v2"): sentence-transformers
        return True            # resolves it under its own organisation, as it always did
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model_name, "modules.json")
        return True
    except Exception:  # absent from the repository, or offline and not cached
        return False


@dataclass
class Coherence:
    """Cosine similarity of prompt and response embeddings (SimCSE in the paper)."""

    model_name: str | None
    model: object | None  # encode(texts, convert_to_tensor=, normalize_embeddings=) -> Tensor
    unavailable_reason: str | None
    # the prompts' embeddings, kept: every method of an evaluation answers the same prompts
    _prompts: tuple[tuple[str, ...], object] | None = field(default=None, repr=False,
                                                             compare=False)

    @classmethod
    def load(cls, model_name: str | None, device: str = "cpu") -> "Coherence":
        """A sentence-transformers model through that library; any other (a SimCSE model
        such as the paper's) through ``SimCSEEncoder``."""
        if not model_name:
            return cls(None, None, "no --embedding-model given")
        from ..training.rewards import warn_on_cpu_beside_a_gpu

        warn_on_cpu_beside_a_gpu(device, f"embedding model {model_name!r}")
        try:
            if is_sentence_transformers_model(model_name):
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    return cls(model_name, None, "sentence-transformers is not installed")
                model = SentenceTransformer(model_name, device=device)
            else:
                model = SimCSEEncoder(model_name, device)
        except Exception as exc:  # offline, missing files, ...: report, do not fake
            return cls(model_name, None, f"cannot load {model_name!r}: {type(exc).__name__}: "
                                         f"{_first_line(str(exc))}")
        return cls(model_name, model, None)

    @property
    def available(self) -> bool:
        return self.model is not None

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        if self.model is None:
            raise RuntimeError(f"coherence unavailable: {self.unavailable_reason}")
        if self._prompts is None or self._prompts[0] != tuple(prompts):
            self._prompts = (tuple(prompts), self.model.encode(
                list(prompts), convert_to_tensor=True, normalize_embeddings=True))
        a = self._prompts[1]
        b = self.model.encode(list(responses), convert_to_tensor=True, normalize_embeddings=True)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).float().cpu().tolist()


def _first_line(message: str, limit: int = 300) -> str:
    """An error's first line, cut at a word (not inside a URL) when long: for a table cell."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    if len(line) <= limit:
        return line
    return line[:line.rfind(" ", 0, limit)].rstrip() + " ..."
