"""Launch plans of the ascent kernel's products: tile shapes, K splits, pipeline depth and
Hopper features, chosen from the product's shape and the device (no autotuning, so the same
shapes on the same device always run the same code: the kernel's determinism rests on it).
Why apart from the kernels: the rules are host-side heuristics, measured on an H100
(benchmarks/results/kernel-h100.md), that change with each sweep while the kernels do not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch
import triton


@dataclass(frozen=True)
class GemmPlan:
    """Tile shape, K split and launch options of one product (a pure function of the shapes).

    ``fixup`` (0/1): with split K, the last split of each tile finishes it in place instead of
    a second (reduce) launch; off until measured on a GPU (see the H100 results file).
    ``evict_last`` (0/1): load the weights with an L2 evict-last hint, so that a head that
    fits in L2 stays there from one product to the next (issue 3's stretch goal). Triton
    3.6 keeps the hint only on plain loads, i.e. with ``num_stages`` 1 (checked in the sm_90
    PTX: the pipelined cp.async loads lose it); off until measured.
    ``tma`` (0/1): load both operand tiles through tensor descriptors (Hopper's bulk copy
    engine) where the product allows it (``tma_eligible``) and the GPU has them (sm_90 and
    later), plain loads elsewhere; on for bf16 tensor-core tiles (measured on an H100).
    ``warp_specialize`` (0/1): ask Triton to split the K loop into producer (loads) and
    consumer (MMA) warps (``tl.range(..., warp_specialize=True)``). Only with descriptor
    loads: compiled offline for sm_90 with Triton 3.6, the pass split 4-warp TMA tiles into
    partitions, left 8-warp tiles alone, and failed on plain loads. A sweep candidate, not
    measured; ignored by the interpreter.
    ``pdl`` (0/1): launch the product as a programmatic dependent launch (sm_90 and later),
    so that its launch overlaps the previous product (the kernel waits for that one's results
    before touching memory); for the gaps between the 2L launches of a step. With split K
    the reduce launch is one too (the next product waits for it in turn). Not measured;
    ignored by the interpreter."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    fixup: int = 0
    evict_last: int = 0
    tma: int = 0
    warp_specialize: int = 0
    pdl: int = 0

    def k_split(self, K: int) -> int:
        """K range per split, a multiple of block_k so that splits never share a tile."""
        return triton.cdiv(triton.cdiv(K, self.split_k), self.block_k) * self.block_k

    def splits(self, K: int) -> int:
        """Number of non-empty K splits."""
        return triton.cdiv(K, self.k_split(K))

    def finishes_in_place(self, K: int) -> bool:
        """Whether the last split finishes each tile (fix-up) instead of a reduce launch."""
        return bool(self.fixup) and self.splits(K) > 1

    @property
    def weight_eviction(self) -> str:
        """The weight loads' ``eviction_policy`` ("" is Triton's default)."""
        return "evict_last" if self.evict_last else ""


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _compute_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _sm90_features(device: torch.device) -> bool:
    """Whether plans may use Hopper's features here (tensor descriptors for ``tma``,
    programmatic dependent launch for ``pdl``): sm_90 and later; and the interpreter, which
    emulates descriptors so that CPU tests run that code (``pdl`` stays off there)."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _compute_capability(index)[0] >= 9


def _device_programs(device: torch.device) -> int:
    """Programs that fill the chip once (multiprocessor count); small under the interpreter."""
    if device.type != "cuda":
        return 4
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _wave_split(tiles: int, n_programs: int, max_split: int) -> int:
    """K splits for ``tiles`` output tiles: none from 3/4 of a wave of programs up, else as
    many as make whole waves (``n_programs // tiles``), at most ``max_split``, at least 1."""
    if tiles * 4 >= n_programs * 3:
        return 1
    return max(1, min(n_programs // tiles, max_split))


def batch_invariant_plan(N: int, K: int, *, precision: str, n_programs: int) -> GemmPlan:
    """One plan for every row count: rows are computed independently inside a tile (each
    output element is one fixed-order dot product), so with the tile shape and the K split
    fixed, a row gets the same bits alone or in any batch. The shape is the large-batch
    tensor-core tile (CUDA-core tiles for "ieee"), K split into whole waves of the column
    tiles alone: at B = 1 it still streams the weights over the whole chip, at large B it
    reads them from L2 once per 64-row tile and pays for the split partials."""
    if precision == "ieee":
        bm, bn, bk, warps, stages = 32, 64, 32, 4, 3
    else:
        bm, bn, warps, stages = 64, 128, 4, 4
        bk = 64 if precision == "bf16" else 32
    split = _wave_split(triton.cdiv(N, bn), n_programs, K // (4 * bk))
    return GemmPlan(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps,
                    num_stages=stages)


def plan_gemm(M: int, N: int, K: int, *, w_k_contiguous: bool, weight_bytes: int,
              precision: str, n_programs: int, interpret: bool,
              overrides: Mapping[str, int] | None = None,
              batch_invariant: bool = False) -> GemmPlan:
    """Choose the tiles of one product C[M, N] = A[M, K] @ Wop[K, N].

    Small M streams the weights (32-column blocks, 16 KB of W per pipeline stage, split K only
    below 3/4 of a wave); large M uses 64x128 tensor-core tiles (smaller CUDA-core tiles for
    "ieee"). Both directions follow one rule (``w_k_contiguous`` says which one this is; the
    H100 sweep found the same best shape for both).
    ``overrides`` (block_m, block_n, block_k, split_k, num_warps, num_stages, fixup,
    evict_last, tma, warp_specialize, pdl) replace the heuristic's choice, for tests and
    tuning.
    ``batch_invariant``: ignore M (see ``batch_invariant_plan``; also under the interpreter, so CPU tests run that
    plan).
    """
    if batch_invariant:
        plan = batch_invariant_plan(N, K, precision=precision, n_programs=n_programs)
        if overrides:
            raise ValueError("plan overrides and batch_invariant exclude each other")
        return plan
    tma = 0
    if interpret:  # tiny tiles: the interpreter's cost grows with the tile volume
        bm, bn, bk, warps, stages, split = 16, 16, 32, 4, 1, 1
    elif M <= 64:
        # Weight streaming. Measured on an H100 (d = 4096, bf16, B = 1 and 16): 32-column
        # blocks with 16 KB of W per pipeline stage (BK 256 in bf16) beat 16-column blocks and
        # 8 KB stages in both directions, and one program per 32 columns (128 programs) beat
        # splitting K to fill all 132 multiprocessors; split K only below 3/4 of a wave.
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bn = 32
        bk = max(32, min(16384 // (bn * weight_bytes), triton.next_power_of_2(K)))
        if precision == "ieee" and weight_bytes < 4:
            # exact FMA products of bf16 weights convert the tile in registers: compiled for
            # sm_90, 256 deep spilled 3.8 KB a thread, 128 deep 184 bytes, 64 deep none (167
            # registers); fp32 weights keep their 128 (62 registers)
            bk = min(bk, 64)
        split = _wave_split(triton.cdiv(M, bm) * triton.cdiv(N, bn), n_programs,
                            K // (2 * bk))  # at least 2 K tiles per split
        warps, stages = 4, 4
    elif precision == "ieee":  # CUDA-core products: smaller tiles keep registers in check
        bm, bn = next(((m, n) for m, n in ((64, 64), (32, 64), (32, 32))
                       if triton.cdiv(M, m) * triton.cdiv(N, n) * 4 >= n_programs * 3), (32, 32))
        bk, warps, stages, split = 32, 4, 3, 1
    else:
        # Tensor cores. Measured on an H100 (d = 4096, 1 and 2 hidden layers, 30 steps): at
        # B = 128 and 256, 64x128 tiles with one warp group beat 128x128 and 64x256; at B = 512,
        # where 128x128 tiles make a whole wave, 128x128 with two warp groups beat 64x128.
        # bf16: operand tiles through tensor descriptors and deeper pipelines (6 and 5 stages):
        # in one sweep 2-13 % under the 4-stage plain loads, across two calls 2-6 %; fewer
        # on-chip bytes (128x256 tiles, split K with fix-up) made it slower, and so did split
        # K at B = 128 (half a wave of tiles).
        # Below 3/4 of a wave (1/2 for bf16) K is split into whole waves.
        bf16 = precision == "bf16"
        if triton.cdiv(M, 128) * triton.cdiv(N, 128) * 4 >= n_programs * 3:
            bm, bn, warps, stages = 128, 128, 8, 5 if bf16 else 4
        else:
            bm, bn, warps, stages = 64, 128, 4, 6 if bf16 else 4
        bk = 64 if bf16 else 32
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        split = 1 if bf16 and 2 * tiles >= n_programs else _wave_split(tiles, n_programs,
                                                                        K // (4 * bk))
        tma = int(bf16)
    plan = dict(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps,
                num_stages=stages, fixup=0, evict_last=0, tma=tma, warp_specialize=0, pdl=0)
    if overrides:
        unknown = set(overrides) - set(plan)
        if unknown:
            raise ValueError(f"unknown plan overrides {sorted(unknown)}; known: {sorted(plan)}")
        plan.update({k: int(v) for k, v in overrides.items()})
    return GemmPlan(**plan)
