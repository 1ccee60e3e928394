"""Which implementation runs the ascent: the fused Triton kernel or the torch closed form.

The torch path is the reference and the CPU path; on CUDA the Triton kernel is the default.
An explicit choice (engine key ``backend`` or the ``backend=`` argument) wins over the
environment variable, which wins over ``auto``.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "VLLM_RECONTROL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
TRITON_HIDDEN_LAYERS = (1, 2, 3)


def choose_backend(requested: str, device: torch.device | str, hidden_layers: int) -> str:
    """Resolve ``auto``/env/explicit to ``"torch"`` or ``"triton"``, failing clearly."""
    choice = requested if requested != "auto" else os.environ.get(BACKEND_ENV, "auto") or "auto"
    if choice not in BACKENDS:
        source = f"{BACKEND_ENV}={choice!r}" if requested == "auto" else f"backend {choice!r}"
        raise ValueError(f"{source} is not one of {list(BACKENDS)}")
    if choice == "torch":
        return "torch"
    device = torch.device(device)
    from .kernels import triton_available

    usable = triton_available(device) and hidden_layers in TRITON_HIDDEN_LAYERS
    if choice == "triton" and not usable:
        raise ValueError(
            f"the triton backend was requested but cannot run here: device {device}, "
            f"{hidden_layers} hidden layer(s) (the kernel supports {list(TRITON_HIDDEN_LAYERS)}, "
            "on CUDA, or on CPU under TRITON_INTERPRET=1 for tests)")
    if choice == "triton":
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"
