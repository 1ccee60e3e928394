"""Helpers shared by the engine tests: tiny heads, engine start/stop, request shortcuts."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from vllm_recontrol import ValueHead

HIDDEN = 64
PROMPTS = ["the good kan", "a bad ba bon", "user: the is good", "zo ze zi zu", "and the", "bal"]
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32", enforce_eager=True, max_model_len=256, seed=0, max_num_seqs=32,
    kv_cache_memory_bytes=64 << 20,
)


def two_cores(what: str) -> list[int]:
    """Two CPU cores this process may use, one per worker or engine (vLLM's CPU backend needs
    them bound by hand when one NUMA node hosts both); skips the test where there are not."""
    import pytest

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip(f"needs two CPU cores for two {what}")
    return cores[:2]


def llama_control(head_dir: Path) -> dict:
    """The shared Llama engine's RE-Control settings (other engines compared with it reuse
    them)."""
    return {"value_head": str(head_dir), "alpha": 1.0, "steps": 4, "max_steps": 50}


def shared_control(head_dir: Path, head1_dir: Path) -> dict:
    """The shared Llama engine's settings: ``llama_control`` plus a second value head,
    "one-layer" (with its own defaults, alpha 2 and 8 steps), that requests pick with
    ``recontrol_head`` (servers compared with that engine use the same)."""
    return {**llama_control(head_dir),
            "value_heads": {"one-layer": {"path": str(head1_dir), "alpha": 2.0, "steps": 8}}}


def strong_head(seed: int, widths: list[int]) -> ValueHead:
    """A random head scaled so that a few ascent steps visibly move a tiny model's argmax."""
    head = ValueHead(HIDDEN, widths, seed=seed)
    with torch.no_grad():
        for layer in head.layers:
            layer.weight.mul_(3.0)
    return head


def start_llm(model_dir: Path, recontrol: dict | None = None, plugin_loaded: bool = True,
              **overrides: Any):
    """Start an offline engine; ``recontrol=None`` leaves RE-Control off."""
    from vllm import LLM

    kwargs = {**ENGINE_KWARGS, **overrides}
    if recontrol is not None:
        kwargs.update(model_impl="recontrol", additional_config={"recontrol": recontrol})
    from vllm_recontrol._vllm_adapter import stock_vllm_engines

    with contextlib.nullcontext() if plugin_loaded else stock_vllm_engines():
        return LLM(model=str(model_dir), **kwargs)


def stop_llm(llm) -> None:
    from vllm_recontrol._vllm_adapter import shutdown_llm

    shutdown_llm(llm)


def greedy(max_tokens: int = 10, **extra: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]
