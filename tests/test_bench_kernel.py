"""The GPU kernel benchmark script runs end to end on a CPU (Triton's interpreter, toy sizes),
so that a GPU session does not spend its device time on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("VLLM_RECONTROL_BACKEND", None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_check_mode_passes_on_the_interpreter(tmp_path):
    _run("--check", "--json", str(tmp_path / "check.json"))
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["complete"] and result["failures"] == 0 and len(result["cases"]) == 3
    assert all(case["ok"] and case["deterministic"] for case in result["cases"])


def test_timing_mode_writes_every_row(tmp_path):
    variants = ["torch-eager", "triton", "head-ascend", "triton-graph"]
    _run("--variants", *variants, "--layers", "1", "--json", str(tmp_path / "b.json"),
         "--markdown", str(tmp_path / "b.md"))
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants * 2  # toy sizes: B = 1 and 3
    timed = [r for r in rows if r["variant"] != "triton-graph"]
    assert all(r["ms"] > 0 for r in timed)
    assert all(r["error"] == "needs CUDA" for r in rows if r["variant"] == "triton-graph")
    assert (tmp_path / "b.md").read_text().count("| head-ascend |") == 2


def test_warm_up_shards_compile_without_errors():
    run = _run("--warm-only", "--sweep", "--shard", "1", "--shards", "3")
    assert "warm shard 1/3:" in run.stdout and ", 0 failed" in run.stdout
