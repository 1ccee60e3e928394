#!/usr/bin/env python3
"""Registers, spills and shared memory of the ascent kernel's launch plans, without a GPU.

Compiles ``_ascent_gemm_kernel`` for a CUDA target (default sm_90, the H100/H200) with the
installed Triton's own NVIDIA back end and reads the cubin's resource usage with the
``cuobjdump`` that Triton ships. Why: the device is lent for a few minutes a session, so
candidates that spill registers or do not use the tensor-core instructions expected of them
should be found on the CPU machine, before they cost device time. The numbers are those of
the Triton version that runs this script; the device image may have another (its version is
printed and saved).

Rows: for each batch size, the default plan of each of the four products of a 2-hidden-layer
step at d = widths = --hidden-size (forward into a hidden layer, forward into the last hidden
layer, backward through a middle layer, backward with the update epilogue), with ``--sweep``
also ``bench_kernel.py``'s sweep candidates, and the batch-invariant plans. A split-K plan
without fix-up compiles the partial-sum epilogue instead (its reduce kernel is not listed).

    python benchmarks/sm90_resources.py --sweep --json /tmp/sm90.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):  # the interpreter's kernels cannot be compiled
    sys.exit("sm90_resources.py compiles real kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from kernels import launch_plans as plans  # noqa: E402
from kernels import value_ascent as va  # noqa: E402

# (role, forward?, epilogue) of the products of one step with 2 hidden layers
PRODUCTS = (("fwd", True, va.EPI_FWD.value), ("fwd-last", True, va.EPI_FWD_OUT.value),
            ("bwd-mid", False, va.EPI_MID.value), ("bwd-update", False, va.EPI_UPDATE.value))
_EPILOGUE_NAMES = {va.EPI_FWD.value: "fwd", va.EPI_FWD_OUT.value: "fwd-out",
                   va.EPI_MID.value: "mid", va.EPI_UPDATE.value: "update",
                   va.EPI_PARTIAL.value: "partial"}


@dataclass
class Usage:
    """One compiled launch: what it is and what it costs the multiprocessor."""

    batch: int
    source: str        # "default", "sweep <label>" or "invariant"
    product: str
    plan: str
    epilogue: str
    fixup: bool
    shared_kb: float
    registers: int
    spill_bytes: int   # per-thread stack frame (cuobjdump STACK): registers spilled to memory
    mma: str           # "wgmma" (Hopper tensor cores), "mma" (older tensor-core path), "fma"
    hinted_loads: int  # loads that carry an L2 cache-policy hint (the plan's evict_last)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128, 256, 512])
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--precision", choices=va.PRECISIONS, default="bf16")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors the plans assume")
    p.add_argument("--sweep", action="store_true", help="add bench_kernel.py's sweep candidates")
    p.add_argument("--overrides", type=json.loads, action="append", default=[],
                   help="also compile this plan_gemm override (JSON, e.g. "
                        "'{\"num_stages\": 1, \"evict_last\": 1}'; repeatable)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    return p.parse_args(argv)


def _signature(forward: bool, precision: str, epilogue: int, constants: dict) -> tuple:
    """Argument types as the launcher would see them: pointers 16-byte aligned, sizes
    divisible by 16, and W's contiguous stride specialised to 1 as Triton does at launch."""
    act = "bf16" if precision == "bf16" else "fp32"
    weight = "bf16" if precision == "bf16" else "fp32"
    pointers = dict(a_ptr=act, u_ptr="fp32", wout_ptr=weight, w_ptr=weight,
                    out_ptr="fp32" if epilogue in (va.EPI_UPDATE.value, va.EPI_PARTIAL.value)
                    else act, bias_ptr=weight, maskin_ptr=act, state_ptr="fp32", x_ptr=act,
                    alpha_ptr="fp32", steps_ptr="i64", sq_in_ptr="fp32", sq_out_ptr="fp32",
                    part_ptr="fp32", count_ptr="i32", radius_ptr="fp32")
    unit_stride = "stride_wk" if forward else "stride_wn"
    constants = {**constants, unit_stride: 1}
    signature, attrs = {}, {}
    kernel = va._ascent_gemm_kernel
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ("stride_wk", "stride_wn", "N", "K", "k_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_product(plan: plans.GemmPlan, forward: bool, epilogue: int, fixup: bool,
                    precision: str, arch: int):
    """Compile one launch of the GEMM kernel for ``arch`` (no device needed)."""
    constants = dict(PROLOGUE=va.PRO_PLAIN.value, EPILOGUE=epilogue, DOT=precision,
                     INTERPRET=False, PROJECT=False, ACT_BF16=precision == "bf16",
                     SQ_CHUNK=va._SQ_CHUNK, BM=plan.block_m, BN=plan.block_n, BK=plan.block_k,
                     FIXUP=fixup,
                     FIX_BN=va.fixup_block_n(plan, fixup, project=False, interpret=False),
                     W_EVICT=plan.weight_eviction, TMA=False, W_K_CONTIGUOUS=forward,
                     WARP_SPECIALIZE=False,
                     a_desc=None, w_desc=None)
    signature, constants, attrs = _signature(forward, precision, epilogue, constants)
    source = ASTSource(va._ascent_gemm_kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))


def _cuobjdump() -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"this Triton ships no cuobjdump at {path}")
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG and STACK of the one kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_cuobjdump()), "-res-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return found


def hinted_loads(ptx: str) -> int:
    """Global loads with an L2 cache-policy operand (``createpolicy`` + ``L2::cache_hint``)."""
    return len(re.findall(r"\bld\.global[.\w:]*\.L2::cache_hint", ptx))


def mma_kind(ptx: str) -> str:
    """Which multiply instructions the kernel's main loop uses."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma"


def plan_label(plan: plans.GemmPlan) -> str:
    return (f"{plan.block_m}x{plan.block_n}x{plan.block_k} w{plan.num_warps} "
            f"st{plan.num_stages} s{plan.split_k}" + (" fix" if plan.fixup else "")
            + (" evict-last" if plan.evict_last else ""))


def candidate_plans(batch: int, args) -> list[tuple[str, str, bool, int, plans.GemmPlan]]:
    """(source, product, forward, epilogue, plan) for one batch size."""
    d = args.hidden_size
    weight_bytes = 2 if args.precision == "bf16" else 4
    sources: list[tuple[str, dict | None]] = [("default", None)]
    if args.sweep:
        import bench_kernel
        sources += [(f"sweep {label}", ov) for label, ov in bench_kernel.sweep_configs(batch)]
    sources += [("overrides " + json.dumps(ov, sort_keys=True), ov) for ov in args.overrides]
    out = []
    for source, overrides in sources:
        by_direction = va.overrides_by_direction(overrides)
        for product, forward, epilogue in PRODUCTS:
            plan = plans.plan_gemm(batch, d, d, w_k_contiguous=forward,
                                   weight_bytes=weight_bytes, precision=args.precision,
                                   n_programs=args.sms, interpret=False,
                                   overrides=by_direction["forward" if forward else "backward"])
            out.append((source, product, forward, epilogue, plan))
    plan = plans.batch_invariant_plan(d, d, precision=args.precision, n_programs=args.sms)
    out += [("invariant", product, forward, epilogue, plan)
            for product, forward, epilogue in PRODUCTS]
    return out


def collect(args) -> list[Usage]:
    """Compile every distinct launch once; rows for every (batch, source, product)."""
    compiled: dict[tuple, tuple[float, dict, str]] = {}
    rows = []
    d = args.hidden_size
    for batch in args.batch:
        for source, product, forward, epilogue, plan in candidate_plans(batch, args):
            dropped = [name for name, on in (("tma", plan.tma), ("warp specialization",
                                                                plan.warp_specialize),
                                             ("pdl", plan.pdl)) if on]
            if dropped:  # descriptor arguments are not built here: the same tile with plain
                # loads, one warp group, a plain launch. Its registers are NOT those of a
                # warp-specialized kernel (precompile.py --resources compiles the real ones)
                plan = dataclasses.replace(plan, tma=0, warp_specialize=0, pdl=0)
                source += f" ({', '.join(dropped)}: compiled without)"
            fixup = plan.finishes_in_place(d)
            if plan.splits(d) > 1 and not fixup:
                epilogue = va.EPI_PARTIAL.value
            key = (plan, forward, epilogue, fixup)
            if key not in compiled:
                kernel = compile_product(plan, forward, epilogue, fixup, args.precision,
                                         args.arch)
                ptx = kernel.asm["ptx"]
                compiled[key] = (kernel.metadata.shared / 1024, resource_usage(kernel.asm["cubin"]),
                                 mma_kind(ptx), hinted_loads(ptx))
            shared_kb, usage, mma, hints = compiled[key]
            rows.append(Usage(batch, source, product, plan_label(plan),
                              _EPILOGUE_NAMES[epilogue], fixup, round(shared_kb, 1),
                              usage["REG"], usage.get("STACK", 0), mma, hints))
    return rows


def markdown(rows: list[Usage]) -> str:
    head = ("| B | plan source | product | plan | epilogue | shared KB | registers | spill B "
            "| mma | L2-hinted loads |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.batch} | {r.source} | {r.product} | {r.plan} | {r.epilogue} | "
                     f"{r.shared_kb:g} | {r.registers} | {r.spill_bytes} | {r.mma} | "
                     f"{r.hinted_loads} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = collect(args)
    print(f"Triton {triton.__version__}, sm_{args.arch}, d = {args.hidden_size}, "
          f"{args.precision} products, plans for {args.sms} multiprocessors")
    print(markdown(rows))
    spilling = sorted({(r.plan, r.epilogue) for r in rows if r.spill_bytes})
    print(f"{len(spilling)} launches spill: " + "; ".join(f"{p} {e}" for p, e in spilling))
    if args.json:
        args.json.write_text(json.dumps(
            dict(triton=triton.__version__, arch=args.arch, hidden_size=args.hidden_size,
                 precision=args.precision, sms=args.sms, rows=[asdict(r) for r in rows]),
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
