"""Triton kernels of vllm-recontrol, installed as ``vllm_recontrol.kernels``."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

__all__ = ["kernels_interpreted", "triton_available"]


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install (missing driver libraries, ...) counts as absent
        return False
    return True


def kernels_interpreted() -> bool:
    """True when this process's kernels run in Triton's interpreter: as decorated, once
    ``value_ascent`` is imported (Triton reads TRITON_INTERPRET at ``@triton.jit`` time),
    else as TRITON_INTERPRET would make them (Triton's truth values: 1, true, on, yes).

    Why it matters on CUDA: the interpreter accepts CUDA tensors (it copies them to the
    host) but multiplies bf16 operands as raw integers there, so the default bf16 kernel
    would apply finite garbage edits instead of failing."""
    module = sys.modules.get(f"{__name__}.value_ascent")
    kernel = getattr(module, "_ascent_gemm_kernel", None)
    if kernel is not None:
        return type(kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``.

    That is: triton imports, the device is CUDA (and CUDA is available) and the kernels are
    compiled, not interpreted (``kernels_interpreted``: TRITON_INTERPRET=1 left set on a GPU
    machine), or ``TRITON_INTERPRET=1`` is set and the device is the CPU (the interpreter, for
    tests). Cheap: no device is touched, and the import is tried once per process. Note that
    Triton reads TRITON_INTERPRET when the kernel module is imported, so set it before
    importing ``vllm_recontrol.kernels.value_ascent``.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and _triton_imports() and not kernels_interpreted()
    if kind == "cpu":
        return kernels_interpreted() and _triton_imports()
    return False
