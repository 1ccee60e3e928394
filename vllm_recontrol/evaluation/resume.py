"""The finished methods of an ``eval`` run, kept on disk so that a rerun skips them.

Why: at scale each method is hours of generation and scoring, and a failure after it (the
reward model out of memory on the next method, a dead Ray actor, Ctrl-C) used to lose every
method before it. Each method is kept at two stages under ``out/methods/``:

- its samples (every sample, Best-of-N's too), under a digest of what decides them: the
  options that change generation (engine arguments that only say how to run the engine
  left out, as ``--replicas`` is), the prompts, the value head's weights for a controlled
  method, the method's own settings, the versions of vllm-recontrol, vLLM, torch and
  transformers, the environment variables that pick the ascent's backend and precision, and
  the LLM's local model folder (file names, sizes and times). Written as soon as generation
  ends, so a reward model that fails loses no generation, and a new reward (or ``--cut-at``,
  or embedding model) rescores the samples instead of generating them again;
- the finished method (responses, rewards, metrics), under that digest together with the
  reward as ``RewardSource`` describes it, the reward and embedding model options and the
  reward model's folder: a rerun with nothing changed starts no engine and no reward model.

Not covered: the code behind a ``--reward-fn`` name, and what a hub id without a revision
resolves to: after changing those, run with ``--no-resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..files import write_text_atomic
from ..head_source import locate_head
from ..logs import get_logger
from ..package_versions import package_versions
from ..training.collector import outputs_defining
from ..training.common import folder_fingerprint, json_digest, sha256_file
from .engines import Samples

logger = get_logger(__name__)

METHODS_DIR = "methods"
SAMPLES_DIR = "samples"  # inside METHODS_DIR
FORMAT = "vllm-recontrol-eval-method"
SAMPLES_FORMAT = "vllm-recontrol-eval-samples"
# Options that say how or where to run, or which methods run, not what a method computes.
NOT_IN_DIGEST = frozenset({
    "out", "quiet", "progress", "in_process", "overlap_scoring", "ray", "replicas",
    "ray_address", "ray_num_cpus", "ray_num_gpus", "reward_replicas", "reward_num_cpus",
    "reward_num_gpus", "grid", "best_of", "control_best_of", "value_head", "value_heads",
    "resume", "reward_fn", "reward_model", "reward_index", "rm_dtype", "rm_max_length",
    "reward_batch_size", "reference_column",
    # where the prompts come from: only their texts decide the samples (prompt i is
    # sampled with seed + n i), and prompts_sha256 holds those, so a copied file, a relative
    # path or --max-prompts past the file's length reuse the methods
    "prompts", "split", "data_dir", "prompt_column", "prompt_format", "max_prompts",
    # how the grid point is chosen: the prompts (and their numbers) and the point decide
    "tune_prompts", "tune_split", "max_tune_prompts", "tune_holdout", "tune_seed",
    "tune_min_diversity"})
# Options that change how samples are scored or measured, not the samples themselves.
SCORING_OPTIONS = frozenset({"cut_at", "embedding_model", "device", "rm_engine",
                             "rm_engine_args", "trust_remote_code"})
# Environment variables that change what a method computes (the ascent's backend, vLLM's
# fp32 matmul precision).
DIGEST_ENVIRONMENT = ("VLLM_RECONTROL_BACKEND", "VLLM_FLOAT32_MATMUL_PRECISION")


def run_facts(options: dict[str, Any], prompts: Sequence[str],
              reward: dict[str, Any], numbers: Sequence[int] | None = None) -> dict[str, Any]:
    """What every method's result depends on, in two parts. ``generation``: the options that
    change the samples, the prompts, the package versions, the backend variables and the
    LLM's local model folder. ``scoring``: the reward as ``RewardSource`` describes it (a
    model with its dtype and output, or a function by name: its code is not read), the
    reward and embedding model options and the reward model's local folder. The judge's
    options are in neither: it runs after. ``numbers``: the prompts' indices in their
    source, which pick their seeds, when they are not 0, 1, ... (prompts held out for
    tuning)."""
    kept = {k: v for k, v in options.items()
            if k not in NOT_IN_DIGEST and not k.startswith("judge_")}
    prompts_sha = json_digest(list(prompts))
    model = options.get("model")
    # engine arguments that only say how to run the engine (memory, batch limits,
    # parallelism), as collect's resume takes them and as --replicas is, are left out
    kept = {k: outputs_defining(v) if k in ("engine_args", "rm_engine_args") else v
            for k, v in kept.items()}
    generation = {k: v for k, v in kept.items() if k not in SCORING_OPTIONS}
    scoring = {k: v for k, v in kept.items() if k in SCORING_OPTIONS}
    return {
        "generation": {
            "options": generation,
            "prompts_sha256": prompts_sha,
            **({"prompt_numbers": list(numbers)}
               if numbers is not None and list(numbers) != list(range(len(prompts))) else {}),
            "model_files": folder_fingerprint(str(model)) if model else None,
            "versions": package_versions(),
            "environment": {name: os.environ.get(name) for name in DIGEST_ENVIRONMENT}},
        "scoring": {
            "options": scoring,
            "reward": reward}}  # a reward model's description names its folder's files


def head_digest(source: str) -> str | None:
    """The weights a head folder (or hub id) holds, as a digest of its weights file (None:
    the head cannot be found here; the engine then says why)."""
    try:
        return sha256_file(locate_head(source) / "model.safetensors")
    except (OSError, ValueError):
        return None


class FinishedMethods:
    """Reads and writes finished methods and methods' samples under ``folder``. ``enabled``
    False (--no-resume) reads none but still writes, so the store holds this run's methods,
    not older ones."""

    def __init__(self, folder: Path, facts: dict[str, Any], heads: dict[str, str],
                 enabled: bool = True) -> None:
        self.folder, self.facts, self.heads, self.enabled = folder, facts, heads, enabled
        self._head_digests: dict[str, str | None] = {}

    def digest(self, key: str, head: str, controlled: bool) -> str | None:
        """The digest of a finished method: its samples' digest and the scoring facts (None:
        it cannot be named, so it is not kept)."""
        samples = self.samples_digest(key, head, controlled)
        if samples is None:
            return None
        return json_digest({"samples": samples, "scoring": self.facts["scoring"]})

    def samples_digest(self, key: str, head: str, controlled: bool) -> str | None:
        """The digest of a method's samples (None: they cannot be named, so they are not
        kept). Uncontrolled methods do not depend on a head: the engine leaves their rows
        alone."""
        facts = {"run": self.facts["generation"], "method": key}
        if controlled:
            if head not in self._head_digests:
                source = self.heads.get(head)
                self._head_digests[head] = head_digest(source) if source else None
            if self._head_digests[head] is None:
                return None
            facts["head_weights_sha256"] = self._head_digests[head]
        return json_digest(facts)

    def load(self, digest: str | None) -> dict[str, Any] | None:
        """A finished method's fields, or None when it is not on disk (or unreadable)."""
        saved = self._read(self.folder / f"{digest[:32]}.json", FORMAT, digest) \
            if digest else None
        return saved if saved is None or isinstance(saved, dict) else None

    def save(self, digest: str | None, result: Any) -> None:
        """Write a finished method (its responses, rewards and metrics; not the judge's)."""
        if digest is None:
            return
        fields = {k: v for k, v in dataclasses.asdict(result).items()
                  if k not in ("judge", "reused")}
        self._write(self.folder / f"{digest[:32]}.json", FORMAT, digest, fields)

    def load_samples(self, digest: str | None, prompts: int
                     ) -> tuple[Samples, float, bool] | None:
        """A method's samples, generation seconds and whether it generated while another
        method was scored, or None when they are not on disk, are unreadable or do not fit
        (``prompts`` lists of [text, tokens] pairs)."""
        saved = self._read(self.folder / SAMPLES_DIR / f"{digest[:32]}.json", SAMPLES_FORMAT,
                           digest) if digest else None
        if not isinstance(saved, dict):
            return None
        samples, seconds = saved.get("samples"), saved.get("seconds")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or \
                not isinstance(samples, list) or len(samples) != prompts:
            return None
        restored: Samples = []
        for candidates in samples:
            if not isinstance(candidates, list) or not candidates:
                return None
            pairs = []
            for pair in candidates:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                        and isinstance(pair[1], int) and not isinstance(pair[1], bool)):
                    return None
                pairs.append((pair[0], pair[1]))
            restored.append(pairs)
        return restored, float(seconds), saved.get("overlapped") is True

    def save_samples(self, digest: str | None, samples: Samples, seconds: float,
                     overlapped: bool = False) -> None:
        """Write a method's samples as soon as it has generated them."""
        if digest is not None:
            self._write(self.folder / SAMPLES_DIR / f"{digest[:32]}.json", SAMPLES_FORMAT,
                        digest, {"samples": samples, "seconds": seconds,
                                 "overlapped": overlapped})

    def _read(self, path: Path, form: str, digest: str) -> Any:
        if not self.enabled:
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # damaged: run the method again
            logger.warning("eval: %s cannot be read (%s); running that method again", path, exc)
            return None
        if not isinstance(saved, dict) or saved.get("format") != form or \
                saved.get("digest") != digest:
            return None
        return saved.get("result")

    @staticmethod
    def _write(path: Path, form: str, digest: str, fields: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"format": form, "digest": digest,
                                            "result": fields}))


def log_reused(count: int, rescored: int, folder: Path) -> None:
    if count:
        logger.warning("eval: %d finished method(s) read back from %s (same options, prompts, "
                       "reward and heads); --no-resume runs them again", count, folder)
    if rescored:
        logger.warning("eval: %d method(s) scored again from samples kept in %s (the same "
                       "generation, a changed reward or scoring option); --no-resume "
                       "generates them again", rescored, folder)
