"""Backend dispatch: torch is the reference and CPU path, Triton is chosen or forced clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_recontrol import ValueHead
from vllm_recontrol.backends import BACKEND_ENV, choose_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert choose_backend("auto", "cpu", 2) == "torch"


def test_explicit_choice_beats_the_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert choose_backend("torch", "cpu", 2) == "torch"


def without_interpreted_kernels(monkeypatch) -> None:
    """As in a process where TRITON_INTERPRET is unset: neither the variable nor a kernel
    module an earlier test of this worker imported interpreted (``kernels_interpreted``
    believes the module first)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "vllm_recontrol.kernels.value_ascent", raising=False)


def test_forced_triton_that_cannot_run_fails_clearly(monkeypatch):
    without_interpreted_kernels(monkeypatch)
    with pytest.raises(ValueError, match="triton backend was requested but cannot run here"):
        choose_backend("triton", "cpu", 2)
    monkeypatch.setenv(BACKEND_ENV, "triton")  # the caller asked for auto: name the variable
    with pytest.raises(ValueError, match=rf"triton backend was requested \(by {BACKEND_ENV}="
                                         r"triton\) but cannot run here"):
        choose_backend("auto", "cpu", 2)


def test_triton_refuses_unsupported_depth(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"4 hidden layer\(s\)"):
        choose_backend("triton", "cpu", 4)


def test_auto_on_cuda_is_triton_except_for_exact_products(monkeypatch):
    """Measured on an H100: the torch closed form in a CUDA graph beat the kernel's CUDA-core
    fp32 path at every batch size, so exact products go to torch; the rest to Triton. (No GPU
    here: the kernel's availability check is stubbed.)"""
    import vllm_recontrol.kernels as kernels

    import vllm_recontrol.backends as backends

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda device: True)
    monkeypatch.setattr(backends, "_capability_of", lambda index: (9, 0))  # an H100
    cuda = torch.device("cuda", 0)
    assert choose_backend("auto", cuda, 2) == "triton"
    assert choose_backend("auto", cuda, 2, precision="bf16") == "triton"
    assert choose_backend("auto", cuda, 2, precision="tf32") == "triton"
    assert choose_backend("auto", cuda, 2, precision="fp32") == "torch"
    assert choose_backend("triton", cuda, 2, precision="fp32") == "triton"  # forced stays
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert choose_backend("auto", cuda, 2, precision="fp32") == "triton"


@pytest.mark.parametrize("capability, auto", [((7, 0), "torch"), ((7, 5), "torch"),
                                              ((8, 0), "triton"), ((8, 9), "triton"),
                                              ((10, 0), "triton")])
def test_auto_needs_compute_capability_8_for_triton(monkeypatch, capability, auto):
    """Triton's bf16/tf32 tensor-core products need sm_80+: "auto" picks torch on a V100 or
    T4, each device judged by its own capability (the lookup is stubbed: no GPU here); an
    explicit "triton" is left to the user."""
    import vllm_recontrol.backends as backends
    import vllm_recontrol.kernels as kernels

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda device: True)
    monkeypatch.setattr(backends, "_capability_of",
                        lambda index: capability if index == 1 else (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert choose_backend("auto", torch.device("cuda", 1), 2) == auto
    assert choose_backend("auto", torch.device("cuda"), 2) == auto  # the current device
    assert choose_backend("auto", torch.device("cuda", 0), 2) == "triton"
    assert choose_backend("triton", torch.device("cuda", 1), 2) == "triton"


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}='cuda-please' is not one of"):
        choose_backend("auto", "cpu", 1)


def test_engine_backend_error_is_a_config_error(tmp_path, monkeypatch):
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import EditController, RowControls
    from vllm_recontrol.errors import ConfigError

    without_interpreted_kernels(monkeypatch)
    settings = EngineSettings.from_additional_config(
        {"recontrol": {"value_head": str(tmp_path), "backend": "triton"}})
    with pytest.raises(ConfigError, match="backend"):
        EditController(ValueHead(8, [8]), settings, RowControls())


def test_value_head_ascend_runs_the_triton_kernel_when_forced():
    """Both ways of forcing Triton (argument, environment) give the torch path's answer."""
    script = textwrap.dedent("""
        import os, torch
        from vllm_recontrol import ValueHead
        head = ValueHead(24, [20, 12], seed=3)
        states = torch.randn(5, 24, dtype=torch.bfloat16)
        alpha = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.4])
        steps = torch.tensor([3, 3, 0, 5, 1])
        ref = head.ascend(states, alpha, steps, backend="torch")
        forced = head.ascend(states, alpha, steps, backend="triton", max_norm=None)
        os.environ["VLLM_RECONTROL_BACKEND"] = "triton"
        by_env = head.ascend(states, alpha, steps)
        for got in (forced, by_env):
            assert got.dtype == torch.bfloat16
            assert torch.equal(got[1:3], states[1:3])
            torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(BACKEND_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_precision_resolution():
    from vllm_recontrol.backends import choose_precision
    assert choose_precision("auto", "torch") == "fp32"
    assert choose_precision("fp32", "torch") == "fp32"
    assert choose_precision("auto", "triton") == "bf16"
    assert [choose_precision(p, "triton") for p in ("fp32", "tf32", "bf16")] == \
        ["ieee", "tf32", "bf16"]
    for precision in ("tf32", "bf16"):
        with pytest.raises(ValueError, match="needs the triton backend"):
            choose_precision(precision, "torch")
    with pytest.raises(ValueError, match="not one of"):
        choose_precision("half", "triton")


def test_engine_precision_conflict_is_a_config_error(tmp_path, monkeypatch):
    """backend auto resolves to torch on a CPU: bf16 products cannot be honoured there."""
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import EditController, RowControls
    from vllm_recontrol.errors import ConfigError

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    settings = EngineSettings.from_additional_config(
        {"recontrol": {"value_head": str(tmp_path), "precision": "bf16"}})
    with pytest.raises(ConfigError, match=r'\["precision"\]: precision .bf16. needs the triton'):
        EditController(ValueHead(8, [8]), settings, RowControls())
    with pytest.raises(ValueError, match="needs the triton backend"):
        ValueHead(8, [8]).ascend(torch.randn(2, 8), 0.5, 2, precision="bf16")


@pytest.mark.parametrize("value, interpreted", [("1", True), ("true", True), ("On", True),
                                                ("0", False), ("", False)])
def test_kernels_interpreted_follows_the_variable_until_the_kernels_are_imported(
        monkeypatch, value, interpreted):
    """Before ``value_ascent`` is imported, the variable decides (with Triton's truth
    values) how the kernels will be decorated."""
    import vllm_recontrol.kernels as kernels

    monkeypatch.delitem(sys.modules, "vllm_recontrol.kernels.value_ascent", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert kernels.kernels_interpreted() is interpreted
