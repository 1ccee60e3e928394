"""Which implementation runs the ascent: the fused Triton kernel or the torch closed form.

The torch path is the reference and the CPU path; on CUDA the Triton kernel is the default
(except for exact fp32 products, see ``choose_backend``).
An explicit choice (engine key ``backend`` or the ``backend=`` argument) wins over the
environment variable, which wins over ``auto``.
"""

from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "VLLM_RECONTROL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
TRITON_HIDDEN_LAYERS = (1, 2, 3)
# Products of the ascent: "fp32" exact, "tf32" / "bf16" on tensor cores (Triton only).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
_KERNEL_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "bf16"}
# How the ascent is computed: on u directly, or on the first layer's coefficients (Gram form).
FORMS = ("auto", "direct", "gram")
# "auto" picks Triton only from here up: its bf16 and tf32 tensor-core products (tl.dot)
# need sm_80+, and Triton's NVIDIA support targets it; older GPUs get the torch path.
TRITON_MIN_CAPABILITY = (8, 0)


def choose_backend(requested: str, device: torch.device | str, hidden_layers: int,
                   precision: str = "auto") -> str:
    """Resolve ``auto``/env/explicit to ``"torch"`` or ``"triton"``, failing clearly.

    ``auto`` on CUDA is Triton, except for exact fp32 products (``precision="fp32"``): there
    the torch closed form (cuBLAS), replayed as a CUDA graph, beat the kernel's CUDA-core fp32
    path at every measured batch size on an H100, 1.01x to 3.3x (benchmarks/results/
    kernel-h100.md); and except on GPUs below compute capability 8.0
    (``TRITON_MIN_CAPABILITY``), where the kernel's tensor-core products do not exist. An
    explicit "triton" is not second-guessed."""
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
            f"the triton backend was requested"
            f"{f' (by {BACKEND_ENV}=triton)' if requested == 'auto' else ''} but cannot run "
            f"here: device {device}, "
            f"{hidden_layers} hidden layer(s) (the kernel supports {list(TRITON_HIDDEN_LAYERS)}, "
            "on CUDA with TRITON_INTERPRET unset, or on CPU under TRITON_INTERPRET=1 for tests)")
    if choice == "triton":
        return "triton"
    if usable and device.type == "cuda" and precision != "fp32":
        return "triton" if cuda_capability(device) >= TRITON_MIN_CAPABILITY else "torch"
    return "torch"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """``device``'s compute capability (the current device for a bare "cuda"), looked up
    once per device: ``choose_backend`` runs on every ascent."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def choose_precision(requested: str, backend: str) -> str:
    """Resolve the products' precision for a resolved backend; return the name it runs under.

    ``auto`` is bf16 on the Triton backend (weights read as bf16, fp32 accumulation and u: the
    fast path, within ~1e-2 of exact on a 4096-wide head) and fp32 on the torch backend. The
    torch path computes in fp32 only. Returns "fp32" for torch, else the kernel's name
    ("ieee", "tf32" or "bf16").
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {list(PRECISIONS)}")
    if backend == "torch":
        if requested in ("tf32", "bf16"):
            raise ValueError(f"precision {requested!r} needs the triton backend (CUDA); the "
                             "torch backend computes in fp32: use precision 'fp32' or 'auto'")
        return "fp32"
    return _KERNEL_PRECISION["bf16" if requested == "auto" else requested]


def check_form(requested: str, widths: list[int]) -> None:
    """Refuse an unknown form, or the Gram form for a head without a hidden layer (the
    checks that do not depend on the step count, so they can run at engine start)."""
    if requested not in FORMS:
        raise ValueError(f"ascent form {requested!r} is not one of {list(FORMS)}")
    if requested == "gram" and not widths:
        raise ValueError("the Gram ascent form needs a value head with a hidden layer")


def choose_form(requested: str, backend: str, widths: list[int], hidden_size: int) -> str:
    """Resolve the ascent's form to "direct" or "gram" (``vllm_recontrol.ascent``).

    ``auto`` takes the Gram form on the torch backend where it moves fewer weights
    (``gram_form_pays``: a first layer narrower than 2 d, the same answer at every step count
    from 2 on; at one step both forms do the same work), and the direct form on Triton, whose
    Gram kernel (``triton_ascend_gram``) is checked on CPU only so far: "gram" asks for it.
    The choice never depends on the batch's step count, so a row's edit does not depend on
    its neighbours' steps. "gram" on a head without a hidden layer is refused.
    """
    check_form(requested, widths)
    if requested == "direct" or not widths:
        return "direct"
    if requested == "gram":
        return "gram"
    from .ascent import gram_form_pays

    if backend == "torch" and gram_form_pays(widths[0], hidden_size, num_iterations=2):
        return "gram"
    return "direct"
