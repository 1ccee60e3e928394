"""Offline demo: controlled vs. uncontrolled generation on a tiny self-made model.

Everything is built locally (a random-weight Llama, a word-level tokenizer, a random value
head), so it runs on a laptop CPU with nothing downloaded. Random weights show the mechanics
(per-request control inside one vLLM engine, and its cost), not an alignment gain.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .toy import build_tiny_model
from .value_head import ValueHead

PROMPTS = ["the good kan", "a bad ba bon", "user: the is good", "zo ze zi zu"]
REPEATS = 3


@dataclass
class DemoRun:
    label: str
    alpha: float
    steps: int
    texts: list[str]
    tokens_per_s: float


def prepare(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny model and a value head (scaled so that it visibly steers)."""
    model_dir, head_dir = workdir / "tiny-llama", workdir / "value-head"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, "llama", seed=seed)
    if not (head_dir / "config.json").exists():
        head = ValueHead(64, [64], seed=seed, base_model=str(model_dir),
                         metadata={"note": "random demo head"})
        with torch.no_grad():
            for layer in head.layers:
                layer.weight.mul_(3.0)
        head.save(head_dir)
    return model_dir, head_dir


def run(workdir: Path, settings: list[tuple[float, int]], batch: int, max_tokens: int) -> list[DemoRun]:
    from vllm import LLM, SamplingParams

    model_dir, head_dir = prepare(workdir)
    llm = LLM(model=str(model_dir), model_impl="recontrol", dtype="float32", enforce_eager=True,
              max_model_len=256, seed=0, kv_cache_memory_bytes=64 << 20,
              additional_config={"recontrol": {"value_head": str(head_dir), "default_on": False}})
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    runs = []
    for alpha, steps in settings:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"recontrol_alpha": alpha, "recontrol_steps": steps}
                                if steps else {"recontrol": 0})
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        elapsed = float("inf")
        for _ in range(REPEATS):  # best of a few: a 2-core machine is noisy
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = min(elapsed, time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append(DemoRun("uncontrolled" if steps == 0 else "RE-Control", alpha, steps,
                            [o.outputs[0].text for o in outputs[:len(PROMPTS)]],
                            generated / elapsed))
    return runs


def print_report(runs: list[DemoRun]) -> None:
    base = runs[0]
    print("\n| setting | alpha | steps | tokens/s | vs. uncontrolled | outputs changed |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        changed = sum(a != b for a, b in zip(r.texts, base.texts))
        print(f"| {r.label} | {r.alpha} | {r.steps} | {r.tokens_per_s:.0f} | "
              f"{r.tokens_per_s / base.tokens_per_s:.2f}x | {changed}/{len(r.texts)} |")
    for i, prompt in enumerate(PROMPTS):
        print(f"\nprompt: {prompt!r}")
        for r in runs:
            print(f"  {r.label:>12} (alpha {r.alpha}, steps {r.steps}): {r.texts[i]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-recontrol demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("recontrol-demo"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the report readable
    runs = run(args.workdir, [(0.0, 0), (0.5, 5), (1.0, 20)], args.batch, args.max_tokens)
    print_report(runs)
    return 0
