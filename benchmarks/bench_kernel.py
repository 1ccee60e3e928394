#!/usr/bin/env python3
"""Benchmark and GPU check of the fused Triton ascent kernel against the torch paths.

Timing (default): for each (hidden size d = widths, hidden layers, steps, batch B) every variant
runs the whole ascent (``steps`` iterations, all rows active) and is timed with
``triton.testing.do_bench`` (device events, median, L2 flushed between calls):

  autograd-fp16     the published reference loop: an fp16 nn.Sequential head, torch.optim.SGD
                    on the state, loss = -V(x).sum(), backward, step (weight grads included)
  torch-eager       the closed form with --torch-dtype weights (default bf16: bf16 products,
                    fp32 u, as in issue 3's table; fp32 runs ``ascent.ascend_float32``)
  torch-compile     torch.compile of one closed-form step, looped in Python
  torch-graph       torch-eager captured in one CUDA graph
  torch-fp32-graph  ``ascent.ascend_float32`` (fp32 weights, the project's reference and CPU
                    path) captured in one CUDA graph
  triton            ``triton_ascend`` launched from Python (weights --dtype, default bf16)
  triton-graph      ``triton_ascend`` captured in one CUDA graph
  triton-fp32-graph ``triton_ascend`` with fp32 weights (exact fp32 "ieee" products), one graph
  triton-tf32-graph ``triton_ascend`` with fp32 weights and tf32 tensor-core products, one graph
  triton-l2-graph   triton-graph with the hidden weight matrices in one buffer marked
                    persisting in L2 (an access-policy window on the capture stream, see
                    l2_window.py; issue 3's stretch goal). Set-aside lines survive do_bench's
                    L2 flush, so the head may stay resident from one timed call to the next,
                    as it would from one decode step to the next in a server
  triton-pdl-graph  triton-graph with every product launched as a programmatic dependent
                    launch (``pdl``: its launch overlaps the previous product; sm_90+)
  triton-evict-graph  triton-graph with the weights loaded with an L2 evict-last hint
                    (``EVICT_OVERRIDES``: unpipelined loads, which keep the hint, K split in 4
                    with fix-up for enough loads in flight); B <= 64 only, where the products
                    are weight reads (the stretch goal again, from inside the kernel)
  head-ascend       ``ValueHead.ascend`` as the engine calls it (auto: Triton, bf16 products,
                    the ascent replayed from the head's CUDA-graph cache; includes copying the
                    batch in and building the edited states)
  triton-gram-graph ``triton_ascend_gram``, the Gram form (``vllm_recontrol.ascent``: the
                    ascent on u = c W1 with G = W1 W1^T, one product a step fewer), one graph;
                    G is computed once per head, outside the timing, as the engine does
  torch-gram        the Gram form's closed form with --torch-dtype products (fp32:
                    ``ascent.ascend_gram_float32``), eager: beside torch-eager, what the
                    form saves on a CPU too
  torch-gram-graph  torch-gram captured in one graph
  head-ascend-gram  head-ascend with ``form="gram"`` (the Triton Gram kernel, replayed)
  triton-norm-graph, triton-gram-norm-graph, head-ascend-norm  triton-graph,
                    triton-gram-graph and head-ascend under per-row ``max_norm`` (radii
                    0.02-0.1, every third row uncapped, ``per_row_radii``): what the
                    projection costs (its first product builds s + scale * u itself)
  cublas-products-graph  not an ascent: its 2L matrix products alone (torch.mm, cuBLAS, in
                    the weights' dtype, chained through fixed buffers, no element-wise work),
                    one graph: how fast vendor GEMMs do the products at this batch size, to
                    tell what is left to gain in the kernel from what the floor asks beyond it

The Gram variants do less work than the floor counts (one product with G a step in place
of the first layer's two): they are timed against the same floor, so their "x floor" may fall
below 1.

The floor of a case is max(FLOPs / bf16 matmul rate, bytes / copy bandwidth), both ceilings
measured at the start of the same run (an 8192^3 bf16 matmul; a 1 GiB device-to-device copy,
counting bytes read plus written). FLOPs = 2 * B * (forward MACs + backward MACs) per step;
bytes = every hidden weight matrix read once per forward and once per backward product, every
step, in the --dtype of the weights (bf16 by default, as in issue 3's floor), plus the state
read once and u written once; the same floor is used for every variant of a case (the table
names each variant's weight dtype).

``--check`` instead verifies ``triton_ascend`` against a float64 reference (autograd, on the
device) for fp32/tf32/bf16 products, odd sizes, 1-3 hidden layers, small and large batches,
forced split-K, max_norm, with poisoned outputs and a bit-for-bit determinism check.

``--sweep`` times ``triton-graph`` under plan overrides (per direction at small batch, tile
shapes at large batch) against the default plan, timed first and last to show the noise.
``--warm-only --shard I --shards N`` runs every Triton launch (and torch.compile) that the same
arguments would time, once, one step, in shard I of N: several such processes run side by side
fill Triton's on-disk cache before the timed run, so compiling does not eat a device lease. On a CPU
with TRITON_INTERPRET=1 and ``--device cpu`` both modes run at toy sizes (a smoke test of this
script; CPU timings mean nothing).

The script runs from a checkout without installation and without vLLM: it puts the repository
root on sys.path and maps the top-level ``kernels/`` folder to ``vllm_recontrol.kernels`` when the
package is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# --quick: issue 3's variants, the Gram form's and the engine's; the fp32/tf32, L2-window and
# evict-last rows are in the results file (measured in earlier calls, --variants runs them)
QUICK_VARIANTS = ("autograd-fp16", "torch-eager", "torch-compile", "torch-graph", "triton",
                  "triton-graph", "triton-gram-graph", "torch-gram-graph", "triton-pdl-graph",
                  "head-ascend", "head-ascend-gram", "cublas-products-graph")
VARIANTS = ("autograd-fp16", "torch-eager", "torch-compile", "torch-graph", "torch-fp32-graph",
            "triton", "triton-graph", "triton-fp32-graph", "triton-tf32-graph", "triton-pdl-graph",
            "triton-l2-graph", "triton-evict-graph", "triton-gram-graph", "torch-gram",
            "torch-gram-graph",
            "head-ascend", "head-ascend-gram", "cublas-products-graph",
            # under per-row max_norm (every third row uncapped, as per-request radii give)
            "triton-norm-graph", "triton-gram-norm-graph", "head-ascend-norm")
# triton-evict-graph's plan: Triton keeps eviction hints only on plain loads (num_stages 1);
# 4 K splits (512 programs at d = 4096) make up for the missing pipeline with more programs
EVICT_OVERRIDES = {"num_stages": 1, "evict_last": 1, "split_k": 4, "fixup": 1}
EVICT_MAX_BATCH = 64  # the weight-streaming plans; larger batches are bound on chip
# weight dtype of the variants that fix it (the others follow --dtype / --torch-dtype)
VARIANT_DTYPE = {"autograd-fp16": "fp16", "torch-fp32-graph": "fp32", "triton-fp32-graph": "fp32",
                 "triton-tf32-graph": "fp32", "head-ascend": "bf16", "head-ascend-gram": "bf16",
                 "head-ascend-norm": "bf16"}
VARIANT_PRECISION = {"triton-tf32-graph": "tf32"}  # triton variants: else the weights' default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Variants: " + ", ".join(VARIANTS))
    p.add_argument("--hidden-sizes", type=positive, nargs="+", default=[2048, 4096, 8192],
                   help="d (= every hidden width)")
    p.add_argument("--layers", type=positive, nargs="+", default=[1, 2], help="hidden layers")
    p.add_argument("--steps", type=positive, nargs="+", default=[1, 30, 200])
    p.add_argument("--batch", type=positive, nargs="+", default=[1, 8, 32, 128, 256, 512])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="weight dtype of the triton variants and of the floor (default bf16)")
    p.add_argument("--torch-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="weight dtype of torch-eager/-compile/-graph (default bf16, like the "
                        "floor; torch-fp32-graph covers fp32)")
    p.add_argument("--quick", action="store_true",
                   help="preset: d = 4096, 1 and 2 hidden layers, 30 steps, B 1..512 (with 16)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the variants, time triton-graph under plan overrides "
                        "(default: d 4096, 1 and 2 hidden layers, 30 steps, B 128, 256, 512)")
    p.add_argument("--warm-only", action="store_true",
                   help="compile only: run each Triton/torch.compile launch of this shard once")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--check", action="store_true", help="correctness checks instead of timing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-sizes", action="store_true",
                   help="with --device cpu, time the sizes asked for instead of toy sizes "
                        "(for the torch variants: the Triton ones run in the interpreter)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the results table as markdown here")
    p.add_argument("--plans-from", type=Path, metavar="SWEEP_JSON",
                   help="a --sweep run's JSON: add a 'triton-graph tuned' row with the sweep's "
                        "fastest plan for every case it covers (where that beat the default)")
    args = p.parse_args(argv)
    if args.quick:  # the preset fills what was not given
        if argv_lacks(argv, "--hidden-sizes"):
            args.hidden_sizes = [4096]
        if argv_lacks(argv, "--layers"):
            args.layers = [1, 2]
        if argv_lacks(argv, "--steps"):
            args.steps = [30]
        if argv_lacks(argv, "--batch"):
            args.batch = [1, 8, 16, 32, 128, 256, 512]
        if argv_lacks(argv, "--variants"):
            args.variants = list(QUICK_VARIANTS)
    if args.sweep:  # the preset fills what was not given, flag by flag (as --quick)
        # the batches still above 1.3x of the floor (B <= 32 are within it: results file)
        for flag, name, value in (("--hidden-sizes", "hidden_sizes", [4096]),
                                  ("--layers", "layers", [1, 2]), ("--steps", "steps", [30]),
                                  ("--batch", "batch", [128, 256, 512])):
            if argv_lacks(argv, flag):
                setattr(args, name, value)
    if not 0 <= args.shard < args.shards:
        p.error(f"--shard must be in [0, --shards), got {args.shard} of {args.shards}")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r} is not a torch device (cuda, cuda:1, cpu): {exc}")
    if args.plans_from is not None and not args.plans_from.is_file():
        p.error(f"--plans-from {args.plans_from}: no such file (a --sweep run's --json)")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None and not path.parent.is_dir():  # not after the first timed row
            p.error(f"{flag} {path}: folder {path.parent} does not exist")
    return args


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def argv_lacks(argv, *flags: str) -> bool:
    """True when none of the flags was given (so a preset may fill them)."""
    given = sys.argv[1:] if argv is None else argv
    return not any(a.split("=")[0] in flags for a in given)


# ----------------------------------------------------------------------------- imports
def import_project():
    """(vllm_recontrol.ascent, vllm_recontrol.kernels.value_ascent), installed or from the tree."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ascent = importlib.import_module("vllm_recontrol.ascent")
    try:
        kernels = importlib.import_module("vllm_recontrol.kernels")
    except ModuleNotFoundError:  # a plain checkout: kernels/ is vllm_recontrol.kernels once installed
        folder = REPO / "kernels"
        spec = importlib.util.spec_from_file_location(
            "vllm_recontrol.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["vllm_recontrol.kernels"] = kernels
        spec.loader.exec_module(kernels)
        sys.modules["vllm_recontrol"].kernels = kernels
    value_ascent = importlib.import_module("vllm_recontrol.kernels.value_ascent")
    return ascent, value_ascent


import torch  # noqa: E402  (after the docstring-driven --help would not need it, but cheap)


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, args) -> float:
    """Median milliseconds of fn (device events via do_bench on CUDA, wall clock elsewhere)."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cuda_graph(fn: Callable[[], object], device: torch.device,
               stream: "torch.cuda.Stream | None" = None) -> Callable[[], None]:
    """fn captured in one CUDA graph, the way the engine captures its ascents."""
    from vllm_recontrol.ascent_graphs import capture_graph

    return capture_graph(fn, device, stream=stream).replay


def l2_window_module():
    """benchmarks/l2_window.py, whether this file runs as a script or is imported."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("l2_window")


_CONTIGUOUS: dict = {}


def contiguous_head(ascent, mlp):
    """(copy of ``mlp`` whose hidden weight matrices are views of one buffer, its address,
    its bytes): one access-policy window can then cover every hidden matrix."""
    key = tuple(w.data_ptr() for w in mlp.weights)
    if key not in _CONTIGUOUS:
        hidden = mlp.weights[:-1]
        flat = torch.empty(sum(w.numel() for w in hidden), device=hidden[0].device,
                           dtype=hidden[0].dtype)
        views, at = [], 0
        for w in hidden:
            views.append(flat[at:at + w.numel()].view_as(w).copy_(w))
            at += w.numel()
        _CONTIGUOUS.clear()  # one head at a time
        _CONTIGUOUS[key] = (ascent.MLPWeights([*views, mlp.weights[-1]], list(mlp.biases)),
                            flat.data_ptr(), flat.numel() * flat.element_size())
    return _CONTIGUOUS[key]


def measure_ceilings(device: torch.device, args) -> dict:
    """bf16 matmul rate (8192^3, random data) and device copy bandwidth (read + write)."""
    if device.type != "cuda":
        return {"matmul_tflops": float("nan"), "copy_gbps": float("nan")}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: torch.mm(a, b, out=c), device, args)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b, c
    elems = (1 << 30) // 4
    src = torch.randn(elems, device=device)
    dst = torch.empty_like(src)
    ms_copy = bench_ms(lambda: dst.copy_(src), device, args)
    gbps = 2 * elems * 4 / (ms_copy * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": tflops, "copy_gbps": gbps}


# ----------------------------------------------------------------------------- problem
@dataclass
class Case:
    d: int
    hidden: int
    steps: int
    batch: int


def work(case: Case, weight_bytes: int) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one whole ascent."""
    macs = case.hidden * case.d * case.d  # widths = d
    flops = 2.0 * case.batch * 2 * macs * case.steps
    weight_traffic = 2.0 * macs * weight_bytes * case.steps
    state_traffic = case.batch * case.d * (4 + 4)
    return flops, weight_traffic + state_traffic


def make_head(ascent, d: int, widths: list[int], dtype: torch.dtype, device: torch.device,
              gen: torch.Generator):
    """Random MLPWeights like nn.Linear's init (uniform +-1/sqrt(fan_in)), never zeros."""
    sizes = [d, *widths, 1]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        weights.append(((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound).to(device, dtype))
        biases.append(((torch.rand(fan_out, generator=gen) * 2 - 1) * bound).to(device, dtype))
    return ascent.MLPWeights(weights, biases)


def first_preactivation_gradient(weights, biases, z1):
    """dV/dz1 given the first pre-activation z1, the products in the weights' dtype: the
    closed form's forward from the first hidden layer on and its backward down to it."""
    dt = weights[0].dtype
    masks, h = [z1 > 0], torch.relu(z1).to(dt)
    for w, b in zip(weights[1:-1], biases[1:-1]):
        z = torch.addmm(b, h, w.t())
        masks.append(z > 0)
        h = torch.relu(z)
    g = masks[-1] * weights[-1]
    for i in range(len(masks) - 1, 0, -1):
        g = (g @ weights[i]) * masks[i - 1]
    return g


def closed_form_step(weights, biases, states, u, alpha_col, steps_col, k):
    """One closed-form step with the products in the weights' dtype (fp32 u and states)."""
    z1 = torch.addmm(biases[0], (states + u).to(weights[0].dtype), weights[0].t())
    grad = (first_preactivation_gradient(weights, biases, z1) @ weights[0]).float()
    return u + alpha_col * (steps_col > k) * grad


def bare_products(mlp, states, n: int) -> Callable[[], object]:
    """The ascent's 2L matrix products alone, ``n`` steps, chained through preallocated
    buffers in the weights' dtype, with none of its element-wise work: what cuBLAS needs for
    the products at this batch size (``cublas-products-graph``). Not an ascent; a reference
    for how far the kernel's products are from vendor GEMMs, as against the floor."""
    dt = mlp.weights[0].dtype
    x = states.to(dt)
    hidden = mlp.weights[:-1]  # the output layer is a vector product in every variant
    fwd = [torch.empty(x.shape[0], w.shape[0], dtype=dt, device=x.device) for w in hidden]
    bwd = [torch.empty(x.shape[0], w.shape[1], dtype=dt, device=x.device) for w in hidden]

    def run():
        g = x
        for _ in range(n):
            h = x
            for w, out in zip(hidden, fwd):
                h = torch.mm(h, w.t(), out=out)
            g = h
            for w, out in zip(reversed(hidden), reversed(bwd)):
                g = torch.mm(g, w, out=out)
        return g
    return run


_GRAMS: dict = {}


def gram_head(ascent, mlp):
    """``mlp`` with its first layer's Gram matrix, computed once per head (as the engine
    caches it with the weights), so that no timed call pays for it."""
    key = tuple(w.data_ptr() for w in mlp.weights)
    if key not in _GRAMS:
        _GRAMS.clear()  # one head at a time
        _GRAMS[key] = ascent.with_first_gram(mlp)
    return _GRAMS[key]


def gram_form_ascent(mlp, states, alpha, steps, n: int):
    """The Gram form's closed form with the products in the weights' dtype (fp32 c, z1(s)
    and u), as ``closed_form_step`` is to the direct form: c G replaces the first layer's
    forward and backward products (``vllm_recontrol.ascent``)."""
    weights, biases, gram = mlp.weights, mlp.biases, mlp.first_gram
    dt = weights[0].dtype
    base = torch.addmm(biases[0], states.to(dt), weights[0].t()).float()
    coef = torch.zeros_like(base)
    z = base
    alpha_col, steps_col = alpha.view(-1, 1), steps.view(-1, 1)
    for k in range(n):
        g = first_preactivation_gradient(weights, biases, z)
        coef = coef + alpha_col * (steps_col > k) * g.float()
        if k < n - 1:
            z = base + (coef.to(dt) @ gram).float()
    return (coef.to(dt) @ weights[0]).float()


def closed_form_loop(step_fn, mlp, states, alpha, steps, ks):
    u = torch.zeros_like(states)
    alpha_col, steps_col = alpha.view(-1, 1), steps.view(-1, 1)
    for k in ks:
        u = step_fn(mlp.weights, mlp.biases, states, u, alpha_col, steps_col, k)
    return u


def autograd_head(mlp, device):
    """The published loop's value model: an fp16 nn.Sequential (parameters require grad)."""
    layers = []
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float())
        layers.append(lin)
        if i < len(mlp.weights) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device=device, dtype=torch.float16)


def autograd_loop(head, states16, lr, epochs):
    """As published: SGD on a copy of the state, loss = -V(x).sum(), backward, step."""
    x = states16.detach().clone()
    x.requires_grad = True
    optimizer = torch.optim.SGD([x], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = -head(x).sum()
            loss.backward()
            optimizer.step()
    return x.detach()


# ----------------------------------------------------------------------------- benchmark
_COMPILED: dict = {}


def variant_dtype(name: str, args) -> str:
    if name.startswith("head-ascend") and not str(args.device).startswith("cuda"):
        return "fp32"  # the head's "auto" off CUDA: the torch closed form, fp32 products
    if name in VARIANT_DTYPE:
        return VARIANT_DTYPE[name]
    return args.torch_dtype if name.startswith("torch") else args.dtype


@dataclass
class Task:
    """One timed row: a variant on a case, optionally under Triton plan overrides."""

    case: Case
    variant: str
    overrides: dict | None = None
    label: str | None = None


_SHORT = {"block_m": "bm", "block_n": "bn", "block_k": "bk", "split_k": "s", "num_warps": "w",
          "num_stages": "st", "fixup": "fix", "evict_last": "ev", "tma": "tma",
          "warp_specialize": "ws", "pdl": "pdl"}


def sweep_configs(batch: int) -> list[tuple[str, dict]]:
    """(label, plan_overrides) to try: one direction at a time for the weight-streaming small
    batches (the other keeps the default plan), whole tile shapes for large batches."""
    def label(prefix: str, ov: dict) -> str:
        return prefix + " ".join(f"{_SHORT[k]}{v}" for k, v in ov.items())

    if batch <= 64:  # around the default (32-column blocks, 16 KB of W per stage)
        shapes = [dict(block_n=32, block_k=512), dict(block_n=64, block_k=256),
                  dict(block_n=64, block_k=128), dict(block_n=16, block_k=512),
                  dict(block_n=32, block_k=256, num_stages=3),
                  dict(block_n=32, block_k=256, num_stages=6),
                  dict(block_n=32, block_k=256, num_warps=8),
                  dict(block_n=32, block_k=256, split_k=2),
                  dict(block_n=32, block_k=256, split_k=2, fixup=1)]
        # both directions: L2 evict-last weight loads (1 stage keeps the hint), and the same
        # unpipelined plan without the hint, to tell the hint's effect from the pipeline's
        evict = [dict(num_stages=1, evict_last=1), dict(num_stages=1, evict_last=1, split_k=2,
                                                        fixup=1),
                 dict(num_stages=1, evict_last=1, split_k=4, fixup=1),
                 dict(num_stages=1, evict_last=1, split_k=4, fixup=1, num_warps=8),
                 dict(num_stages=1, split_k=4, fixup=1), dict(tma=1)]
        return ([(label("fwd ", ov), {"forward": ov}) for ov in shapes]
                + [(label("bwd ", ov), {"backward": ov}) for ov in shapes]
                + [(label("both ", ov), {"forward": ov, "backward": ov}) for ov in evict])
    # (bm, bn, bk, warps, stages, split, fixup, tma) around the defaults. Call 5 of the H100
    # results tried fewer on-chip bytes (128x256 tiles, split K with fix-up: slowest) against
    # more bytes in flight (one more stage: 6-13 % faster; descriptor loads: up to 5 %); call 6
    # went deeper at the two tile shapes that lead (its slowest, 64x256 and 128-deep K at 3
    # stages, and the plain-load twins of descriptor plans, which timed alike, are dropped)
    tiles = [(64, 128, 64, 4, 5, 1, 0, 1), (64, 128, 64, 4, 6, 1, 0, 1),
             (64, 128, 64, 4, 7, 1, 0, 1), (64, 128, 128, 4, 4, 1, 0, 1),
             (64, 128, 64, 4, 6, 2, 0, 1),
             (128, 128, 64, 8, 4, 1, 0, 1), (128, 128, 64, 8, 5, 1, 0, 1),
             (128, 128, 64, 8, 6, 1, 0, 1)]
    out = []
    for bm, bn, bk, warps, stages, split, fixup, tma in tiles:
        ov = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                  split_k=split, fixup=fixup, tma=tma)
        out.append((label("", ov), ov))
    # Triton's warp specialization (producer and consumer warps): Triton 3.6 applies it on
    # sm_90 to 4-warp descriptor-load tiles only (8-warp tiles compile without partitions),
    # 12 warps in all. At 128x128 that puts more warps on each tile, as the 8-warp 128x128
    # plans that lead at B = 512 do, and it does not spill (168 registers, where one 4-warp
    # group holding the 128x128 accumulator spills 480 bytes, compiled offline); split K in
    # 2 fills the chip at B = 256, and in 3 at B = 128, where the on-chip model (results
    # file, fourth session) puts 128x128 with split 3 at the floor if splitting costs only
    # its bytes (not measured yet)
    ws = [(64, 128, 64, 4, 1), (64, 128, 64, 6, 1), (64, 128, 128, 3, 1), (64, 128, 128, 4, 1),
          (128, 128, 64, 3, 1), (128, 128, 64, 4, 1), (128, 128, 64, 4, 2),
          (128, 128, 64, 4, 3)]
    for bm, bn, bk, stages, split in ws:
        ov = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=stages,
                  split_k=split, fixup=0, tma=1, warp_specialize=1)
        out.append((label("", ov), ov))
    # Split K whose reduce launch overlaps the product (programmatic dependent launches, the
    # reduce in 16-row programs): the on-chip model puts 64x128 with split 2 at 1.3x of the
    # floor at B = 128 if splitting costs only its bytes (results file, fourth session)
    for split in (1, 2):
        ov = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=6,
                  split_k=split, fixup=0, tma=1, pdl=1)
        out.append((label("", ov), ov))
    return out


def tuned_plans(sweep_json: Path | None, min_gain: float = 1.03) -> dict[tuple, tuple]:
    """(d, hidden, steps, batch) -> (label, overrides) of the fastest sweep candidate of each
    case that beat the default plan (the mean of its two timings) by ``min_gain``."""
    if sweep_json is None or not sweep_json.exists():
        return {}
    rows = json.loads(sweep_json.read_text()).get("rows", [])
    return {key: (best["variant"].removeprefix("triton-graph "), best["overrides"])
            for key, (default_ms, best) in fastest_per_case(rows).items()
            if best.get("overrides") and default_ms >= min_gain * best["ms"]}


def fastest_per_case(rows: list[dict]) -> dict[tuple, tuple[float, dict]]:
    """(d, hidden, steps, batch) -> (the default plan's mean time, the fastest other row) for
    every case of a sweep that timed both the default and a candidate."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if "ms" in r:
            cases.setdefault((r["d"], r["hidden"], r["steps"], r["batch"]), []).append(r)
    out = {}
    for key, found in cases.items():
        default = [r["ms"] for r in found if r["variant"].startswith("triton-graph default")]
        candidates = [r for r in found if not r["variant"].startswith("triton-graph default")]
        if default and candidates:
            out[key] = (statistics.mean(default), min(candidates, key=lambda r: r["ms"]))
    return out


def tasks(args) -> list[Task]:
    """Every row the arguments ask for, in run order."""
    tuned = tuned_plans(getattr(args, "plans_from", None))
    out = []
    for d in args.hidden_sizes:
        for hidden in args.layers:
            for n in args.steps:
                for batch in args.batch:
                    case = Case(d, hidden, n, batch)
                    if not args.sweep:
                        out.extend(Task(case, name) for name in args.variants
                                   if name != "triton-evict-graph" or batch <= EVICT_MAX_BATCH)
                        key = (d, hidden, n, batch)
                        if key in tuned and "triton-graph" in args.variants:
                            label, ov = tuned[key]
                            out.append(Task(case, "triton-graph", ov,
                                            f"triton-graph tuned {label}"))
                        continue
                    out.append(Task(case, "triton-graph", None, "triton-graph default"))
                    out.extend(Task(case, "triton-graph", ov, f"triton-graph {lbl}")
                               for lbl, ov in sweep_configs(batch))
                    out.append(Task(case, "triton-graph", None, "triton-graph default again"))
    return out


class Inputs:
    """The head of the current (d, hidden) in fp32 and bf16, and each case's random states."""

    def __init__(self, ascent, device: torch.device, gen: torch.Generator, alpha: float):
        self.ascent, self.device, self.gen, self.alpha = ascent, device, gen, alpha
        self.head_key, self.heads, self.case, self.tensors = None, None, None, None

    def get(self, case: Case):
        if self.head_key != (case.d, case.hidden):
            self.heads = self.tensors = self.case = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            mlp32 = make_head(self.ascent, case.d, [case.d] * case.hidden, torch.float32,
                              self.device, self.gen)
            self.heads = {"fp32": mlp32, "bf16": self.ascent.MLPWeights(
                [w.bfloat16() for w in mlp32.weights], [b.bfloat16() for b in mlp32.biases])}
            self.head_key = (case.d, case.hidden)
        if self.case != case:
            states = torch.randn(case.batch, case.d, generator=self.gen).to(self.device)
            alpha = torch.full((case.batch,), self.alpha, device=self.device)
            steps = torch.full((case.batch,), case.steps, device=self.device, dtype=torch.int64)
            self.case, self.tensors = case, (states, alpha, steps)
        return self.heads, *self.tensors


def variant_overrides(name: str, overrides: dict | None) -> dict | None:
    """The plan overrides a variant runs with: triton-evict-graph adds EVICT_OVERRIDES,
    triton-pdl-graph programmatic dependent launches."""
    if name == "triton-evict-graph":
        return {**EVICT_OVERRIDES, **(overrides or {})}
    if name == "triton-pdl-graph":
        return {"pdl": 1, **(overrides or {})}
    return overrides


def raw_variant(name, ascent, va, heads, states, alpha, steps, n, device, args,
                overrides=None) -> Callable[[], object]:
    """A zero-argument callable running one whole ascent (``n`` steps) with variant ``name``,
    before any CUDA-graph capture. ``heads`` maps "bf16"/"fp32" to the same head."""
    ks = list(torch.arange(n, device=device).unbind()) if n else []
    mlp = heads["fp32" if name == "autograd-fp16" else variant_dtype(name, args)]
    if name == "autograd-fp16":
        head = autograd_head(mlp, device)
        s16 = states.half()
        return lambda: autograd_loop(head, s16, args.alpha, n)
    if name in ("torch-eager", "torch-graph", "torch-fp32-graph"):
        if mlp.weights[0].dtype == torch.float32:
            return lambda: ascent.ascend_float32(mlp, states, alpha, steps, n)
        return lambda: closed_form_loop(closed_form_step, mlp, states, alpha, steps, ks)
    if name == "torch-compile":
        key = mlp.weights[0].dtype
        if key not in _COMPILED:
            for knob in ("cache_size_limit", "recompile_limit"):  # one entry per (d, L, B) shape
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            _COMPILED[key] = torch.compile(closed_form_step, dynamic=True)  # one compile per depth
        step = _COMPILED[key]
        return lambda: closed_form_loop(step, mlp, states, alpha, steps, ks)
    if name == "cublas-products-graph":
        return bare_products(mlp, states, n)
    if name in ("torch-gram", "torch-gram-graph"):
        gram = gram_head(ascent, mlp)
        if mlp.weights[0].dtype == torch.float32:
            return lambda: ascent.ascend_gram_float32(gram, states, alpha, steps, n)
        return lambda: gram_form_ascent(gram, states, alpha, steps, n)
    if name == "triton-gram-graph":
        gram = gram_head(ascent, mlp)
        return lambda: va.triton_ascend_gram(gram, states, alpha, steps, n,
                                             plan_overrides=overrides)
    if name == "head-ascend-gram":
        head = value_head_from(heads["fp32"], device)
        return lambda: head.ascend(states, alpha, steps, num_iterations=n, form="gram")
    if name == "head-ascend":
        head = value_head_from(heads["fp32"], device)
        return lambda: head.ascend(states, alpha, steps, num_iterations=n)
    if "norm" in name:  # the projected ascents: per-row radii, some rows uncapped
        radii = per_row_radii(states.shape[0]).to(device)
        if name == "head-ascend-norm":
            head = value_head_from(heads["fp32"], device)
            return lambda: head.ascend(states, alpha, steps, max_norm=radii, num_iterations=n)
        if name == "triton-gram-norm-graph":
            gram = gram_head(ascent, mlp)
            return lambda: va.triton_ascend_gram(gram, states, alpha, steps, n, radii,
                                                 plan_overrides=overrides)
        return lambda: va.triton_ascend(mlp, states, alpha, steps, n, radii,
                                        plan_overrides=overrides)
    if name == "triton-l2-graph":
        mlp = contiguous_head(ascent, mlp)[0]
    if name.startswith("triton"):
        precision = VARIANT_PRECISION.get(name)
        overrides = variant_overrides(name, overrides)
        return lambda: va.triton_ascend(mlp, states, alpha, steps, n, precision=precision,
                                        plan_overrides=overrides)
    raise ValueError(name)


_HEADS: dict = {}


def new_value_head(mlp, device):
    """A fresh ValueHead (empty graph cache) holding ``mlp``'s weights in fp32."""
    from vllm_recontrol import ValueHead

    head = ValueHead(mlp.weights[0].shape[1], [w.shape[0] for w in mlp.weights[:-1]])
    with torch.no_grad():
        for layer, w, b in zip(head.layers, mlp.weights, mlp.biases):
            layer.weight.copy_(w.float().cpu())
            layer.bias.copy_(b.float().cpu())
    return head.to(device)


def value_head_from(mlp, device):
    """``new_value_head``, one per head, so that its graph cache persists between calls."""
    key = tuple(w.data_ptr() for w in mlp.weights)
    if key not in _HEADS:
        _HEADS.clear()  # one head at a time: the previous (d, layers) is done
        _HEADS[key] = new_value_head(mlp, device)
    return _HEADS[key]


def run_benchmark(args, device, ascent, va, dump) -> dict:
    ceilings = measure_ceilings(device, args)
    print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    if device.type == "cuda" and "triton-l2-graph" in args.variants:
        try:
            ceilings["l2_probe"] = l2_window_module().probe(device)
        except Exception as exc:  # informative only
            ceilings["l2_probe"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"L2 window probe: {ceilings['l2_probe']}", flush=True)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = Inputs(ascent, device, gen, args.alpha)
    rows = []
    for task in tasks(args):
        case = task.case
        heads, states, alpha, steps = inputs.get(case)
        flops, nbytes = work(case, 2 if args.dtype == "bf16" else 4)
        floor_ms = 1e3 * max(flops / (ceilings["matmul_tflops"] * 1e12),
                             nbytes / (ceilings["copy_gbps"] * 1e9))
        rows.append(time_variant(task, flops, nbytes, floor_ms, ascent, va, heads, states, alpha,
                                 steps, device, args))
        print(format_row(rows[-1]), flush=True)
        dump({"ceilings": ceilings, "rows": rows})  # survives a time limit
    return {"ceilings": ceilings, "rows": rows}


def sweep_summary(rows: list[dict]) -> str:
    """Per case, the fastest sweep candidate against the default plan (the mean of its two
    timings, before and after the candidates): what to change in ``plan_gemm``."""
    lines = ["| d | hidden layers | steps | B | default ms | best candidate | ms | default / best "
             "| best x floor |", "|" + "---|" * 9]
    for (d, hidden, steps, batch), (base, best) in sorted(fastest_per_case(rows).items()):
        lines.append(f"| {d} | {hidden} | {steps} | {batch} | {base:.3f} | "
                     f"{best['variant'].removeprefix('triton-graph ')} | {best['ms']:.3f} | "
                     f"{base / best['ms']:.2f} | {best['x_floor']:.2f} |")
    return "\n".join(lines)


def run_warm(args, device, ascent, va) -> int:
    """Compile what this shard's share of the timed run will launch (one step each)."""
    seen, mine = set(), []
    for task in tasks(args):
        if not (task.variant.startswith(("triton", "head")) or task.variant == "torch-compile"):
            continue
        key = (task.case.d, task.case.hidden, task.case.batch, task.variant.replace("-graph", ""),
               repr(task.overrides))
        if key not in seen:
            seen.add(key)
            mine.append(task)
    mine = mine[args.shard::args.shards]
    gen = torch.Generator().manual_seed(args.shard)
    inputs = Inputs(ascent, device, gen, args.alpha)
    failed = 0
    for task in mine:
        heads, states, alpha, steps = inputs.get(task.case)
        try:  # one step: every row's steps cut to 1 (ValueHead.ascend refuses fewer
            # iterations than steps; the kernels compiled do not depend on the counts)
            raw_variant(task.variant, ascent, va, heads, states, alpha, steps.clamp(max=1), 1,
                        device, args, task.overrides)()
        except Exception as exc:  # the timed run reports it as an error row
            failed += 1
            print(f"warm {task.variant} {task.case} {task.overrides}: {type(exc).__name__}: {exc}")
    sync(device)
    print(f"warm shard {args.shard}/{args.shards}: {len(mine)} launches compiled, {failed} failed",
          flush=True)
    return 0


def bf16_plans(va, case: Case, overrides: dict | None, n_programs: int) -> dict:
    """direction -> the GemmPlan the kernel picks for this case's products in bf16 (widths = d)."""
    by_direction = va.overrides_by_direction(overrides)
    return {direction: va.plan_gemm(case.batch, case.d, case.d,
                                    w_k_contiguous=direction == "forward", weight_bytes=2,
                                    precision="bf16", n_programs=n_programs, interpret=False,
                                    overrides=by_direction[direction])
            for direction in ("forward", "backward")}


def onchip_megabytes(case: Case, plans: dict) -> float:
    """Bytes moved from L2 into the multiprocessors per ascent step, in MB, by the plans the
    kernel picks (``bf16_plans``): every program reads its [BM, K-range] slice of the left operand and
    its [K-range, BN] slice of W, and split K writes and reads fp32 partials. A weight tile
    read by several row tiles comes from HBM once but from L2 each time, so at large batch
    this, not HBM traffic, is what the tile shape changes (the H100 results file compares it
    with the measured times)."""
    N = K = case.d
    total = 0.0
    for plan in plans.values():
        m_tiles, n_tiles = -(-case.batch // plan.block_m), -(-N // plan.block_n)
        splits = plan.splits(K)
        left = 2 * case.batch * K * n_tiles
        weights = 2 * K * N * m_tiles
        partials = 2 * 4 * case.batch * N * splits if splits > 1 else 0
        total += case.hidden * (left + weights + partials)
    return total / 1e6


def time_variant(task: Task, flops, nbytes, floor_ms, ascent, va, heads, states, alpha,
                 steps, device, args) -> dict:
    """Time one task; a failure becomes an 'error' row, not the end of the run."""
    name, case = task.variant, task.case
    row = {**asdict(case), "variant": task.label or name, "weights": variant_dtype(name, args),
           "floor_ms": floor_ms}
    if task.overrides:
        row["overrides"] = task.overrides
    if name in ("triton-graph", "triton-l2-graph", "triton-evict-graph", "triton-pdl-graph") \
            and args.dtype == "bf16":
        plans = bf16_plans(va, case, variant_overrides(name, task.overrides),
                           va._device_programs(device))
        row["onchip_mb_per_step"] = onchip_megabytes(case, plans)
        # the tiles actually launched, defaults included (for benchmarks/onchip_model.py)
        row["plans"] = {direction: {"block_m": plan.block_m, "block_n": plan.block_n,
                                    "split_k": plan.splits(case.d)}
                        for direction, plan in plans.items()}
    if device.type != "cuda" and (name.endswith("graph") or name == "torch-compile"):
        return {**row, "error": "needs CUDA"}
    stream, l2 = None, None
    try:
        fn = raw_variant(name, ascent, va, heads, states, alpha, steps, case.steps, device, args,
                         task.overrides)
        for _ in range(2):  # compile (Triton, inductor) and warm up outside the timed region
            fn()
        if name == "triton-l2-graph":  # the window goes with the kernels captured on `stream`
            l2, stream = l2_window_module(), torch.cuda.Stream(device)
            _, base, window_bytes = contiguous_head(ascent, heads[variant_dtype(name, args)])
            row["l2_hit_ratio"] = l2.persist(stream, base, window_bytes)
        if name.endswith("graph"):
            fn = cuda_graph(fn, device, stream)
        sync(device)
        ms = bench_ms(fn, device, args)
        del fn
    except Exception as exc:  # one broken variant must not end the run
        traceback.print_exc()
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        if l2 is not None:
            try:
                l2.release(stream)
            except Exception:  # the next rows would run with L2 set aside: say so loudly
                traceback.print_exc()
    sec = ms * 1e-3
    return {**row, "ms": ms, "tflops": flops / sec / 1e12, "gbps": nbytes / sec / 1e9,
            "x_floor": ms / floor_ms if floor_ms > 0 else float("nan")}


def format_row(r: dict) -> str:
    head = (f"d={r['d']:5d} L={r['hidden']} steps={r['steps']:3d} B={r['batch']:3d} "
            f"{r['variant']:34s} {r['weights']:4s}")
    if "error" in r:
        return f"{head} error: {r['error']}"
    return (f"{head} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s {r['gbps']:7.0f} GB/s "
            f"floor {r['floor_ms']:.3f} ms x{r['x_floor']:.2f}")


def markdown_table(result: dict, device_name: str, args) -> str:
    c = result["ceilings"]
    lines = [f"# Ascent kernel benchmark ({device_name})", ""]
    if math.isnan(c["matmul_tflops"]):  # a CPU run: no ceilings, wall-clock timing
        lines += [f"CPU run ({os.cpu_count()} cores): median of 3 wall-clock calls after one "
                  "warm-up call; no ceilings are measured on a CPU, so no floor.", ""]
    else:
        lines += [f"Ceilings measured in this run: bf16 matmul {c['matmul_tflops']:.0f} "
                  f"TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s. Median of do_bench "
                  "(events, L2 flushed). Floor = max(FLOPs / matmul rate, bytes / copy "
                  f"bandwidth) with {args.dtype} weights read once per forward and once per "
                  "backward product every step; GB/s counts those bytes.", ""]
    probe = c.get("l2_probe")
    if probe and "error" in probe:
        lines += [f"L2 window probe: error: {probe['error']}", ""]
    elif probe:
        lines += [f"L2 window probe ({probe['reads']} reads of one buffer; limits "
                  f"{probe['limits']}):", ""]
        lines += [f"- {r['megabytes']} MB: plain {r['plain_eager_ms']:.3f} ms eager / "
                  f"{r['plain_graph_ms']:.3f} ms graph; persisting window (hit ratio "
                  f"{r['hit_ratio']:.2f}) {r['window_eager_ms']:.3f} / {r['window_graph_ms']:.3f}"
                  f" ms; HBM at 3 TB/s would take {r['hbm_3tbs_ms']:.3f} ms"
                  for r in probe["sizes"]]
        lines.append("")
    lines += ["| d | hidden layers | steps | B | variant | weights | ms | TFLOP/s | GB/s | floor ms | x floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['d']} | {r['hidden']} | {r['steps']} | {r['batch']} | {r['variant']} "
                         f"| {r['weights']} | error: {r['error']} | | | {r['floor_ms']:.3f} | |")
        else:
            lines.append(f"| {r['d']} | {r['hidden']} | {r['steps']} | {r['batch']} | {r['variant']} "
                         f"| {r['weights']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
                         f"{r['floor_ms']:.3f} | {r['x_floor']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- check
PER_ROW = "per-row"  # a check case's max_norm: one radius per row (some rows uncapped)


def per_row_radii(rows: int) -> torch.Tensor:
    """Radii 0.02-0.1 with every third row uncapped (inf), as per-request max_norm gives."""
    radii = 0.02 + 0.08 * torch.arange(rows) / max(1, rows - 1)
    radii[::3] = float("inf")
    return radii


def check_cases(device: torch.device) -> list[dict]:
    """Odd sizes, 1-3 hidden layers, small and large batches, all precisions, split K, max_norm."""
    if device.type != "cuda":  # interpreter smoke test: toy sizes only
        return [dict(d=40, widths=[24, 17], rows=5, n=3, precision="ieee", wdtype="fp32"),
                dict(d=40, widths=[24], rows=5, n=3, precision="bf16", wdtype="bf16",
                     max_norm=0.3),
                dict(d=40, widths=[24], rows=5, n=3, precision="ieee", wdtype="fp32",
                     max_norm=PER_ROW),
                dict(d=40, widths=[24, 17, 20], rows=19, n=2, precision="ieee", wdtype="fp32",
                     overrides={"split_k": 2, "block_k": 16}),
                dict(d=40, widths=[24, 17], rows=19, n=2, precision="ieee", wdtype="fp32",
                     overrides={"split_k": 3, "block_k": 16, "fixup": 1}),
                dict(d=40, widths=[24, 17], rows=5, n=3, precision="bf16", wdtype="bf16",
                     form="gram"),
                dict(d=40, widths=[56], rows=19, n=2, precision="ieee", wdtype="fp32",
                     form="gram", overrides={"split_k": 2, "block_k": 16}),
                dict(d=40, widths=[24, 17], rows=7, n=3, precision="bf16", wdtype="bf16",
                     form="gram", max_norm=PER_ROW)]
    # Chosen to cover each code path once while keeping Triton's compile count (~100) low.
    odd = dict(d=300, n=4)
    w1, w2, w3 = [257], [257, 129], [257, 129, 200]
    return [
        dict(odd, widths=w1, rows=5, precision="ieee", wdtype="fp32"),
        dict(odd, widths=w2, rows=5, precision="ieee", wdtype="fp32"),
        dict(odd, widths=w3, rows=5, precision="ieee", wdtype="fp32"),
        dict(odd, widths=w2, rows=1, precision="ieee", wdtype="fp32"),
        dict(odd, widths=w2, rows=130, precision="ieee", wdtype="fp32"),
        dict(odd, widths=w2, rows=5, precision="tf32", wdtype="fp32"),
        dict(odd, widths=w2, rows=130, precision="tf32", wdtype="fp32"),
        dict(odd, widths=w1, rows=5, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w2, rows=5, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w3, rows=5, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w3, rows=1, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w2, rows=37, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w2, rows=130, precision="bf16", wdtype="bf16"),
        dict(odd, widths=w2, rows=5, precision="ieee", wdtype="bf16"),
        dict(odd, widths=w2, rows=16, precision="ieee", wdtype="fp32", max_norm=0.05),
        dict(odd, widths=w2, rows=16, precision="bf16", wdtype="bf16", max_norm=0.05),
        dict(odd, widths=w2, rows=37, precision="bf16", wdtype="bf16", max_norm=PER_ROW),
        dict(odd, widths=w2, rows=16, precision="ieee", wdtype="fp32", overrides={"split_k": 3}),
        dict(odd, widths=w3, rows=16, precision="bf16", wdtype="bf16", max_norm=0.05,
             overrides={"split_k": 2}),
        # split K finished in place by the last split (fix-up), small and large tiles (the
        # 128x256 tiles are finished in 4 chunks of 64 columns)
        dict(odd, widths=w3, rows=16, precision="ieee", wdtype="fp32", max_norm=0.05,
             overrides={"split_k": 3, "fixup": 1}),
        dict(odd, widths=w2, rows=130, precision="bf16", wdtype="bf16",
             overrides={"split_k": 2, "fixup": 1}),
        dict(d=4096, widths=[4096], rows=128, n=3, precision="bf16", wdtype="bf16",
             overrides={"block_m": 128, "block_n": 256, "num_warps": 8, "num_stages": 3,
                        "split_k": 4, "fixup": 1}),
        # weights loaded unpipelined with the L2 evict-last hint (triton-evict-graph's plan)
        dict(d=4096, widths=[4096], rows=16, n=5, precision="bf16", wdtype="bf16",
             overrides=EVICT_OVERRIDES),
        dict(d=4096, widths=[4096, 4096], rows=16, n=5, precision="ieee", wdtype="fp32"),
        dict(d=4096, widths=[4096, 4096], rows=16, n=5, precision="bf16", wdtype="bf16"),
        dict(d=4096, widths=[4096], rows=256, n=3, precision="bf16", wdtype="bf16"),
        dict(d=4096, widths=[4096, 4096], rows=512, n=2, precision="bf16", wdtype="bf16"),
        # tiles through tensor descriptors (TMA): edges in every dimension (304 / 264 / 136 /
        # 200 are multiples of 8, as descriptors need, not of the tiles), weight-streaming and
        # tensor-core tiles, split K with fix-up
        dict(d=304, n=4, widths=[264, 136, 200], rows=5, precision="bf16", wdtype="bf16",
             overrides={"tma": 1}),
        dict(d=304, n=4, widths=[264, 136], rows=130, precision="bf16", wdtype="bf16",
             overrides={"tma": 1}),
        dict(d=304, n=4, widths=[264, 136], rows=130, precision="bf16", wdtype="bf16",
             overrides={"tma": 1, "split_k": 2, "fixup": 1}),
        dict(d=4096, widths=[4096, 4096], rows=256, n=3, precision="bf16", wdtype="bf16",
             overrides={"block_m": 128, "block_n": 256, "num_warps": 8, "num_stages": 3,
                        "split_k": 4, "fixup": 1, "tma": 1}),
        dict(d=4096, widths=[4096], rows=512, n=2, precision="bf16", wdtype="bf16",
             overrides={"tma": 1}),
        # Triton's warp specialization of the descriptor-load loop (a sweep candidate)
        dict(d=304, n=4, widths=[264, 136], rows=130, precision="bf16", wdtype="bf16",
             overrides={"tma": 1, "warp_specialize": 1}),
        dict(d=4096, widths=[4096, 4096], rows=256, n=3, precision="bf16", wdtype="bf16",
             overrides={"tma": 1, "warp_specialize": 1, "num_stages": 4}),
        dict(d=4096, widths=[4096], rows=256, n=3, precision="bf16", wdtype="bf16",
             overrides={"tma": 1, "warp_specialize": 1, "block_m": 128, "block_n": 128,
                        "num_warps": 4, "num_stages": 4, "split_k": 2}),
        # programmatic dependent launches (each product waits for the previous one in-kernel)
        dict(d=304, n=4, widths=[264, 136], rows=130, precision="bf16", wdtype="bf16",
             overrides={"pdl": 1, "split_k": 2, "fixup": 1}),
        dict(d=4096, widths=[4096, 4096], rows=128, n=3, precision="bf16", wdtype="bf16",
             overrides={"pdl": 1, "split_k": 2, "tma": 1}),  # the reduce kernel too
        dict(d=4096, widths=[4096, 4096], rows=16, n=5, precision="bf16", wdtype="bf16",
             overrides={"pdl": 1}),
        # the Gram form (triton_ascend_gram): odd sizes at every depth (a first layer wider
        # than d too), weight-streaming and tensor-core tiles, split K, descriptor loads, the
        # paper's sizes
        dict(odd, widths=w1, rows=5, precision="bf16", wdtype="bf16", form="gram"),
        dict(odd, widths=[361, 40], rows=37, precision="bf16", wdtype="bf16",
             form="gram"),
        dict(odd, widths=w3, rows=5, precision="ieee", wdtype="fp32", form="gram"),
        dict(odd, widths=w2, rows=130, precision="bf16", wdtype="bf16", form="gram",
             overrides={"split_k": 2, "fixup": 1}),
        dict(d=304, n=4, widths=[264, 136], rows=130, precision="bf16", wdtype="bf16",
             form="gram", overrides={"tma": 1}),
        dict(d=4096, widths=[4096], rows=16, n=5, precision="bf16", wdtype="bf16", form="gram"),
        dict(d=4096, widths=[4096, 4096], rows=256, n=3, precision="bf16", wdtype="bf16",
             form="gram"),
        dict(d=4096, widths=[4096], rows=512, n=2, precision="bf16", wdtype="bf16",
             form="gram"),
        # ... under max_norm: one radius, per-row radii, split K (whole-tile fix-up)
        dict(odd, widths=w1, rows=16, precision="ieee", wdtype="fp32", form="gram",
             max_norm=0.05),
        dict(odd, widths=w2, rows=37, precision="bf16", wdtype="bf16", form="gram",
             max_norm=PER_ROW),
        dict(odd, widths=w3, rows=130, precision="bf16", wdtype="bf16", form="gram",
             max_norm=0.05, overrides={"split_k": 2, "fixup": 1}),
        dict(d=4096, widths=[4096], rows=256, n=3, precision="bf16", wdtype="bf16",
             form="gram", max_norm=PER_ROW),
    ]


# fp32 products vs float64: far under 1e-3 (METHOD). tf32: operands rounded to 10 bits, near
# 3e-4 per product. bf16 vs the float64 reference with the same bf16 operand rounding: the same
# function up to fp32 accumulation. Mask flips at kinks are excluded by the clean-row margin.
TOLERANCE = {"ieee": 1e-4, "tf32": 3e-3, "bf16": 1e-3}
MARGIN = {"ieee": 1e-5, "tf32": 3e-3, "bf16": 1e-3}
LOOSE_TOLERANCE = 0.1  # when every row came near a kink: catches wrong math, not rounding


def run_check(args, device, ascent, va, dump) -> dict:
    results, failures = [], 0
    seed0 = int.from_bytes(os.urandom(4), "little")
    if device.type == "cuda":  # the engine's path first: each group reported as it finishes,
        # in case the time limit cuts in during the kernel cases' compiles below
        for group in (lambda: check_graph_cache(device, ascent, seed0),
                      lambda: [check_controller(device, ascent, seed0),
                               check_controller(device, ascent, seed0, form="gram")],
                      lambda: check_batch_invariance(device, ascent, va, seed0)):
            graph_rows = group()
            results.extend(graph_rows)
            failures += sum(not r["ok"] for r in graph_rows)
            dump({"failures": failures, "cases": results, "complete": False})
    for i, c in enumerate(check_cases(device)):
        started = time.perf_counter()  # mostly Triton compiles: sizes the phase's time limit
        seed = seed0 + i
        gen = torch.Generator().manual_seed(seed)
        wdtype = torch.bfloat16 if c["wdtype"] == "bf16" else torch.float32
        mlp = make_head(ascent, c["d"], c["widths"], wdtype, device, gen)
        # scale the weights up so that alpha ~ 1 moves states across some kinks
        mlp = ascent.MLPWeights([(w.float() * 2).to(wdtype) for w in mlp.weights], mlp.biases)
        rows, n = c["rows"], c["n"]
        states = torch.randn(rows, c["d"], generator=gen).to(device)
        if wdtype == torch.bfloat16:
            states = states.bfloat16()
        alpha = (0.5 + torch.rand(rows, generator=gen)).to(device)
        steps = torch.randint(1, n + 1, (rows,), generator=gen).to(device)
        if rows >= 3:
            steps[0], alpha[1], steps[2] = 0, 0.0, n
        max_norm = c.get("max_norm")
        if max_norm == PER_ROW:
            max_norm = per_row_radii(rows).to(device)
        out = torch.full((rows, c["d"]), float("nan"), device=device)
        kw = dict(precision=c["precision"], plan_overrides=c.get("overrides"))
        emulate = c["precision"] == "bf16"
        references = importlib.import_module("vllm_recontrol.kernels.reference")
        reference = references.reference_ascent
        if c.get("form") == "gram":
            gram = ascent.with_first_gram(mlp)
            u = va.triton_ascend_gram(gram, states, alpha, steps, n, max_norm, out=out,
                                      poison_scratch=True, **kw)
            again = va.triton_ascend_gram(gram, states, alpha, steps, n, max_norm,
                                          poison_scratch=True, **kw)
            sync(device)
            ref, clean = references.gram_reference_ascent(
                mlp.weights, mlp.biases, gram.first_gram, states, alpha, steps, n, max_norm,
                emulate, MARGIN[c["precision"]])
        else:
            u = va.triton_ascend(mlp, states, alpha, steps, n, max_norm, out=out,
                                 poison_scratch=True, **kw)
            again = va.triton_ascend(mlp, states, alpha, steps, n, max_norm, poison_scratch=True,
                                     **kw)
            sync(device)
            ref, clean = reference(mlp.weights, mlp.biases, states, alpha, steps, n, max_norm,
                                   emulate, MARGIN[c["precision"]])
        pure, _ = reference(mlp.weights, mlp.biases, states, alpha, steps, n, max_norm, False, 0.0)
        idle = (steps == 0) | (alpha == 0)
        moving = ~idle
        use = clean & moving
        loose = int(use.sum()) == 0
        if loose:  # every row touched a kink: compare all rows, loosely
            use = moving
        tol = LOOSE_TOLERANCE if loose else TOLERANCE[c["precision"]]
        err = ((u[use].double() - ref[use]).norm() / ref[use].norm()).item()
        err_pure = ((u[moving].double() - pure[moving]).norm() / pure[moving].norm()).item()
        finite = bool(torch.isfinite(u).all())
        idle_exact = bool(torch.equal(u[idle], torch.zeros_like(u[idle])))
        deterministic = bool(torch.equal(u, again))
        ok = finite and idle_exact and deterministic and err < tol
        failures += not ok
        row = {**{k: v for k, v in c.items() if k != "overrides"}, "overrides": str(c.get("overrides")),
               "seed": seed, "rel_err": err, "tolerance": tol, "rows_compared": int(use.sum()),
               "rel_err_vs_pure_fp64": err_pure, "finite": finite, "idle_rows_exact": idle_exact,
               "deterministic": deterministic, "ok": ok,
               "seconds": round(time.perf_counter() - started, 1)}
        results.append(row)
        print(f"{'ok  ' if ok else 'FAIL'} {c.get('form', 'direct')} d={c['d']} "
              f"widths={c['widths']} B={rows} steps={n} "
              f"{c['precision']}/{c['wdtype']} max_norm={c.get('max_norm')} "
              f"{c.get('overrides') or ''}: "
              f"rel err {err:.2e} (tol {tol:.0e}, {int(use.sum())} rows) vs pure fp64 {err_pure:.2e}"
              f"{'' if finite else ' NON-FINITE'}{'' if idle_exact else ' IDLE-ROW-MOVED'}"
              f"{'' if deterministic else ' NONDETERMINISTIC'} ({row['seconds']} s)", flush=True)
        dump({"failures": failures, "cases": results, "complete": False})
    print(f"check: {len(results) - failures} ok, {failures} failed (seed base {seed0})")
    return {"failures": failures, "cases": results, "complete": True}


INVARIANCE_CASES = ((300, [257, 129], "ieee"), (300, [257, 129], "bf16"), (4096, [4096], "bf16"))


def check_batch_invariance(device, ascent, va, seed, cases=INVARIANCE_CASES) -> list[dict]:
    """batch_invariant=True: the same rows get the same bits alone, in a small batch and in a
    large one (different default plans), directly and through the engine's graph buckets.
    The default plans' difference is reported for comparison, not judged."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for d, widths, precision in cases:
        mlp = make_head(ascent, d, widths, torch.float32, device, gen)
        if precision == "bf16":
            mlp = ascent.MLPWeights([w.bfloat16() for w in mlp.weights],
                                    [b.bfloat16() for b in mlp.biases])
        states = torch.randn(130, d, generator=gen).to(device)
        alpha = (0.5 + torch.rand(130, generator=gen)).to(device)
        steps = torch.randint(1, 4, (130,), generator=gen).to(device)
        subsets = ([7], list(range(0, 130, 9)), list(range(5, 45)))

        def run(rows, invariant):
            return va.triton_ascend(mlp, states[rows], alpha[rows], steps[rows], 3,
                                    precision=precision, batch_invariant=invariant)

        everything = list(range(130))
        full = run(everything, True)
        same = all(torch.equal(run(rows, True), full[rows]) for rows in subsets)
        full_default = run(everything, False)
        default_diff = max((run(rows, False) - full_default[rows]).abs().max().item()
                           for rows in subsets)
        head = value_head_from(mlp, device)
        head_precision = "fp32" if precision == "ieee" else precision
        edited = head.ascend(states, alpha, steps, precision=head_precision, backend="triton",
                             batch_invariant=True)
        graphs_same = all(torch.equal(head.ascend(states[rows], alpha[rows], steps[rows],
                                                  precision=head_precision, backend="triton",
                                                  batch_invariant=True),
                                      edited[rows]) for rows in subsets)
        torch_same = None  # the torch backend (fp32 only): slabs of 64 rows, eager and graphs
        if precision == "ieee":
            def torch_ascent(rows, form, graphs):
                return head.ascend(states[rows], alpha[rows], steps[rows], precision="fp32",
                                   backend="torch", form=form, batch_invariant=True,
                                   cuda_graphs=graphs)

            torch_same = True
            for form in ("direct", "gram"):
                for graphs in (False, True):
                    whole = torch_ascent(everything, form, graphs)
                    torch_same &= all(torch.equal(torch_ascent(rows, form, graphs), whole[rows])
                                      for rows in subsets)
        ok = same and graphs_same and torch_same is not False and bool(torch.isfinite(full).all())
        out.append({"case": "batch invariance", "d": d, "widths": widths, "precision": precision,
                    "same_bits_direct": same, "same_bits_graphs": graphs_same,
                    "same_bits_torch": torch_same,
                    "default_plans_max_abs_diff": default_diff, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} batch-invariant d={d} widths={widths} {precision}: "
              f"same bits alone, in batches of 15 and 40 and of 130: direct {same}, graph buckets "
              f"{graphs_same}, torch backend {torch_same}; default plans differ by up to "
              f"{default_diff:.2e}", flush=True)
    return out


def check_graph_cache(device, ascent, seed) -> list[dict]:
    """ValueHead.ascend through its CUDA-graph cache (the engine's path) against the eager
    Triton launch of the same head: shrinking and growing batches in several row buckets,
    both precisions; the graphs must really have been captured."""
    gen = torch.Generator().manual_seed(seed)
    # widths of a multiple of 8, as real heads have, so that bf16 runs the descriptor loads
    d = 304
    mlp = make_head(ascent, d, [264, 136], torch.float32, "cpu", gen)
    mlp = ascent.MLPWeights([w * 2 for w in mlp.weights], mlp.biases)
    head = value_head_from(mlp, device)
    rows_out = []
    # auto + fp32 is the torch closed form on CUDA; forced triton + fp32 the kernel's exact path.
    # cuBLAS picks its kernel by row count and the graph cache pads rows to a bucket, so the
    # torch path's graph and eager results differ by fp32 reassociation (H100: 3.9e-5 of the
    # edit at 40 rows); the kernel's plans make them the same bits
    # (auto + fp32 runs the torch closed form's Gram form here: 264 < 2 x 304 x 3 / 4)
    for precision, tol, backend, form in (("fp32", 1e-4, "auto", "auto"),
                                          ("fp32", 1e-5, "triton", "auto"),
                                          ("bf16", 2e-2, "auto", "auto"),
                                          ("bf16", 2e-2, "triton", "gram")):
        for rows in (40, 3, 17, 1, 70, 16):
            states = torch.randn(rows, d, generator=gen).to(device, torch.bfloat16)
            alpha = (0.5 + torch.rand(rows, generator=gen)).to(device)
            steps = torch.randint(0, 5, (rows,), generator=gen).to(device)
            graphed = head.ascend(states, alpha, steps, precision=precision, backend=backend,
                                  cuda_graphs=True, form=form)
            eager = head.ascend(states, alpha, steps, precision=precision, backend=backend,
                                cuda_graphs=False, form=form)
            moved = (steps > 0) & (alpha != 0)
            idle_exact = bool(torch.equal(graphed[~moved], states[~moved]))
            diff = (graphed.float() - eager.float())[moved]
            base = (eager.float() - states.float())[moved]
            err = (diff.norm() / base.norm().clamp_min(1e-30)).item() if moved.any() else 0.0
            captured = head._graphs is not None and head._graphs.captures > 0
            ok = err < tol and idle_exact and captured and bool(torch.isfinite(graphed).all())
            rows_out.append({"case": "graph cache", "precision": precision, "backend": backend,
                             "form": form, "rows": rows,
                             "rel_err_vs_eager": err, "tolerance": tol, "idle_rows_exact": idle_exact,
                             "graphs_captured": head._graphs.captures if head._graphs else 0, "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} graph cache {precision}/{backend}/{form} B={rows}: "
                  f"edit vs eager "
                  f"rel err {err:.2e} (tol {tol:.0e}), graphs captured "
                  f"{rows_out[-1]['graphs_captured']}{'' if idle_exact else ' IDLE-ROW-MOVED'}",
                  flush=True)
    rows_out.append(check_warm_up(device, mlp, gen))
    return rows_out


def check_controller(device, ascent, seed, backend: str = "triton", form: str = "auto",
                     d: int = 304, widths=((264, 136), (200,))) -> dict:
    """The engine's EditController with two value heads (2 and 1 hidden layers): a batch whose
    rows name either head or none (uncontrolled), every fourth with its own radius
    (per-request max_norm), against each head's eager ascent of its own rows alone; the batch
    is gathered per head and replayed through the heads' graph caches. ``d``, ``widths``: the
    heads' sizes (smaller ones for the interpreter's CPU tests)."""
    from vllm_recontrol.config import EngineSettings, HeadSpec, RowControl
    from vllm_recontrol.controller import EditController, RowControls

    gen = torch.Generator().manual_seed(seed + 2)
    heads = {name: new_value_head(make_head(ascent, d, list(layers), torch.float32, "cpu", gen),
                                  device)
             for name, layers in zip(("default", "other"), widths)}
    controls = [RowControl(0.0, 0) if i % 3 == 2 else
                RowControl(0.5 + (i % 5) / 4, 1 + i % 4, head=("other", "default")[i % 3],
                           max_norm=0.05 if i % 4 == 0 else None)
                for i in range(37)]
    rows = RowControls()
    rows.reset(device)
    for i, control in enumerate(controls):
        rows.set(i, control)
    rows.resize(len(controls))
    settings = EngineSettings(value_head="h", value_heads=(("other", HeadSpec("h2")),),
                              backend=backend, ascent_form=form)
    controller = EditController(heads, settings, rows)
    states = torch.randn(len(controls), d, generator=gen).to(device, torch.bfloat16)
    rows.arm()
    edited = controller.maybe_edit(states)
    errors = []
    for name, head in heads.items():
        mine = [i for i, c in enumerate(controls) if c.active and c.head == name]
        alpha = torch.tensor([controls[i].alpha for i in mine], device=device)
        steps = torch.tensor([controls[i].steps for i in mine], device=device)
        radii = torch.tensor([controls[i].max_norm or float("inf") for i in mine], device=device)
        eager = head.ascend(states[mine], alpha, steps, max_norm=radii, backend=backend, form=form,
                            cuda_graphs=False)
        diff = (edited[mine].float() - eager.float()).norm()
        errors.append((diff / (eager.float() - states[mine].float()).norm()).item())
    idle = [i for i, c in enumerate(controls) if not c.active]
    idle_exact = bool(torch.equal(edited[idle], states[idle]))
    tol = 2e-2 if backend == "triton" else 1e-5  # bf16 products vs fp32 closed form
    ok = max(errors) < tol and idle_exact and bool(torch.isfinite(edited).all())
    print(f"{'ok  ' if ok else 'FAIL'} controller, 2 heads, per-row radii, B={len(controls)} "
          f"({backend}, {form} form): "
          f"each head's rows vs its eager ascent rel err {max(errors):.2e} (tol {tol:.0e})"
          f"{'' if idle_exact else ' IDLE-ROW-MOVED'}", flush=True)
    return {"case": "controller two heads", "backend": backend, "form": form,
            "rows": len(controls),
            "rel_err_vs_eager": max(errors), "tolerance": tol, "idle_rows_exact": idle_exact,
            "ok": ok}


def check_warm_up(device, mlp, gen) -> dict:
    """ValueHead.warm_up (the engine start) captures one graph per row bucket, after which
    batches of those buckets and step count capture nothing new and match eager launches."""
    head = new_value_head(mlp, device)
    runs = head.warm_up(70, [4])
    captured = head._graphs.captures if head._graphs else 0
    errors, idle_exact = [], True
    for rows in (40, 3, 70):
        states = torch.randn(rows, head.hidden_size, generator=gen).to(device, torch.bfloat16)
        alpha = (0.5 + torch.rand(rows, generator=gen)).to(device)
        steps = torch.randint(0, 5, (rows,), generator=gen)
        steps[0] = 4  # the warmed-up iteration count
        steps = steps.to(device)
        graphed = head.ascend(states, alpha, steps)
        eager = head.ascend(states, alpha, steps, cuda_graphs=False)
        moved = (steps > 0) & (alpha != 0)
        idle_exact &= bool(torch.equal(graphed[~moved], states[~moved]))
        diff = (graphed.float() - eager.float())[moved]
        errors.append((diff.norm() / (eager.float() - states.float())[moved].norm()).item())
    after = head._graphs.captures if head._graphs else 0
    warm = bool(head._graphs and head._graphs.warm)  # later captures get logged
    ok = (runs == 4 and captured == 4 and after == 4 and max(errors) < 2e-2 and idle_exact
          and warm)
    print(f"{'ok  ' if ok else 'FAIL'} warm-up: {runs} ascents, {captured} graphs captured, "
          f"{after - captured} new captures while serving B = 40/3/70, edit vs eager rel err "
          f"{max(errors):.2e}", flush=True)
    return {"case": "warm-up", "ascents": runs, "graphs_captured": captured,
            "captures_after": after, "rel_err_vs_eager": max(errors), "tolerance": 2e-2,
            "idle_rows_exact": idle_exact, "marked_warm": warm, "ok": ok}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    ascent, va = import_project()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1 in the environment")
        return 2
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index (torch 2.11)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if device.type == "cpu" and not args.check and not args.cpu_sizes:
        args.hidden_sizes, args.steps, args.batch = [48], [2], [1, 3]  # a smoke test
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import triton
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print(f"{device_name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)

    def dump(partial: dict) -> None:
        """Write what there is so far, so that a run stopped by a time limit still reports."""
        if args.json:
            args.json.write_text(json.dumps({**meta, **partial}, indent=1, default=str))
        if args.markdown and "rows" in partial:
            args.markdown.write_text(markdown_table(partial, device_name, args))

    if args.warm_only:
        return run_warm(args, device, ascent, va)
    if args.check:
        result = run_check(args, device, ascent, va, dump)
        status = 1 if result["failures"] else 0
    else:
        result = run_benchmark(args, device, ascent, va, dump)
        print()
        print(markdown_table(result, device_name, args))
        if args.sweep:
            result["summary"] = sweep_summary(result["rows"])
            print("\nBest plan per case (sweep):\n" + result["summary"])
        status = 0
    dump(result)
    return status


if __name__ == "__main__":
    sys.exit(main())
