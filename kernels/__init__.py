"""Triton kernels of vllm-recontrol, installed as ``vllm_recontrol.kernels``."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available"]


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


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``.

    That is: triton imports and the device is CUDA (and CUDA is available), or ``TRITON_INTERPRET=1`` is set and the
    device is the CPU (the interpreter, for tests). Cheap: no device is touched, and the
    import is tried once per process. Note that Triton reads TRITON_INTERPRET when the kernel
    module is imported, so set it before importing ``vllm_recontrol.kernels.value_ascent``.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and _triton_imports()
    if kind == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1" and _triton_imports()
    return False
