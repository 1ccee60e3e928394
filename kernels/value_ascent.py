"""Triton kernels for RE-Control's gradient ascent on a ReLU MLP value head.

``triton_ascend`` computes exactly what ``vllm_recontrol.ascent.ascend_float32`` computes:
u = 0, then ``num_iterations`` times u <- P(u + alpha_r [k < steps_r] grad_x V(s + u)), where P
projects each row onto ||u|| <= max_norm when ``max_norm`` is given (one radius, or one per
row read from a tensor: per-request radii share one compiled kernel). For a ReLU MLP the
gradient needs only the ReLU masks of one forward pass, so a step is a chain of 2L matrix
products of the batch against the L hidden weight matrices (L forward, L backward).

Design
------
* One generic GEMM kernel, ``C[M, N] = A[M, K] @ Wop[K, N]``, specialised at compile time by
  where its left operand comes from (prologue) and what it does with its result (epilogue):

  - forward layer 0: ``A = x = s + u``, stored (bf16 in bf16 mode) by the previous step's
    update epilogue (before the first step, a copy of s); epilogue ``act = relu(acc + b)``;
    the ReLU mask is ``act > 0`` and is never stored separately. Under max_norm the prologue
    builds ``s + scale * u`` instead, since the scale needs whole-row norms (below);
  - forward layer i > 0: ``A = act[i-1]``, same epilogue, except the last hidden layer,
    whose epilogue stores ``g_top = w_out * (acc + b > 0)`` (the output layer folded in: its
    activation is never needed, only its mask);
  - first backward product: ``A = g_top``, epilogue ``g = acc * (act[i-1] > 0)``;
  - last backward product (``Wop = W_0``): epilogue ``u += rate * acc`` with
    ``rate = alpha_r * [k < steps_r]`` computed in-kernel from the step index passed as a
    scalar, so the host never waits on the device inside the loop; it also writes the next
    step's ``x = s + u``.

  Every left operand is thus a plain load, and in bf16 mode goes to the tensor cores without
  a round trip through fp32. The same matrix is read with ``Wop[k, n] = W[n, k]`` going
  forward and ``W[k, n]`` going backward; both are plain strided loads along W's contiguous
  rows, so neither direction needs a transposed copy.
* Small batches (B <= 64, the decode case): the work is reading the weights (a d = h = 4096
  bf16 matrix is 32 MB per product, against 16 x 4096 x 4 bytes of states), so the kernel is a
  weight-streaming GEMV. B is padded to one 16/32/64-row tile (16 is the smallest tensor-core
  tile; masked rows cost no memory traffic) and the output dimension is cut into 32-column
  blocks; each program streams its slab of W once through a 4-stage pipeline with 16 KB of W
  per stage (BLOCK_K 256 in bf16). Where that gives under 3/4 of a wave of programs (d = 2048,
  small widths), K is split into whole waves: each split writes its partial sum to a scratch
  buffer and a small reduce kernel (16-row programs: more of them than the product's tiles)
  adds the splits in split order and applies the epilogue.
  Measured on an H100 (benchmarks/results/kernel-h100.md): 0.98x-1.28x of the memory floor
  for 1-32 rows at d = 4096; the sweep preferred this shape over 16- and 64-column blocks,
  8 KB stages, 8 warps and split K in both directions.
* Large batches: tensor-core tiles of 64x128 (one warp group), or 128x128 (two warp
  groups) where those make a whole wave; K split below 3/4 of a wave (1/2 in bf16). In bf16
  the operand tiles come through tensor descriptors (TMA, sm_90 and later) into 6- and
  5-stage pipelines (H100 sweeps at B = 128, 256 and 512). fp32 "ieee" products use 64x64
  down to 32x32 CUDA-core tiles.
* max_norm: the projection needs whole-row norms, which no single program sees. The last
  backward epilogue writes each program's per-row partial sum of squares of the unprojected
  u_raw to its own slot; the next step's first forward prologue and update epilogue (and a
  final small kernel) sum those slots in a fixed order and apply
  ``min(1, radius_r / ||u_raw||)`` on the fly (an infinite radius multiplies by exactly 1,
  so an uncapped row keeps its unprojected bits). Two slot buffers alternate between steps so
  that no launch reads what it writes. Squares, slots and the factor are float64: in float32
  ||u||^2 overflows from ||u|| ~ 1.8e19 (a huge alpha), and the factor radius / inf = 0
  would erase the edit instead of putting it on the ball.
* The Gram form (``triton_ascend_gram``, see ``vllm_recontrol.ascent``): the same kernel
  with seven more epilogues runs the ascent on coefficients c with u = c W1, one product
  with G = W1 W1^T per step in place of the first layer's forward and backward products
  (none at step 0, where c = 0: the product making z1(s) starts that step);
  under max_norm a small kernel per later step (``_gram_finish_kernel``) applies the projection,
  whose norm c G c^T comes from the G product's per-row partial sums.
* Precision: products accumulate in fp32. ``precision="ieee"`` (default for fp32 weights,
  matching ``ascend_float32``) multiplies fp32 operands exactly, on the CUDA cores: fine for
  small batches, which are bound by the weight reads, but far below the tensor-core rate at
  large batch, where "tf32" or bf16 weights are the fast choice. ``"tf32"`` uses tf32 tensor
  cores; ``"bf16"`` (default for bf16 weights) rounds the left operand to bf16 (round to
  nearest even) and uses bf16 tensor cores, the only way to approach the chip's matrix rate.
  In bf16 mode the stored activations and backward products are bf16 too; u and its update
  stay fp32. The gradient of a ReLU net depends on the activations only through the ReLU
  masks, and a unit whose pre-activation lies within rounding distance of 0 may take the
  other side, so reduced-precision results differ from the fp32 reference by more than the
  operand rounding alone (up to several 1e-2 relative on tiny test heads; the GPU check
  reports it at d = 4096).
* Deterministic: no floating-point atomics; every element is produced by one program whose K
  loop runs in a fixed order, split-K partials are added in split order (by the reduce kernel,
  or with the plan's ``fixup`` by whichever split of the tile finishes last, told by an integer
  counter: the sum is the same), and the launch configuration is a pure function of the shapes
  and the device (no autotuning), so the same input on the same device gives the same bits.
  The row count M is never specialised (``do_not_specialize``): Triton would otherwise compile
  separate code for M = 1 and for M divisible by 16, so a row alone could run other code than
  in a batch (and every batch size class would cost a compile).
* ``TRITON_INTERPRET=1`` with CPU tensors runs the same kernels in Triton's interpreter (for
  tests). The interpreter multiplies bf16 operands as raw integers and truncates fp32->bf16
  casts, so there the kernel rounds with integer arithmetic and feeds the (bf16-valued) fp32
  operands to the product; on the GPU the same rounding is the native round-to-nearest-even.
  Triton reads TRITON_INTERPRET when a function is decorated (``@triton.jit``: this module's
  kernels at import, Triton's own ``tl.zeros``/``tl.sum`` when triton is first imported), not
  at launch.

Limits: fewer than 2**31 elements per tensor (int32 indexing); 1 to 3 hidden layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts
    from triton.runtime.autotuner import OutOfResources  # type: ignore
try:  # host-side tensor descriptors (Triton >= 3.4): the ``tma`` plan option
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: plain loads only
    TensorDescriptor = None
try:  # grid dependency control (Triton >= 3.4): the ``pdl`` plan option
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: no programmatic dependent launch
    gdc_launch_dependents = gdc_wait = None

from .launch_plans import GemmPlan, _device_programs, _sm90_features, plan_gemm

if TYPE_CHECKING:
    from vllm_recontrol.ascent import MLPWeights

Tensor = torch.Tensor

MAX_HIDDEN_LAYERS = 3
_SQ_CHUNK = 16  # partial squared norms summed per load in the deferred projection
PRECISIONS = ("ieee", "tf32", "bf16")

# Left-operand sources (prologues) and result uses (epilogues) of the GEMM kernel.
PRO_STATE = tl.constexpr(0)    # A = s + scale * u_raw (max_norm only: scale needs whole rows)
PRO_PLAIN = tl.constexpr(1)    # A = a stored operand: x = s + u, an activation, a product
EPI_FWD = tl.constexpr(0)      # act = relu(acc + b)
EPI_MID = tl.constexpr(1)      # g = acc * (act_prev > 0)
EPI_UPDATE = tl.constexpr(2)   # u_raw = scale * u_raw + rate * acc (+ partial squared norms,
                               # or x = s + u for the next step's first product)
EPI_PARTIAL = tl.constexpr(3)  # split-K: store the partial sum, a reduce kernel finishes
EPI_FWD_OUT = tl.constexpr(4)  # last hidden layer: g_top = w_out * (acc + b > 0), the first
                               # backward operand (the activation itself is never needed)
# The Gram form (``triton_ascend_gram``): the ascent on c, u = c W1, z1 = z1(s) + c G.
EPI_BASE = tl.constexpr(5)       # z1(s) = acc + b1, stored fp32 (state_ptr of later epilogues),
                                 # and step 0 (c = 0, so z1 = z1(s)): act1 = relu(z1) to x_ptr
EPI_GRAM_ACT = tl.constexpr(6)   # act1 = relu(z1(s) + acc): acc = c G (heads of 2+ layers)
EPI_GRAM_COEF = tl.constexpr(7)  # one hidden layer: z1 = z1(s) + acc, c += rate * w_out * (z1 > 0),
                                 # c stored fp32 and as the next product's operand (x_ptr)
EPI_COEF = tl.constexpr(8)       # c += rate * acc * (act1 > 0): the product through W2 ends a step
EPI_STORE = tl.constexpr(9)      # u = acc (u = c W1 after the last step; under max_norm also
                                 # its partial sums of squares, for the final scale)
EPI_GRAM_PART = tl.constexpr(10)  # max_norm: y = c' G stored, partial sums of c' * y per row
                                  # (||u'||^2 = c' G c'^T); _gram_finish_kernel goes on
EPI_BASE_COEF = tl.constexpr(11)  # one hidden layer: z1(s) as EPI_BASE, and step 0's update
                                  # c = rate * w_out * (z1 > 0) (c to state_ptr, operand to x_ptr)


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), returned as fp32.

    Integer arithmetic because the interpreter's cast truncates; on the GPU this equals the
    native cvt.rn. NaN stays NaN (the bit trick alone could turn it into inf).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _not_first(offs_m, first):
    """[BM] flag 'u_raw holds a previous step' (u is unwritten before the first step).

    Built as a tensor: the interpreter mis-types a tensor mask combined with a scalar flag.
    """
    return (offs_m * 0 + first) == 0


@triton.jit
def _square64(x):
    """x^2 in float64 (the projection's partial sums: no overflow for any finite x)."""
    wide = x.to(tl.float64)
    return wide * wide


@triton.jit
def _row_scale(sq_ptr, offs_m, M, n_sq, radius_ptr, first, steps_ptr, gate_step,
               SQ_CHUNK: tl.constexpr):
    """min(1, radius / ||u_raw||) per row from the previous step's partial sums of squares
    (each row's own radius: inf leaves it unprojected, 0 or less keeps u at 0); exactly 1
    for a row with ``gate_step`` steps or fewer, whose projection is done or not due: a
    finished row is never projected again, so its bits do not depend on how many steps the
    rest of its batch takes.

    The slots are summed in one fixed order (chunk by chunk), so the factor is reproducible,
    and a chunk at a time keeps registers free for the main loop. Before the first step
    (``first``) u is 0 and the factor is 1 (nothing is read: the slots are unwritten).
    """
    j = tl.arange(0, SQ_CHUNK)
    live = (offs_m[:, None] < M) & _not_first(offs_m, first)[:, None]
    total = tl.zeros_like(offs_m.to(tl.float64))  # float64 slots: see the module doc
    for j0 in range(0, n_sq, SQ_CHUNK):
        ok = live & (j0 + j[None, :] < n_sq)
        part = tl.load(sq_ptr + offs_m[:, None] * n_sq + j0 + j[None, :], mask=ok, other=0.0)
        total += tl.sum(part, axis=1)
    # the Gram form's c G c^T may round below 0 near u = 0 (a sum of squares never does).
    # One use of the loop's result: two (a compare and a select) trip an assertion in
    # Triton 3.6's thread-locality pass on sm_90 (seen compiling offline, precompile.py)
    norm = tl.sqrt(tl.maximum(total, 0.0))  # float64: correctly rounded, as is its division
    radius = tl.maximum(tl.load(radius_ptr + offs_m, mask=offs_m < M, other=1.0), 0.0)
    factor = tl.minimum(radius.to(tl.float64) / tl.maximum(norm, 1e-30), 1.0).to(tl.float32)
    n_steps = tl.load(steps_ptr + offs_m, mask=offs_m < M, other=0)
    return tl.where(n_steps > gate_step, factor, 1.0)


@triton.jit
def _load_a(a_ptr, u_ptr, offs_m, offs_k, M, K, scale, first,
            PROLOGUE: tl.constexpr, DOT: tl.constexpr):
    """One [BM, BK] tile of the left operand: as stored (bf16 in bf16 mode, so that it goes to
    the tensor cores without a round trip through fp32), or built from s and u (max_norm)."""
    ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    idx = offs_m[:, None] * K + offs_k[None, :]
    if PROLOGUE == PRO_STATE:
        a = tl.load(a_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + idx, mask=ok & _not_first(offs_m, first)[:, None], other=0.0)
        a = a + scale[:, None] * u
        if DOT == "bf16":
            a = _round_bf16(a)
    else:
        a = tl.load(a_ptr + idx, mask=ok, other=0.0)
    return a


@triton.jit
def _load_w(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn, W_EVICT: tl.constexpr):
    """One [BK, BN] tile of Wop; one of the two strides is 1 (W's rows are contiguous).
    ``W_EVICT`` "evict_last" asks L2 to keep the weights for the next product (honoured on
    plain loads only: Triton drops the hint from pipelined cp.async loads, see GemmPlan)."""
    ok = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    return tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                   mask=ok, other=0.0, eviction_policy=W_EVICT)


@triton.jit
def _mma(a, w, acc, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += a @ w in the chosen operand precision, fp32 accumulation.

    Under the interpreter the product is an explicit sum over K, the same order for every
    row: its ``tl.dot`` is numpy's matmul, whose BLAS may round a row differently by its
    position in the tile (OpenBLAS 0.3.30 on an AMD EPYC does), which a GPU's MMA does not,
    and batch-invariance tests need the GPU's behaviour. (bf16 operands already hold bf16
    values there; the interpreter cannot multiply bf16.)"""
    if INTERPRET:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    elif DOT == "bf16":
        acc = tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT)
    return acc


@triton.jit
def _store_rounded(ptr, value, ok, ACT_BF16: tl.constexpr):
    """Store an activation-like tile; in bf16 mode rounded to nearest even bf16."""
    if ACT_BF16:
        tl.store(ptr, _round_bf16(value).to(tl.bfloat16), mask=ok)
    else:
        tl.store(ptr, value, mask=ok)


@triton.jit
def _relu(z):
    """relu that keeps NaN, like torch's clamp_min."""
    return tl.where((z > 0) | (z != z), z, 0.0)


@triton.jit
def _top_gradient(z, wout_ptr, offs_n, N):
    """dV/dz of the last hidden layer: w_out where z > 0 (the output layer folded in; a NaN
    pre-activation masks its unit off)."""
    w_out = tl.load(wout_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    return tl.where(z > 0, w_out[None, :], 0.0)


@triton.jit
def _step_rates(alpha_ptr, steps_ptr, offs_m, M, step):
    """[BM] alpha of each row while it has steps left at ``step``, else 0."""
    row_ok = offs_m < M
    alpha = tl.load(alpha_ptr + offs_m, mask=row_ok, other=0.0)
    n_steps = tl.load(steps_ptr + offs_m, mask=row_ok, other=0)
    return tl.where(n_steps > step, alpha, 0.0)


@triton.jit
def _advance(old, rate, g):
    """old + rate * g; rows that are done (or have alpha 0) keep ``old`` bit for bit, even
    if g is not finite."""
    return tl.where(rate[:, None] != 0, old + rate[:, None] * g, old)


@triton.jit
def _epilogue(acc, offs_m, offs_n, pid_n, M, N, out_ptr, bias_ptr, maskin_ptr, wout_ptr,
              state_ptr, x_ptr, alpha_ptr, steps_ptr, sq_in_ptr, sq_out_ptr, n_sq, radius_ptr,
              step, first, EPILOGUE: tl.constexpr, PROJECT: tl.constexpr,
              ACT_BF16: tl.constexpr, SQ_CHUNK: tl.constexpr):
    """Finish a [BM, BN] tile of a complete product (see the epilogues in the module doc)."""
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    if EPILOGUE == EPI_FWD:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        _store_rounded(out_ptr + idx, _relu(acc + bias[None, :]), ok, ACT_BF16)
    elif EPILOGUE == EPI_FWD_OUT:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        g_top = _top_gradient(acc + bias[None, :], wout_ptr, offs_n, N)
        _store_rounded(out_ptr + idx, g_top, ok, ACT_BF16)
    elif EPILOGUE == EPI_MID:
        prev = tl.load(maskin_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        _store_rounded(out_ptr + idx, acc * tl.where(prev > 0, 1.0, 0.0), ok, ACT_BF16)
    elif EPILOGUE == EPI_BASE or EPILOGUE == EPI_BASE_COEF:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        z = acc + bias[None, :]
        tl.store(out_ptr + idx, z, mask=ok)
        if EPILOGUE == EPI_BASE_COEF:  # step 0's update from c = 0, as EPI_GRAM_COEF makes it
            rate = _step_rates(alpha_ptr, steps_ptr, offs_m, M, step)
            c_new = _advance(tl.zeros_like(z), rate, _top_gradient(z, wout_ptr, offs_n, N))
            tl.store(state_ptr + idx, c_new, mask=ok)
            _store_rounded(x_ptr + idx, c_new, ok, ACT_BF16)
        else:  # step 0's act1, as EPI_GRAM_ACT would make it
            _store_rounded(x_ptr + idx, _relu(z), ok, ACT_BF16)
    elif EPILOGUE == EPI_GRAM_ACT:
        z = tl.load(state_ptr + idx, mask=ok, other=0.0) + acc
        _store_rounded(out_ptr + idx, _relu(z), ok, ACT_BF16)
    elif EPILOGUE == EPI_GRAM_COEF or EPILOGUE == EPI_COEF:
        if EPILOGUE == EPI_GRAM_COEF:
            z = tl.load(state_ptr + idx, mask=ok, other=0.0) + acc
            g = _top_gradient(z, wout_ptr, offs_n, N)
        else:
            prev = tl.load(maskin_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            g = acc * tl.where(prev > 0, 1.0, 0.0)
        rate = _step_rates(alpha_ptr, steps_ptr, offs_m, M, step)
        c_new = _advance(tl.load(out_ptr + idx, mask=ok, other=0.0), rate, g)
        tl.store(out_ptr + idx, c_new, mask=ok)
        _store_rounded(x_ptr + idx, c_new, ok, ACT_BF16)
    elif EPILOGUE == EPI_STORE:
        tl.store(out_ptr + idx, acc, mask=ok)
        if PROJECT:
            sq = tl.sum(tl.where(ok, _square64(acc), 0.0), axis=1)
            tl.store(sq_out_ptr + offs_m * n_sq + pid_n, sq, mask=offs_m < M)
    elif EPILOGUE == EPI_GRAM_PART:
        tl.store(out_ptr + idx, acc, mask=ok)
        coef = tl.load(maskin_ptr + idx, mask=ok, other=0.0)
        part = tl.sum(tl.where(ok, coef.to(tl.float64) * acc.to(tl.float64), 0.0), axis=1)
        tl.store(sq_out_ptr + offs_m * n_sq + pid_n, part, mask=offs_m < M)
    else:
        rate = _step_rates(alpha_ptr, steps_ptr, offs_m, M, step)
        u_old = tl.load(out_ptr + idx, mask=ok & _not_first(offs_m, first)[:, None], other=0.0)
        if PROJECT:
            # the previous step's projection, for the rows that took that step
            u_old = u_old * _row_scale(sq_in_ptr, offs_m, M, n_sq, radius_ptr, first,
                                       steps_ptr, step - 1, SQ_CHUNK)[:, None]
        u_new = _advance(u_old, rate, acc)
        tl.store(out_ptr + idx, u_new, mask=ok)
        if PROJECT:
            sq = tl.sum(tl.where(ok, _square64(u_new), 0.0), axis=1)
            tl.store(sq_out_ptr + offs_m * n_sq + pid_n, sq, mask=offs_m < M)
        else:  # the next step's first operand, so that no product rebuilds it from s and u
            s = tl.load(state_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            _store_rounded(x_ptr + idx, s + u_new, ok, ACT_BF16)


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["step", "first", "M"])
def _ascent_gemm_kernel(
        a_ptr, u_ptr, wout_ptr, w_ptr, stride_wk, stride_wn,
        out_ptr, bias_ptr, maskin_ptr, state_ptr, x_ptr, alpha_ptr, steps_ptr,
        sq_in_ptr, sq_out_ptr, n_sq, radius_ptr, step, first,
        part_ptr, count_ptr, n_split, a_desc, w_desc,
        M, N, K, k_split,
        PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, DOT: tl.constexpr,
        INTERPRET: tl.constexpr, PROJECT: tl.constexpr, ACT_BF16: tl.constexpr,
        SQ_CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        FIXUP: tl.constexpr, FIX_BN: tl.constexpr, W_EVICT: tl.constexpr, TMA: tl.constexpr,
        W_K_CONTIGUOUS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PDL: tl.constexpr):
    """One product of the ascent step for a [BM, BN] tile and one K split (grid n, m, split).

    ``FIXUP`` (split K finished in place, no reduce launch): every split stores its partial
    sum, counts itself in its tile's counter, and the split that arrives last adds all the
    partials in split order and applies the epilogue (so the bits do not depend on which
    split that is), then zeroes the counter for the next product. It does so ``FIX_BN``
    columns at a time: summing whole wide tiles (128x256) would hold two of them in
    registers and spill (see ``fixup_block_n``).

    ``TMA``: the operand tiles come through tensor descriptors (``a_desc`` over A [M, K];
    ``w_desc`` over W as stored, [N, K] going forward (``W_K_CONTIGUOUS``, transposed in
    shared memory) or [K, N] going backward): Hopper's bulk copy engine moves whole tiles
    into shared memory with no per-element address arithmetic, and pads out-of-range rows
    and columns with zeros, which is what the masks of the plain loads give.

    ``PDL`` (launched as a programmatic dependent launch): the kernel may start while the
    previous one still runs, so it waits for it (``gdc_wait``) before its first global read
    or write, and lets the next one start launching at once; what overlaps is the launch
    itself, not the work."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    scale = tl.full((BM,), 1.0, tl.float32)
    if PROLOGUE == PRO_STATE:
        if PROJECT:
            scale = _row_scale(sq_in_ptr, offs_m, M, n_sq, radius_ptr, first, steps_ptr,
                               step - 1, SQ_CHUNK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    # fixed order: the same bits every run
    for k0 in tl.range(k_lo, k_hi, BK, warp_specialize=WARP_SPECIALIZE):
        if TMA:
            a = a_desc.load([pid_m * BM, k0])
            if W_K_CONTIGUOUS:
                w = w_desc.load([pid_n * BN, k0]).T
            else:
                w = w_desc.load([k0, pid_n * BN])
        else:
            offs_k = k0 + tl.arange(0, BK)
            a = _load_a(a_ptr, u_ptr, offs_m, offs_k, M, K, scale, first, PROLOGUE, DOT)
            w = _load_w(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn, W_EVICT)
        acc = _mma(a, w, acc, DOT, INTERPRET)
    if FIXUP:
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        idx = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_s * M * N + idx, acc, mask=ok)
        tl.debug_barrier()  # all of this program's stores precede the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:
            tl.atomic_xchg(count_ptr + tile, 0)
            for c in tl.static_range(0, BN // FIX_BN):
                offs_c = pid_n * BN + c * FIX_BN + tl.arange(0, FIX_BN)
                ok_c = (offs_m[:, None] < M) & (offs_c[None, :] < N)
                idx_c = offs_m[:, None] * N + offs_c[None, :]
                total = tl.zeros((BM, FIX_BN), dtype=tl.float32)
                for s in range(0, n_split):  # split order, as the reduce kernel adds them
                    total += tl.load(part_ptr + s * M * N + idx_c, mask=ok_c, other=0.0,
                                     cache_modifier=".cg")
                _epilogue(total, offs_m, offs_c, pid_n, M, N, out_ptr, bias_ptr, maskin_ptr,
                          wout_ptr, state_ptr, x_ptr, alpha_ptr, steps_ptr, sq_in_ptr,
                          sq_out_ptr, n_sq, radius_ptr, step, first, EPILOGUE, PROJECT, ACT_BF16,
                          SQ_CHUNK)
    elif EPILOGUE == EPI_PARTIAL:
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=ok)
    else:
        _epilogue(acc, offs_m, offs_n, pid_n, M, N, out_ptr, bias_ptr, maskin_ptr, wout_ptr,
                  state_ptr, x_ptr, alpha_ptr, steps_ptr, sq_in_ptr, sq_out_ptr, n_sq, radius_ptr,
                  step, first, EPILOGUE, PROJECT, ACT_BF16, SQ_CHUNK)


@triton.jit(do_not_specialize=["step", "first", "M"])
def _splitk_reduce_kernel(
        part_ptr, n_split, out_ptr, bias_ptr, maskin_ptr, wout_ptr, state_ptr, x_ptr,
        alpha_ptr, steps_ptr,
        sq_in_ptr, sq_out_ptr, n_sq, radius_ptr, step, first, M, N,
        EPILOGUE: tl.constexpr, PROJECT: tl.constexpr, ACT_BF16: tl.constexpr,
        SQ_CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """Add the K splits of a product in split order (deterministic) and apply its epilogue.

    ``BN`` is the product's (max_norm's partial sums of squares are per row and BN-wide
    column tile); ``BM`` may be smaller than the product's, for more programs over the same
    elements (the sums and the epilogue are per element or per row, so the bits do not
    change). ``PDL``: launched as a programmatic dependent launch, like the product."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + s * M * N + idx, mask=ok, other=0.0)
    _epilogue(acc, offs_m, offs_n, pid_n, M, N, out_ptr, bias_ptr, maskin_ptr, wout_ptr,
              state_ptr, x_ptr, alpha_ptr, steps_ptr, sq_in_ptr, sq_out_ptr, n_sq, radius_ptr,
              step, first, EPILOGUE, PROJECT, ACT_BF16, SQ_CHUNK)


@triton.jit(do_not_specialize=["M", "gate_step"])
def _apply_scale_kernel(u_ptr, sq_ptr, n_sq, radius_ptr, steps_ptr, gate_step, M, N,
                        SQ_CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """u = min(1, radius / ||u_raw||) * u_raw after the last step (the deferred projection),
    for rows with more than ``gate_step`` steps (the direct form: those that took the last
    step; the Gram form: -1, every row, whose last step is projected here)."""
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    scale = _row_scale(sq_ptr, offs_m, M, n_sq, radius_ptr, 0, steps_ptr, gate_step, SQ_CHUNK)
    tl.store(u_ptr + idx, tl.load(u_ptr + idx, mask=ok, other=0.0) * scale[:, None], mask=ok)


@triton.jit(do_not_specialize=["step", "M"])
def _gram_finish_kernel(image_ptr, base_ptr, coef_ptr, coef_op_ptr, act_ptr, wout_ptr,
                        alpha_ptr, steps_ptr, sq_ptr, n_sq, radius_ptr, step, M, N,
                        ONE_LAYER: tl.constexpr, ACT_BF16: tl.constexpr,
                        SQ_CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The Gram form's step under max_norm, after the product y = c' G (``EPI_GRAM_PART``):
    the projection's factor b = min(1, radius / sqrt(c' G c'^T)) from the row sums, then
    c = b c' and z1 = z1(s) + b y. One hidden layer: c' = c + rate * w_out * (z1 > 0) for the
    next step, stored with its operand copy. More layers: act1 = relu(z1) and c stored (the
    product through W2 adds the step's gradient to c)."""
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    # b projects c' after step - 1, for the rows with a step still to take from there (a
    # row's last step is projected on u at the end, as when it is the batch's last)
    scale = _row_scale(sq_ptr, offs_m, M, n_sq, radius_ptr, 0, steps_ptr, step,
                       SQ_CHUNK)[:, None]
    z = tl.load(base_ptr + idx, mask=ok, other=0.0) + scale * tl.load(image_ptr + idx, mask=ok,
                                                                     other=0.0)
    coef = scale * tl.load(coef_ptr + idx, mask=ok, other=0.0)
    if ONE_LAYER:
        rate = _step_rates(alpha_ptr, steps_ptr, offs_m, M, step)
        coef = _advance(coef, rate, _top_gradient(z, wout_ptr, offs_n, N))
        _store_rounded(coef_op_ptr + idx, coef, ok, ACT_BF16)
    else:
        _store_rounded(act_ptr + idx, _relu(z), ok, ACT_BF16)
    tl.store(coef_ptr + idx, coef, mask=ok)


# ----------------------------------------------------------------------------- host side
def fixup_block_n(plan: GemmPlan, fixup: bool, project: bool, interpret: bool) -> int:
    """Columns the fix-up sums and finishes at a time: 64 (16 under the interpreter, whose
    tiles are 16 wide, so that tests with 32-column tiles take two chunks), whole tiles
    without fix-up and under max_norm (the update epilogue's per-row sum of squares over the
    whole tile must have the reduce kernel's bits). Compiled for sm_90, fix-up over whole
    128x256 tiles spilled registers in every epilogue (benchmarks/sm90_resources.py)."""
    if not fixup or project:
        return plan.block_n
    return min(plan.block_n, 16 if interpret else 64)


@dataclass
class _Product:
    """One launch of the step: operands, plan and epilogue buffers."""

    prologue: int
    epilogue: int
    a: Tensor
    w: Tensor
    stride_wk: int
    stride_wn: int
    out: Tensor
    bias: Tensor
    maskin: Tensor
    M: int
    N: int
    K: int
    plan: GemmPlan
    descriptors: tuple | None = None  # (a_desc, w_desc) where the product loads through TMA
    state: Tensor | None = None  # the epilogue's state_ptr / x_ptr, where not the ascent's
    x_out: Tensor | None = None


def _check_inputs(mlp: "MLPWeights", states: Tensor, alpha: Tensor, steps: Tensor,
                  num_iterations: int, max_norm: "float | Tensor | None",
                  precision: str | None) -> str:
    """Validate shapes, dtypes and devices; return the operand precision to use."""
    weights, biases = list(mlp.weights), list(mlp.biases)
    hidden = len(weights) - 1
    if not 1 <= hidden <= MAX_HIDDEN_LAYERS:
        raise ValueError(f"triton_ascend supports value heads with 1 to {MAX_HIDDEN_LAYERS} "
                         f"hidden layers, got {hidden} (len(weights) = {len(weights)})")
    if len(biases) != len(weights):
        raise ValueError(f"{len(weights)} weight matrices but {len(biases)} bias vectors")
    fan_in = weights[0].shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != fan_in or b.shape != (w.shape[0],):
            raise ValueError(f"layer {i}: weight {list(w.shape)} / bias {list(b.shape)} do not "
                             f"chain from width {fan_in}")
        if not (w.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"layer {i}: weights must be floating point")
        if w.device != states.device or b.device != states.device:
            raise ValueError(f"layer {i} is on {w.device}, states on {states.device}")
        fan_in = w.shape[0]
    if fan_in != 1:
        raise ValueError(f"the last layer must have one output, got {weights[-1].shape[0]}")
    if states.dim() != 2 or states.shape[1] != weights[0].shape[1]:
        raise ValueError(f"states must be [B, {weights[0].shape[1]}], got {list(states.shape)}")
    if states.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"states must be float32, bfloat16 or float16, got {states.dtype}")
    rows = states.shape[0]
    if alpha.shape != (rows,) or steps.shape != (rows,):
        raise ValueError(f"alpha {list(alpha.shape)} and steps {list(steps.shape)} must be [{rows}]")
    if alpha.device != states.device or steps.device != states.device:
        raise ValueError("alpha and steps must be on the states' device")
    if steps.is_floating_point() or steps.is_complex():
        raise ValueError(f"steps must be an integer tensor, got {steps.dtype}")
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    if isinstance(max_norm, Tensor):
        if max_norm.shape != (rows,) or max_norm.device != states.device \
                or not max_norm.is_floating_point():
            raise ValueError(f"a per-row max_norm must be a float [{rows}] tensor on the "
                             f"states' device, got {max_norm.dtype} {list(max_norm.shape)} on "
                             f"{max_norm.device}")
    elif max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    if precision is None:
        precision = "bf16" if weights[0].dtype == torch.bfloat16 else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and any(w.dtype != torch.bfloat16 for w in weights):
        raise ValueError("precision 'bf16' needs bfloat16 weight matrices")
    _check_backend(states.device)
    return precision


def _check_backend(device: torch.device) -> None:
    """Fail clearly where the kernels cannot run: CPU needs interpreted kernels, CUDA
    compiled ones (the interpreter takes CUDA tensors, but there this module's switch
    ``interpret=device.type == "cpu"`` is off and the interpreter multiplies bf16 operands
    as raw integers: the edits would be finite garbage)."""
    from . import kernels_interpreted  # here: an import above the kernels would move them

    interpreted = kernels_interpreted()
    if device.type == "cuda":
        if interpreted:
            raise RuntimeError(
                f"triton_ascend was given {device} tensors, but this process's Triton kernels "
                "run in Triton's interpreter (TRITON_INTERPRET was set when "
                "vllm_recontrol.kernels.value_ascent was imported), which computes wrong "
                "bf16 products on GPU tensors: unset TRITON_INTERPRET (it is for CPU tests) "
                "and start the process again")
        return
    if device.type != "cpu":
        raise ValueError(f"triton_ascend runs on CUDA devices (or CPU under TRITON_INTERPRET=1), "
                         f"got {device}")
    if not interpreted:
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "vllm_recontrol.kernels.value_ascent is imported (Triton reads it at "
                           "@triton.jit time)")


def overrides_by_direction(overrides: Mapping | None) -> dict[str, dict]:
    """``plan_overrides`` per direction: a flat key applies to both, a nested
    ``{"forward": {...}, "backward": {...}}`` to one (and wins over a flat key)."""
    by_direction: dict[str, dict] = {"forward": {}, "backward": {}}
    for key, value in (overrides or {}).items():
        if key in by_direction:
            by_direction[key] = {**by_direction[key], **value}
        else:
            for direction in by_direction.values():
                direction.setdefault(key, value)
    return by_direction


def _planner(states: Tensor, precision: str, overrides: Mapping | None, batch_invariant: bool):
    """``plan(N, K, k_contig, w)``: the launch plan of a product of this batch (``k_contig``:
    W read along its rows' contiguous K, the forward direction, whose overrides it takes)."""
    rows = states.shape[0]
    interpret = states.device.type == "cpu"
    n_programs = _device_programs(states.device)
    by_direction = overrides_by_direction(overrides)

    def plan(N: int, K: int, k_contig: bool, w: Tensor) -> GemmPlan:
        return plan_gemm(rows, N, K, w_k_contiguous=k_contig, weight_bytes=w.element_size(),
                         precision=precision, n_programs=n_programs, interpret=interpret,
                         overrides=by_direction["forward" if k_contig else "backward"],
                         batch_invariant=batch_invariant)
    return plan


def _plan_products(weights: list[Tensor], biases: list[Tensor], states: Tensor, x: Tensor,
                   u: Tensor, acts: list[Tensor], backs: list[Tensor], precision: str,
                   overrides: Mapping[str, int] | None, project: bool,
                   batch_invariant: bool = False) -> list[_Product]:
    """The 2L launches of one step, in order: forward layers 0..L-1, backward L-1..0.

    The first product reads x = s + u, written by the previous step's update epilogue, except
    under max_norm, where it builds s + scale * u itself. The last forward product stores the
    first backward operand w_out * relu'(z) in place of its activation."""
    hidden = len(weights) - 1
    rows = states.shape[0]
    plan = _planner(states, precision, overrides, batch_invariant)
    products = []
    for i in range(hidden):  # forward: Wop[k, n] = W_i[n, k]
        w = weights[i]
        n, k = w.shape
        from_state = i == 0 and project
        products.append(_Product(
            PRO_STATE.value if from_state else PRO_PLAIN.value,
            EPI_FWD_OUT.value if i == hidden - 1 else EPI_FWD.value,
            states if from_state else (x if i == 0 else acts[i - 1]), w, 1, w.stride(0),
            acts[i], biases[i], acts[i], rows, n, k, plan(n, k, True, w)))
    for i in range(hidden - 1, -1, -1):  # backward: Wop[k, n] = W_i[k, n]
        w = weights[i]
        k, n = w.shape
        last = i == 0
        products.append(_Product(
            PRO_PLAIN.value, EPI_UPDATE.value if last else EPI_MID.value,
            acts[hidden - 1] if i == hidden - 1 else backs[i], w, w.stride(0), 1,
            u if last else backs[i - 1], biases[i], acts[i - 1] if not last else acts[0],
            rows, n, k, plan(n, k, False, w)))
    return products


def tma_eligible(p: _Product, precision: str) -> bool:
    """Whether the product can load its tiles through tensor descriptors: bf16 operands
    stored as plain row-major matrices (not the max_norm prologue, which builds its left
    operand from s and u), rows of a multiple of 16 bytes (a descriptor's stride rule), and
    tile sides the bulk copy engine takes (at most 256 elements)."""
    plan = p.plan
    return (TensorDescriptor is not None and precision == "bf16"
            and p.prologue == PRO_PLAIN.value
            and p.a.dtype == torch.bfloat16 and p.w.dtype == torch.bfloat16
            and p.K % 8 == 0 and p.N % 8 == 0 and p.a.is_contiguous() and p.w.is_contiguous()
            and max(plan.block_m, plan.block_n, plan.block_k) <= 256)


def _descriptors(p: _Product) -> tuple:
    """(a_desc, w_desc) over the product's operands as stored (W is [N, K] going forward,
    [K, N] going backward), each with its tile as the block."""
    plan = p.plan
    a_desc = TensorDescriptor(p.a, [p.M, p.K], [p.K, 1], [plan.block_m, plan.block_k])
    if p.stride_wk == 1:
        w_desc = TensorDescriptor(p.w, [p.N, p.K], [p.K, 1], [plan.block_n, plan.block_k])
    else:
        w_desc = TensorDescriptor(p.w, [p.K, p.N], [p.N, 1], [plan.block_k, plan.block_n])
    return a_desc, w_desc


def _launch(p: _Product, ctx: dict, step: int) -> None:
    """Launch one product (and its split-K reduce), retrying with fewer pipeline stages if the
    chosen depth does not fit in shared memory."""
    plan = p.plan
    splits = plan.splits(p.K)
    fixup = plan.finishes_in_place(p.K)
    reduce_after = splits > 1 and not fixup
    epilogue = EPI_PARTIAL.value if reduce_after else p.epilogue
    out = ctx["partial"] if reduce_after else p.out
    state = ctx["states"] if p.state is None else p.state
    x_out = ctx["x"] if p.x_out is None else p.x_out
    grid = (triton.cdiv(p.N, plan.block_n), triton.cdiv(p.M, plan.block_m), splits)
    tail = dict(sq_in_ptr=ctx["sq_in"], sq_out_ptr=ctx["sq_out"], n_sq=ctx["n_sq"],
                radius_ptr=ctx["radius"], step=step, first=int(step == 0))
    flags = dict(PROJECT=ctx["project"], ACT_BF16=ctx["act_bf16"], SQ_CHUNK=_SQ_CHUNK)
    tma = p.descriptors is not None
    a_desc, w_desc = p.descriptors or (None, None)
    pdl = bool(plan.pdl) and ctx["sm90"] and not ctx["interpret"] and gdc_wait is not None
    fit_key = (plan, p.prologue, ctx["precision"], p.w.dtype, p.a.dtype, tma, pdl)
    stages = ctx["stages"].get(fit_key, plan.num_stages)
    while True:
        try:
            _ascent_gemm_kernel[grid](
                p.a, ctx["u"], ctx["w_out"], p.w, p.stride_wk, p.stride_wn,
                out, p.bias, p.maskin, state, x_out, ctx["alpha"], ctx["steps"],
                **tail, part_ptr=ctx["partial"], count_ptr=ctx["counters"], n_split=splits,
                a_desc=a_desc, w_desc=w_desc, M=p.M, N=p.N, K=p.K, k_split=plan.k_split(p.K),
                PROLOGUE=p.prologue, EPILOGUE=epilogue, DOT=ctx["precision"],
                INTERPRET=ctx["interpret"], **flags,
                BM=plan.block_m, BN=plan.block_n, BK=plan.block_k, FIXUP=fixup,
                FIX_BN=fixup_block_n(plan, fixup, ctx["project"], ctx["interpret"]),
                W_EVICT=plan.weight_eviction, TMA=tma, W_K_CONTIGUOUS=p.stride_wk == 1,
                WARP_SPECIALIZE=bool(plan.warp_specialize) and tma and not ctx["interpret"],
                PDL=pdl, launch_pdl=pdl,
                num_warps=plan.num_warps, num_stages=stages)
            break
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            ctx["stages"][fit_key] = stages
    if reduce_after:
        # rows of REDUCE_BLOCK_M: the product's tiles are few when K is split (that is why
        # it is), and a program per tile would leave most multiprocessors idle here too
        bm = min(plan.block_m, REDUCE_BLOCK_M)
        _splitk_reduce_kernel[(grid[0], triton.cdiv(p.M, bm))](
            ctx["partial"], splits, p.out, p.bias, p.maskin, ctx["w_out"], state,
            x_out, ctx["alpha"], ctx["steps"], **tail,
            M=p.M, N=p.N, EPILOGUE=p.epilogue, **flags, BM=bm, BN=plan.block_n, PDL=pdl,
            launch_pdl=pdl, num_warps=4 if bm * plan.block_n <= 4096 else 8)


REDUCE_BLOCK_M = 16  # rows per program of the split-K reduce kernel


def _checked_out(out: Tensor | None, rows: int, dim: int, device: torch.device) -> Tensor:
    """The caller's u buffer, checked, or a new one."""
    if out is None:
        return torch.empty(rows, dim, device=device, dtype=torch.float32)
    if out.shape != (rows, dim) or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device != device:
        raise ValueError(f"out must be a contiguous float32 [{rows}, {dim}] tensor on {device}")
    return out


def _nothing_to_compute(out: Tensor, num_iterations: int) -> Tensor | None:
    """u without a launch where there is nothing to compute: no rows, or no steps (u = 0)."""
    if out.shape[0] == 0:
        return out
    if num_iterations == 0:
        return out.zero_()
    return None


def _activation_buffers(weights: list[Tensor], rows: int, device: torch.device,
                        act_dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Stored activations (one per hidden layer) and backward products (all but the first)."""
    widths = [w.shape[0] for w in weights[:-1]]
    acts = [torch.empty(rows, h, device=device, dtype=act_dtype) for h in widths]
    backs = [torch.empty(rows, h, device=device, dtype=act_dtype) for h in widths[:-1]]
    return acts, backs


def _split_scratch(products: list[_Product], rows: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Split-K partial sums (the largest product's) and fix-up counters (zero here; every
    product's last split zeroes its own again)."""
    partial_numel = max([p.plan.splits(p.K) * rows * p.N for p in products
                         if p.plan.splits(p.K) > 1] + [1])
    partial = torch.empty(partial_numel, device=device, dtype=torch.float32)
    tiles = [triton.cdiv(rows, p.plan.block_m) * triton.cdiv(p.N, p.plan.block_n)
             for p in products if p.plan.finishes_in_place(p.K)]
    counters = torch.zeros(max(tiles + [1]), device=device, dtype=torch.int32)
    return partial, counters


def _attach_descriptors(products: list[_Product], ctx: dict) -> None:
    """Tensor descriptors for the products whose plan loads through TMA: once per ascent,
    not per launch."""
    for p in products:
        if p.plan.tma and ctx["sm90"] and tma_eligible(p, ctx["precision"]):
            p.descriptors = _descriptors(p)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch on ``device``'s tensors in: Triton launches on the *current*
    CUDA device and its stream, never the tensors' device, so states on cuda:1 while cuda:0
    is current would run the kernels on cuda:0's stream with cuda:1 pointers (a fault, or
    over peer access unordered with the torch ops around them). Free when the device is
    already current, and safe inside graph capture; nothing to do off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_the_states_device(ascent: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``ascent(mlp, states32, ...)`` (its allocations, copies and launches) under
    ``launch_device(states32.device)``."""
    @functools.wraps(ascent)
    def on_device(mlp: "MLPWeights", states32: Tensor, *args, **kwargs) -> Tensor:
        with launch_device(states32.device):
            return ascent(mlp, states32, *args, **kwargs)
    return on_device


# Pipeline depth that fits in shared memory, per launch shape, once a deeper one did not.
_STAGES_THAT_FIT: dict[tuple, int] = {}


@_on_the_states_device
def triton_ascend(
    mlp: "MLPWeights",
    states32: Tensor,
    alpha: Tensor,
    steps: Tensor,
    num_iterations: int,
    max_norm: float | Tensor | None = None,
    *,
    precision: str | None = None,
    out: Tensor | None = None,
    plan_overrides: Mapping[str, int] | None = None,
    poison_scratch: bool = False,
    batch_invariant: bool = False,
) -> Tensor:
    """Return u after ``num_iterations`` ascent steps; row r moves only while ``k < steps[r]``.

    Same contract as ``ascend_float32``: ``states32`` is ``[B, d]`` (float32; bfloat16 and
    float16 are converted inside), ``alpha`` ``[B]`` float, ``steps`` ``[B]`` integer, all on the
    weights' device; ``max_norm`` projects u onto ||u|| <= max_norm after every step (a float
    ``[B]`` tensor gives each row its own radius: inf leaves a row unprojected; its values
    are not checked, which would cost a host sync: 0 or less keeps a row's u at 0). Weights
    may be float32 or bfloat16. Keyword-only extras: ``precision`` ("ieee", "tf32", "bf16";
    default "bf16" for bf16 weights, else "ieee"), ``out`` (a float32 ``[B, d]`` buffer to
    write u into), ``plan_overrides`` (see ``plan_gemm``) and ``poison_scratch`` (fill the
    scratch buffers with NaN first, for tests). ``plan_overrides`` keys apply to every product;
    a nested ``{"forward": {...}, "backward": {...}}`` applies to one direction (forward
    products read W along K, backward products along N). ``batch_invariant``: launch plans
    that do not depend on the row count, so that each row's result is the same bits alone
    or in any batch (what vLLM's ``VLLM_BATCH_INVARIANT=1`` asks of every kernel); slower at
    large batch. No host synchronisation; CUDA-graph safe once the kernels are compiled.
    """
    precision = _check_inputs(mlp, states32, alpha, steps, num_iterations, max_norm, precision)
    device, rows, dim = states32.device, states32.shape[0], states32.shape[1]
    weights = [w.contiguous() for w in mlp.weights]
    biases = [b.contiguous() for b in mlp.biases]
    out = _checked_out(out, rows, dim, device)
    if (done := _nothing_to_compute(out, num_iterations)) is not None:
        return done

    act_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    acts, backs = _activation_buffers(weights, rows, device, act_dtype)
    states32 = states32.contiguous()
    radius = _radius_rows(max_norm, rows, device)
    project = radius is not None
    x = states32 if project else torch.empty(rows, dim, device=device, dtype=act_dtype)
    products = _plan_products(weights, biases, states32, x, out, acts, backs, precision,
                              plan_overrides, project, batch_invariant)
    update = products[-1]
    n_sq = triton.cdiv(dim, update.plan.block_n)
    partial, counters = _split_scratch(products, rows, device)
    sq = torch.empty(2, rows, n_sq, device=device, dtype=torch.float64)
    if poison_scratch:
        for t in [*acts, *backs, partial, sq] + ([] if project else [x]):
            t.fill_(float("nan"))
    if not project:
        x.copy_(states32)  # step 0's operand (a bf16 buffer rounds to nearest even)

    ctx = dict(u=out, w_out=weights[-1], states=states32, x=x,
               alpha=alpha.to(torch.float32).contiguous(),
               steps=steps.contiguous(), partial=partial, counters=counters, n_sq=n_sq,
               radius=radius if project else out,  # a float32 pointer, not read unprojected
               project=project, act_bf16=precision == "bf16",
               precision=precision, interpret=device.type == "cpu", stages=_STAGES_THAT_FIT,
               sm90=_sm90_features(device))
    _attach_descriptors(products, ctx)
    for step in range(num_iterations):
        ctx["sq_out"], ctx["sq_in"] = sq[step % 2], sq[(step + 1) % 2]
        for p in products:
            _launch(p, ctx, step)
    if project:
        bm, bn = 16, 64
        grid = (triton.cdiv(dim, bn), triton.cdiv(rows, bm))
        _apply_scale_kernel[grid](out, sq[(num_iterations - 1) % 2], n_sq, radius,
                                  ctx["steps"], num_iterations - 1, rows, dim,
                                  SQ_CHUNK=_SQ_CHUNK, BM=bm, BN=bn)
    return out


@_on_the_states_device
def triton_ascend_gram(
    mlp: "MLPWeights",
    states32: Tensor,
    alpha: Tensor,
    steps: Tensor,
    num_iterations: int,
    max_norm: float | Tensor | None = None,
    *,
    precision: str | None = None,
    out: Tensor | None = None,
    plan_overrides: Mapping[str, int] | None = None,
    poison_scratch: bool = False,
    batch_invariant: bool = False,
) -> Tensor:
    """``triton_ascend``'s ascent in the Gram form (``vllm_recontrol.ascent``): the rows keep
    coefficients c with u = c W1, and a step's product with W1 forward and backward becomes
    one product with G = W1 W1^T (``mlp.first_gram``, in the weights' dtype):

    * once: z1(s) = s W1^T + b1, whose epilogue also makes step 0's start, where c = 0 and
      z1 = z1(s): c's first update with one hidden layer (``EPI_BASE_COEF``), act1 with
      more (``EPI_BASE``);
    * each later step, one hidden layer: c G, then z1 = z1(s) + c G,
      c += rate * w_out * (z1 > 0) in its epilogue (``EPI_GRAM_COEF``; the operand c goes
      to one of two buffers by step parity, since every program reads all of the previous
      one);
    * each step, L >= 2 layers: (after step 0) c G with ``act1 = relu(z1(s) + c G)`` as
      epilogue, the products through W2..WL forward and back as in the direct form, and the
      one through W2 ends with c += rate * acc * (act1 > 0) (``EPI_COEF``);
    * once: u = c W1 (``EPI_STORE``).

    Under ``max_norm`` c is kept unprojected (c'), and each later step's product y = c' G also
    gives ||u'||^2 = c' G c'^T as per-row partial sums (``EPI_GRAM_PART``); a small kernel
    (``_gram_finish_kernel``) then applies b = min(1, radius / ||u'||): c = b c',
    z1 = z1(s) + b y, and either the one-hidden-layer update or act1. After the last step
    u' = c' W1 is scaled by its own norm (the direct form's final kernel).

    So n steps take n - 1 products with G (step 0's would multiply zeros), the same bits as
    running it. Same contract and keywords as ``triton_ascend``; in bf16 mode c's operand
    copy is rounded to bf16, c itself stays fp32. Deterministic for the same reasons.
    """
    precision = _check_inputs(mlp, states32, alpha, steps, num_iterations, max_norm, precision)
    device, rows, dim = states32.device, states32.shape[0], states32.shape[1]
    weights = [w.contiguous() for w in mlp.weights]
    biases = [b.contiguous() for b in mlp.biases]
    hidden, first = len(weights) - 1, weights[0].shape[0]
    gram = mlp.first_gram
    if gram is None or gram.shape != (first, first) or gram.dtype != weights[0].dtype \
            or gram.device != device:
        raise ValueError("triton_ascend_gram needs mlp.first_gram = W1 W1^T "
                         f"([{first}, {first}], {weights[0].dtype}, on {device}; "
                         "vllm_recontrol.ascent.with_first_gram), got "
                         + ("None" if gram is None else f"{list(gram.shape)} {gram.dtype} on "
                            f"{gram.device}"))
    gram = gram.contiguous()
    out = _checked_out(out, rows, dim, device)
    if (done := _nothing_to_compute(out, num_iterations)) is not None:
        return done

    act_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    acts, backs = _activation_buffers(weights, rows, device, act_dtype)
    radius = _radius_rows(max_norm, rows, device)
    project = radius is not None
    base = torch.empty(rows, first, device=device, dtype=torch.float32)
    # c: written whole by step 0 with one hidden layer; with more, EPI_COEF adds to zeros
    coef = (torch.empty if hidden == 1 else torch.zeros)(rows, first, device=device,
                                                         dtype=torch.float32)
    # c's operand: written by the product that reads it without max_norm (one layer), so two
    coef_ops = [torch.empty(rows, first, device=device, dtype=act_dtype)
                for _ in range(2 if hidden == 1 and not project else 1)]
    image = torch.empty(rows, first, device=device, dtype=torch.float32) if project else None
    states32 = states32.contiguous()
    x = torch.empty(rows, dim, device=device, dtype=act_dtype)
    plan = _planner(states32, precision, plan_overrides, batch_invariant)
    w0, b0 = weights[0], biases[0]

    if hidden == 1:  # step 0 ends with c and the operand step 1's product reads
        base_product = _Product(PRO_PLAIN.value, EPI_BASE_COEF.value, x, w0, 1, w0.stride(0),
                                base, b0, base, rows, first, dim, plan(first, dim, True, w0),
                                state=coef, x_out=coef_ops[1 % len(coef_ops)])
    else:  # step 0's products through W2.. read act1 = relu(z1(s))
        base_product = _Product(PRO_PLAIN.value, EPI_BASE.value, x, w0, 1, w0.stride(0), base,
                                b0, base, rows, first, dim, plan(first, dim, True, w0),
                                x_out=acts[0])
    gram_plan = plan(first, first, True, gram)  # G is symmetric: G[n, k] = G[k, n]
    if project:
        gram_products = [_Product(PRO_PLAIN.value, EPI_GRAM_PART.value, coef_ops[0], gram, 1,
                                  first, image, b0, coef, rows, first, first, gram_plan)]
    elif hidden == 1:
        gram_products = [_Product(PRO_PLAIN.value, EPI_GRAM_COEF.value, coef_ops[j], gram, 1,
                                  first, coef, b0, coef, rows, first, first, gram_plan,
                                  state=base, x_out=coef_ops[1 - j]) for j in range(2)]
    else:
        gram_products = [_Product(PRO_PLAIN.value, EPI_GRAM_ACT.value, coef_ops[0], gram, 1,
                                  first, acts[0], b0, acts[0], rows, first, first, gram_plan,
                                  state=base)]
    step_products = []
    for i in range(1, hidden):  # forward through W2..WL, as in the direct form
        w = weights[i]
        n, k = w.shape
        step_products.append(_Product(
            PRO_PLAIN.value, EPI_FWD_OUT.value if i == hidden - 1 else EPI_FWD.value,
            acts[i - 1], w, 1, w.stride(0), acts[i], biases[i], acts[i], rows, n, k,
            plan(n, k, True, w)))
    for i in range(hidden - 1, 0, -1):  # backward through WL..W2; W2's ends the step on c
        w = weights[i]
        k, n = w.shape
        ends = i == 1
        step_products.append(_Product(
            PRO_PLAIN.value, EPI_COEF.value if ends else EPI_MID.value,
            acts[hidden - 1] if i == hidden - 1 else backs[i], w, w.stride(0), 1,
            coef if ends else backs[i - 1], biases[i], acts[i - 1], rows, n, k,
            plan(n, k, False, w), x_out=coef_ops[0] if ends else None))
    final_product = _Product(PRO_PLAIN.value, EPI_STORE.value,
                             coef_ops[num_iterations % len(coef_ops)], w0, w0.stride(0), 1,
                             out, b0, out, rows, dim, first, plan(dim, first, False, w0))
    products = [base_product, *gram_products, *step_products, final_product]

    partial, counters = _split_scratch(products, rows, device)
    # max_norm's per-row partial sums: of c' * (c' G) by the G product's column tiles, and
    # of u'^2 by the last product's
    n_sq = {"gram": triton.cdiv(first, gram_plan.block_n),
            "final": triton.cdiv(dim, final_product.plan.block_n)}
    sq = {key: torch.empty(rows, n, device=device, dtype=torch.float64) if project else
          torch.empty(1, device=device, dtype=torch.float64) for key, n in n_sq.items()}
    if poison_scratch:
        for t in [*acts, *backs, partial, base, *coef_ops, *sq.values()] + (
                [image] if project else []) + ([coef] if hidden == 1 else []):
            t.fill_(float("nan"))
    x.copy_(states32)  # the first product's operand (a bf16 buffer rounds to nearest even)

    ctx = dict(u=out, w_out=weights[-1], states=base, x=x,
               alpha=alpha.to(torch.float32).contiguous(), steps=steps.contiguous(),
               partial=partial, counters=counters, n_sq=n_sq["gram"], sq_in=sq["gram"],
               sq_out=sq["gram"], radius=radius if project else out, project=project,
               act_bf16=precision == "bf16", precision=precision,
               interpret=device.type == "cpu", stages=_STAGES_THAT_FIT,
               sm90=_sm90_features(device))
    _attach_descriptors(products, ctx)
    _launch(base_product, ctx, 0)
    finish_grid = (triton.cdiv(first, 64), triton.cdiv(rows, 16))
    for step in range(num_iterations):
        if step > 0:  # step 0 was started by the base product's epilogue
            _launch(gram_products[step % len(gram_products)], ctx, step)
            if project:
                _gram_finish_kernel[finish_grid](
                    image, base, coef, coef_ops[0], acts[0], weights[-1], ctx["alpha"],
                    ctx["steps"], sq["gram"], n_sq["gram"], radius, step, rows, first,
                    ONE_LAYER=hidden == 1, ACT_BF16=precision == "bf16", SQ_CHUNK=_SQ_CHUNK,
                    BM=16, BN=64)
        for p in step_products:
            _launch(p, ctx, step)
    ctx.update(n_sq=n_sq["final"], sq_in=sq["final"], sq_out=sq["final"])
    _launch(final_product, ctx, 0)
    if project:
        _apply_scale_kernel[(triton.cdiv(dim, 64), triton.cdiv(rows, 16))](
            out, sq["final"], n_sq["final"], radius, ctx["steps"], -1, rows, dim,
            SQ_CHUNK=_SQ_CHUNK, BM=16, BN=64)
    return out


def _radius_rows(max_norm: float | Tensor | None, rows: int,
                 device: torch.device) -> Tensor | None:
    """max_norm as one float32 radius per row (None: unprojected)."""
    if max_norm is None:
        return None
    if isinstance(max_norm, Tensor):
        return max_norm.to(torch.float32).contiguous()
    return torch.full((rows,), float(max_norm), device=device, dtype=torch.float32)
