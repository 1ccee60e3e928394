"""Closed-form gradient ascent on an MLP value head (the torch reference and CPU path).

RE-Control edits a state s by u <- u + alpha * grad V(s + u), n times. For a ReLU MLP the
gradient needs only the ReLU masks of one forward pass, so no autograd graph is built: each
step is one forward and one backward chain of matrix products. All arithmetic is float32;
buffers are allocated once per call (``AscentWorkspace``), never inside the step loop.

The Gram form (``ascend_gram_float32``) computes the same ascent with one product fewer per
step. u only ever moves along the first layer's rows: u = c W1 for a coefficient row c of
width h1, since every gradient is ``dV/dz1 @ W1`` (z1 = x W1^T + b1, the first
pre-activation). So the ascent can run on c: z1(s + u) = z1(s) + c G with G = W1 W1^T
(h1 x h1, computed once per head), ||u||^2 = c G c^T for the projection, and u = c W1 once
at the end. A step then reads G once instead of W1 twice (forward and backward): half the
weight traffic and products of a one-hidden-layer head with h1 = d, a quarter fewer with two
layers, and far less for a first layer narrower than d. Exact in exact arithmetic; in
floating point the rounding differs (not the bits of the direct form).

Batch invariance (``batch_invariant=True``): BLAS libraries pick a product's kernel, and so
its rounding, by its shape, so a row's bits can depend on how many rows share the product
(measured on CPU: float32 edits differ by ~1e-6 alone vs in a batch, enough to flip a bf16
rounding and a token). On CUDA every product then runs in slabs of a fixed row count (the
batch padded with rows that never move), so a row always meets the same shape of product.
On CPU that is not enough: MKL also rounds a row by its position inside a product (seen with
outputs a few columns wide, e.g. a head's narrow layer), so there each row is its own
product, through the same staging buffers (same shape, same alignment, whatever its batch).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

Tensor = torch.Tensor


@dataclass
class MLPWeights:
    """Float32 weights of a ReLU MLP: ``weights[i]`` is ``[out, in]``, the last ``[1, h]``."""

    weights: list[Tensor]
    biases: list[Tensor]
    first_gram: Tensor | None = None  # W1 W1^T [h1, h1], for the Gram form only

    @property
    def hidden_size(self) -> int:
        return self.weights[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.weights[0].device


@dataclass
class AscentWorkspace:
    """Buffers for one batch shape, reused by every step of the loop."""

    x: Tensor
    pre: list[Tensor]
    act: list[Tensor]
    mask: list[Tensor]
    back: list[Tensor]
    grad: Tensor
    u: Tensor
    rate: Tensor
    remaining: Tensor
    norm: Tensor
    peak: Tensor        # max_norm: [rows, 1], the largest |u_i| (norms taken of u / peak)
    idle: Tensor        # max_norm: 1 for a row whose projection this step must leave alone
    one: Tensor         # [1, 1] holding 1.0 (a tensor: a Python scalar would allocate)
    coef: Tensor        # Gram form: c, with u = c W1               [rows, h1]
    base: Tensor        # Gram form: z1(s), the unedited first pre-activation
    image: Tensor       # Gram form: c G = z1(s + u) - z1(s)
    slab: int = 0       # rows per product (batch invariance; rows a multiple of it), 0: all

    @classmethod
    def allocate(cls, mlp: MLPWeights, rows: int, gram: bool | None = None,
                 slab: int = 0) -> "AscentWorkspace":
        """``gram``: also the Gram form's three [rows, h1] buffers (default: when ``mlp``
        carries its first_gram); otherwise they are empty, so the direct form pays nothing."""
        dev, f32 = mlp.device, torch.float32
        widths = [w.shape[0] for w in mlp.weights[:-1]]
        if gram is None:
            gram = mlp.first_gram is not None
        gram_width = widths[0] if widths and gram else 0
        return cls(
            x=torch.empty(rows, mlp.hidden_size, device=dev, dtype=f32),
            pre=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            act=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            mask=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            back=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            grad=torch.empty(rows, mlp.hidden_size, device=dev, dtype=f32),
            u=torch.zeros(rows, mlp.hidden_size, device=dev, dtype=f32),
            rate=torch.empty(rows, 1, device=dev, dtype=f32),
            remaining=torch.empty(rows, 1, device=dev, dtype=f32),
            norm=torch.empty(rows, 1, device=dev, dtype=f32),
            peak=torch.empty(rows, 1, device=dev, dtype=f32),
            idle=torch.empty(rows, 1, device=dev, dtype=f32),
            one=torch.ones(1, 1, device=dev, dtype=f32),
            coef=torch.empty(rows, gram_width, device=dev, dtype=f32),
            base=torch.empty(rows, gram_width, device=dev, dtype=f32),
            image=torch.empty(rows, gram_width, device=dev, dtype=f32),
            slab=slab,
        )

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    @property
    def has_gram_buffers(self) -> bool:
        return self.coef.shape[1] > 0

    def narrow(self, rows: int, slab: int = 0) -> "AscentWorkspace":
        """Views of the first ``rows`` rows, so one workspace serves every smaller batch
        (``slab``: rows per product, as for ``allocate``)."""
        cut = lambda t: t[:rows]  # noqa: E731 - leading-dim views stay contiguous
        return AscentWorkspace(
            x=cut(self.x), pre=[cut(t) for t in self.pre], act=[cut(t) for t in self.act],
            mask=[cut(t) for t in self.mask], back=[cut(t) for t in self.back],
            grad=cut(self.grad), u=cut(self.u), rate=cut(self.rate), remaining=cut(self.remaining),
            norm=cut(self.norm), peak=cut(self.peak), idle=cut(self.idle), one=self.one,
            coef=cut(self.coef), base=cut(self.base), image=cut(self.image), slab=slab)


def value_gradient_into(mlp: MLPWeights, ws: AscentWorkspace) -> Tensor:
    """Write grad_x V(x) for ``ws.x`` into ``ws.grad`` (closed form, masks only)."""
    hidden = len(mlp.weights) - 1
    if hidden == 0:  # a linear value function: the gradient is its weight row
        ws.grad.copy_(mlp.weights[0].expand_as(ws.grad))
        return ws.grad
    _product_into(ws.x, mlp.weights[0].t(), ws.pre[0], ws.slab, mlp.biases[0])
    first_preactivation_gradient_into(mlp, ws)
    _product_into(ws.back[0], mlp.weights[0], ws.grad, ws.slab)
    return ws.grad


def first_preactivation_gradient_into(mlp: MLPWeights, ws: AscentWorkspace) -> Tensor:
    """Write dV/dz1 into ``ws.back[0]``, given the first pre-activation z1 in ``ws.pre[0]``."""
    hidden = len(mlp.weights) - 1
    for i in range(hidden):
        if i > 0:
            _product_into(ws.act[i - 1], mlp.weights[i].t(), ws.pre[i], ws.slab, mlp.biases[i])
        torch.clamp_min(ws.pre[i], 0, out=ws.act[i])
        torch.sign(ws.act[i], out=ws.mask[i])  # the ReLU mask as 0/1 floats
    # Output layer folded in: dV/da_last = w_out, times the last ReLU mask.
    torch.mul(ws.mask[-1], mlp.weights[-1], out=ws.back[-1])
    for i in range(hidden - 1, 0, -1):
        _product_into(ws.back[i], mlp.weights[i], ws.back[i - 1], ws.slab)
        ws.back[i - 1].mul_(ws.mask[i - 1])
    return ws.back[0]


@contextlib.contextmanager
def exact_fp32_products() -> Iterator[None]:
    """Full-precision ("ieee") fp32 matrix products inside, the caller's settings restored
    after. Why: the torch path is the exact one ("fp32 (exact)"), but
    ``torch.set_float32_matmul_precision("high"/"medium")``, which vLLM calls with
    VLLM_FLOAT32_MATMUL_PRECISION, lets cuBLAS use TF32 (about 1e-3 relative error) and
    oneDNN bf16 arithmetic on CPUs that have it, for the whole process. A CUDA graph
    captured inside keeps the kernels chosen here.

    Pinned through ``set_float32_matmul_precision("highest")``, which sets the global value
    and cuBLAS's and oneDNN's together: torch refuses (raises) where they disagree, e.g.
    in ``allowTF32CuBLAS``. Restored as the global value, then each backend's own. A caller
    whose settings already disagree (its global value cannot be read) keeps its global
    value; only the backends' are pinned then.

    The settings are the process's: pinned regions of two threads are taken one at a time
    (``_PRECISION_PIN``), or the one that left first would restore its caller's setting
    under the other, and the other would leave "highest" for good. Other threads' fp32
    products run at full precision while an ascent is inside."""
    with _PRECISION_PIN:
        with _pinned_fp32_products():
            yield


# One pinned region at a time (re-entrant: a pinned ascent may call another).
_PRECISION_PIN = threading.RLock()


@contextlib.contextmanager
def _pinned_fp32_products() -> Iterator[None]:
    cuda = torch.backends.cuda.matmul
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    per_backend = hasattr(cuda, "fp32_precision") and hasattr(mkldnn, "fp32_precision")
    saved_backends = (cuda.fp32_precision, mkldnn.fp32_precision) if per_backend else None
    try:
        saved_global = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 with the two APIs already mixed by the caller
        saved_global = None
    if saved_global is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        cuda.fp32_precision = mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        if saved_global is not None:
            torch.set_float32_matmul_precision(saved_global)
        if saved_backends is not None:
            cuda.fp32_precision, mkldnn.fp32_precision = saved_backends


@exact_fp32_products()
def ascend_float32(
    mlp: MLPWeights,
    states32: Tensor,
    alpha: Tensor,
    steps: Tensor,
    num_iterations: int,
    max_norm: float | Tensor | None = None,
    workspace: AscentWorkspace | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    """Return u after ``num_iterations`` steps; row r moves only while ``k < steps[r]``.

    ``states32`` is ``[B, d]`` float32, ``alpha`` ``[B]`` float32, ``steps`` ``[B]`` integer,
    all on the weights' device. ``max_norm`` projects u back onto the ball ||u|| <= max_norm
    after every step (projected gradient ascent); a ``[B]`` tensor gives each row its own
    radius (inf: unprojected, the same bits as no projection). A ``workspace`` of exactly
    ``product_rows(B, ...)`` rows is reused (the returned u lives in it); otherwise one is
    allocated. ``batch_invariant``: products in fixed slabs (module docstring).
    """
    rows = states32.shape[0]
    states32, alpha, steps, max_norm, ws = _slabbed(mlp, states32, alpha, steps, max_norm,
                                                    workspace, batch_invariant, gram=False)
    ws.u.zero_()
    ws.remaining.copy_(steps.view(-1, 1))
    radius = _radius_column(max_norm, ws.u.device)
    for _ in range(num_iterations):
        torch.add(states32, ws.u, out=ws.x)
        value_gradient_into(mlp, ws)
        _step_rates_into(ws, alpha, idle=radius is not None)
        ws.u.addcmul_(ws.grad, ws.rate)
        if radius is not None:  # u *= min(1, radius / ||u||); inf radius: times exactly 1
            # only rows that took this step: a finished row is never projected again, so its
            # bits do not depend on how many steps the rest of its batch takes
            _project_rows(ws, radius, ws.idle)
    return ws.u[:rows]


@exact_fp32_products()
def ascend_gram_float32(
    mlp: MLPWeights,
    states32: Tensor,
    alpha: Tensor,
    steps: Tensor,
    num_iterations: int,
    max_norm: float | Tensor | None = None,
    workspace: AscentWorkspace | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    """``ascend_float32``'s ascent in the Gram form (module docstring): same contract, and
    ``mlp.first_gram`` must hold W1 W1^T (``with_first_gram``); the head needs a hidden
    layer. Rows keep c, and their first pre-activation is z1(s) + c G."""
    if mlp.first_gram is None or len(mlp.weights) < 2:
        raise ValueError("the Gram form needs a head with a hidden layer and its first_gram")
    rows = states32.shape[0]
    states32, alpha, steps, max_norm, ws = _slabbed(mlp, states32, alpha, steps, max_norm,
                                                    workspace, batch_invariant, gram=True)
    if ws.coef.shape[1] != mlp.weights[0].shape[0]:
        raise ValueError("this workspace has no Gram-form buffers: allocate it from the head "
                         "with its first_gram (or with gram=True)")
    ws.remaining.copy_(steps.view(-1, 1))
    radius = _radius_column(max_norm, ws.u.device)
    _product_into(states32, mlp.weights[0].t(), ws.base, ws.slab, mlp.biases[0])
    ws.pre[0].copy_(ws.base)
    ws.coef.zero_()
    for k in range(num_iterations):
        first_preactivation_gradient_into(mlp, ws)
        _step_rates_into(ws, alpha)
        ws.coef.addcmul_(ws.back[0], ws.rate)
        if k == num_iterations - 1:
            break  # nothing reads z1 after the last step; its norm is taken from u below
        _product_into(ws.coef, mlp.first_gram, ws.image, ws.slab)  # G symmetric: c G = (G c^T)^T
        if radius is not None:  # ||u||^2 = c G c^T; scale c and its image alike
            _gram_norm_into(ws)
            _projection_scale_into(ws.norm, radius, ws.peak)
            # Only rows with a step still to take: a row's last step is projected on u
            # below, as it is when that step is the batch's last, so a row's bits do not
            # depend on how many steps the rest of its batch takes.
            torch.clamp(ws.remaining, 0.0, 1.0, out=ws.idle)
            torch.sub(ws.one, ws.idle, out=ws.idle)
            torch.maximum(ws.norm, ws.idle, out=ws.norm)
            ws.coef.mul_(ws.norm)
            ws.image.mul_(ws.norm)
        torch.add(ws.base, ws.image, out=ws.pre[0])
    _product_into(ws.coef, mlp.weights[0], ws.u, ws.slab)
    if radius is not None:  # the last step's projection, on u itself (no product with G)
        _project_rows(ws, radius)
    return ws.u[:rows]


def invariant_slab(device: torch.device) -> int:
    """Rows per product under batch invariance: a tile's worth on CUDA (each slab reads the
    weights again), one on CPU (module docstring: position inside a product matters there)."""
    return 64 if device.type == "cuda" else 1


def product_rows(rows: int, device: torch.device, batch_invariant: bool) -> int:
    """Rows of the workspace that ``rows`` states need (padded to whole slabs)."""
    if not batch_invariant:
        return rows
    slab = invariant_slab(device)
    return -(-rows // slab) * slab


def _slabbed(mlp: MLPWeights, states32: Tensor, alpha: Tensor, steps: Tensor,
             max_norm: float | Tensor | None, workspace: AscentWorkspace | None,
             batch_invariant: bool, gram: bool):
    """The inputs padded to whole slabs (padded rows: steps 0, never move) and a workspace
    of that many rows that runs its products slab by slab; unchanged without invariance."""
    rows, device = states32.shape[0], mlp.device
    padded = product_rows(rows, device, batch_invariant)
    slab = invariant_slab(device) if batch_invariant else 0
    if padded != rows:
        extra = padded - rows
        states32 = torch.cat([states32, states32.new_zeros(extra, states32.shape[1])])
        alpha = torch.cat([alpha, alpha.new_zeros(extra)])
        steps = torch.cat([steps, steps.new_zeros(extra)])
        if isinstance(max_norm, Tensor):
            max_norm = torch.cat([max_norm, max_norm.new_full((extra,), float("inf"))])
    if workspace is None:
        workspace = AscentWorkspace.allocate(mlp, padded, gram=gram or None, slab=slab)
    elif workspace.capacity != padded:
        raise ValueError(f"the workspace has {workspace.capacity} rows, the ascent needs "
                         f"{padded} (product_rows)")
    elif workspace.slab != slab:
        workspace = workspace.narrow(padded, slab)
    return states32, alpha, steps, max_norm, workspace


def with_first_gram(mlp: MLPWeights) -> MLPWeights:
    """``mlp`` with G = W1 W1^T (computed in float64, stored in the weights' dtype), made
    exactly symmetric, so a kernel may read it along either index."""
    w = mlp.weights[0].to(torch.float64)
    gram = w @ w.t()
    gram = ((gram + gram.t()) * 0.5).to(mlp.weights[0].dtype).contiguous()
    return MLPWeights(list(mlp.weights), list(mlp.biases), first_gram=gram)


def gram_form_pays(first_width: int, hidden_size: int, num_iterations: int) -> bool:
    """Whether the Gram form moves fewer weights: 2 h1 d (z1(s) and u = c W1, once) plus
    h1^2 for each step after the first (step 0 starts from c = 0, so z1 = z1(s)), against
    2 h1 d a step; so h1 < 2 d, from 2 steps on."""
    if first_width <= 0 or num_iterations < 2:
        return False
    return (2 * hidden_size + (num_iterations - 1) * first_width
            < 2 * num_iterations * hidden_size)


def _product_into(a: Tensor, b: Tensor, out: Tensor, slab: int, bias: Tensor | None = None):
    """out = bias + a @ b, as one product or, with ``slab``, one per ``slab`` rows (each the
    same shape, so each row is computed the same way in any batch)."""
    if not slab:  # the default: one product, no views made on the hot path
        _matmul_into(a, b, out, bias)
        return
    if slab == 1:
        _rowwise_into(a, b, out, bias)
        return
    for start in range(0, a.shape[0], slab):
        part = slice(start, start + slab)
        _matmul_into(a[part], b, out[part], bias)


def _rowwise_into(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None) -> None:
    """out = bias + a @ b one row at a time, each row copied into the same fresh buffers, so
    that its product has one shape and one alignment (the allocator's) in any batch."""
    row_in = a.new_empty(1, a.shape[1])
    row_out = out.new_empty(1, out.shape[1])
    for r in range(a.shape[0]):
        row_in.copy_(a[r:r + 1])
        _matmul_into(row_in, b, row_out, bias)
        out[r:r + 1].copy_(row_out)


def _matmul_into(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _radius_column(max_norm: float | Tensor | None, device: torch.device) -> Tensor | None:
    # Tensor constants: a Python scalar in an in-place op allocates a wrapper on every call.
    # torch.full is a fill kernel (torch.tensor would copy from the host: no CUDA graph).
    if isinstance(max_norm, Tensor):
        return max_norm.to(torch.float32).view(-1, 1).clamp_min(0.0)
    if max_norm is None:
        return None
    return torch.full((1, 1), max_norm, dtype=torch.float32, device=device)


def _step_rates_into(ws: AscentWorkspace, alpha: Tensor, idle: bool = False) -> None:
    """ws.rate = alpha while a row has steps left, else 0: rows with fewer steps stop moving
    (``idle``: also ws.idle = 1 for the rows that take no step now, else 0)."""
    torch.clamp(ws.remaining, 0.0, 1.0, out=ws.rate)
    if idle:
        torch.sub(ws.one, ws.rate, out=ws.idle)
    ws.remaining.sub_(ws.rate)
    ws.rate.mul_(alpha.view(-1, 1))


def _project_rows(ws: AscentWorkspace, radius: Tensor, idle: Tensor | None = None) -> None:
    """ws.u <- u * min(1, radius / ||u||) row by row, in place; rows where ``idle`` is 1
    keep u as it is (the factor max(f, 1) = 1 exactly).

    ||u|| is taken as peak * ||u / peak|| (peak = max |u_i|): in float32 ||u||^2 overflows
    from ||u|| ~ 1.8e19 (a huge alpha), and the factor radius / inf = 0 would make the edit
    vanish instead of putting it on the ball. ``ws.grad`` is free here (each step
    recomputes it), so it holds u / peak."""
    _peak_into(ws.u, ws.peak)
    torch.div(ws.u, ws.peak, out=ws.grad)
    torch.linalg.vector_norm(ws.grad, dim=1, keepdim=True, out=ws.norm)
    _projection_scale_into(ws.norm, radius, ws.peak)
    if idle is not None:
        torch.maximum(ws.norm, idle, out=ws.norm)
    ws.u.mul_(ws.norm)


def _gram_norm_into(ws: AscentWorkspace) -> None:
    """ws.norm <- sqrt(c (c G)^T / (peak_c peak_y)) and ws.peak <- sqrt(peak_c peak_y), so
    that ||u|| = peak * norm with no overflow on the way (``_project_rows``). ``ws.act[0]``
    is free until the next step recomputes it from z1."""
    scratch = ws.act[0]
    _peak_into(ws.coef, ws.peak)
    torch.div(ws.coef, ws.peak, out=scratch)
    _peak_into(ws.image, ws.norm)
    scratch.mul_(ws.image)
    scratch.div_(ws.norm)
    ws.peak.sqrt_()
    ws.peak.mul_(ws.norm.sqrt_())
    torch.sum(scratch, dim=1, keepdim=True, out=ws.norm)
    ws.norm.clamp_min_(0.0).sqrt_()  # c G c^T may round below 0 near u = 0


def _peak_into(x: Tensor, peak: Tensor) -> None:
    """peak <- max_i |x_i| per row, at least 1e-30 (so a zero row divides to zeros)."""
    torch.linalg.vector_norm(x, ord=math.inf, dim=1, keepdim=True, out=peak)
    peak.clamp_min_(1e-30)


def _projection_scale_into(norm: Tensor, radius: Tensor, peak: Tensor) -> None:
    """norm <- min(1, radius / (peak * norm)), in place, computed as (radius / peak) / norm
    so that no product overflows; an infinite radius gives exactly 1. Overwrites ``peak``."""
    norm.clamp_min_(1e-30)
    torch.div(radius, peak, out=peak)
    torch.div(peak, norm, out=norm)
    norm.clamp_max_(1.0)


def as_row_tensor(value: float | int | Sequence | Tensor, rows: int, dtype: torch.dtype,
                  device: torch.device, name: str) -> Tensor:
    """Broadcast a scalar or per-row value to a ``[rows]`` tensor, checking its length."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(rows).contiguous()
    if t.dim() > 1:  # a [2, 2] would otherwise be read as four rows without a word
        raise ValueError(f"{name} must be one value or one per row, got shape {list(t.shape)}")
    if t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} entries but states have {rows} rows")
    return t
