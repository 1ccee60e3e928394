#!/usr/bin/env python3
"""Fit a two-limit model of on-chip (L2 -> multiprocessor) traffic to measured sweep rows.

Why: the large-batch products (B >= 128) are far from the floor, and the sweeps' tile shapes
move very different amounts of data from L2 into the multiprocessors. This script asks
whether one simple model explains their times, from the JSON that ``bench_kernel.py
--sweep`` (or a bench run) saved, without a GPU:

    time of one product = max(total on-chip bytes / AGGREGATE,
                              bytes of one program * waves / PER_PROGRAM,
                              weight bytes / HBM)

where a program of a BM x BN tile reads its [BM, K-range] slice of the left operand and its
[K-range, BN] slice of W (bf16), and split K adds its fp32 partials (written and read once).
AGGREGATE (bytes/s, the whole chip) and PER_PROGRAM (bytes/s one multiprocessor takes in)
are fitted on the rows of unsplit plans with BN <= 128, over a grid, by the median relative
error; the other kinds of plan (split K, 256-wide tiles) are then compared with what the
fitted model predicts for them. HBM (--hbm-tbs, default the H100's measured 3.0 TB/s copy
rate; the weights read once per product) only matters below the fitted rows' batch sizes. Prints a table per (layers, B, BM, programs) and, with
``--json``, saves the fit.

    python benchmarks/onchip_model.py benchmarks/results/kernel-h100-call5-sweep.json \\
        benchmarks/results/kernel-h100-call6-sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

MULTIPROCESSORS = 132  # H100 SXM; --multiprocessors for other cards
HBM_BYTES_PER_S = 3.0e12  # the H100's measured device copy rate (results file)


# The default plans of calls 5-7 (d = 4096, 132 SMs), for rows saved before bench rows
# recorded their plans: 64x128 with K split 2 at B = 128 (under half a wave of tiles),
# 64x128 at 256, 128x128 at 512
CALLS_5_TO_7_DEFAULTS = {128: (64, 128, 2), 256: (64, 128, 1), 512: (128, 128, 1)}


def plan_of(row: dict) -> dict | None:
    """The row's tile plan: the plans it recorded (the same both ways), else its overrides,
    else a default of calls 5-7; None when unknown."""
    plans = row.get("plans")
    if plans:
        forward, backward = plans.get("forward"), plans.get("backward")
        return dict(forward) if forward and forward == backward else None
    overrides = row.get("overrides") or {}
    if overrides.get("block_m") and overrides.get("block_n"):
        return {"block_m": overrides["block_m"], "block_n": overrides["block_n"],
                "split_k": overrides.get("split_k", 1)}
    if overrides or row.get("d") != 4096 or row["batch"] not in CALLS_5_TO_7_DEFAULTS:
        return None
    bm, bn, split = CALLS_5_TO_7_DEFAULTS[row["batch"]]
    return {"block_m": bm, "block_n": bn, "split_k": split}


def traffic(batch: int, d: int, plan: dict) -> tuple[int, float, float]:
    """(programs, bytes one program reads, total bytes incl. split partials) of one product
    with widths = d."""
    bm, bn, split = plan["block_m"], plan["block_n"], plan["split_k"]
    programs = -(-batch // bm) * -(-d // bn) * split
    per_program = 2.0 * (bm + bn) * (d / split)
    partials = 2 * 4.0 * batch * d * split if split > 1 else 0.0
    return programs, per_program, per_program * programs + partials


def predict_ms(row: dict, plan: dict, aggregate: float, per_program: float,
               multiprocessors: int = MULTIPROCESSORS, hbm: float = HBM_BYTES_PER_S) -> float:
    programs, one, total = traffic(row["batch"], row["d"], plan)
    waves = -(-programs // multiprocessors)
    product = max(total / aggregate, one * waves / per_program, 2.0 * row["d"] ** 2 / hbm)
    return 2 * row["hidden"] * row["steps"] * product * 1e3


# The variant whose products the model describes (a sweep's rows are "triton-graph <plan>",
# a bench's "triton-graph" and "triton-graph tuned"): cuBLAS rows, the engine's call, the
# Gram form (fewer products) and launch variants (PDL, L2 window, ...) are other programs.
MODELLED_VARIANT = "triton-graph"


def usable_rows(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(row, plan) of timed bf16 triton-graph rows at B >= 128 with widths = d and a known
    plan."""
    out = []
    for row in rows:
        if "ms" not in row or row.get("weights", "bf16") != "bf16" or row["batch"] < 128 or \
                str(row.get("variant", "")).split(" ")[0] != MODELLED_VARIANT:
            continue
        plan = plan_of(row)
        if plan is not None:
            out.append((row, plan))
    return out


def is_fitted_kind(plan: dict) -> bool:
    return plan["split_k"] == 1 and plan["block_n"] <= 128


def fit(pairs: list[tuple[dict, dict]], multiprocessors: int = MULTIPROCESSORS) -> dict:
    """Grid search of (AGGREGATE, PER_PROGRAM) minimising the median relative error."""
    fitted = [(r, p) for r, p in pairs if is_fitted_kind(p)]
    if not fitted:
        raise SystemExit("no timed unsplit rows with BN <= 128 at B >= 128 to fit")
    best = None
    for aggregate_tbs in [x / 10 for x in range(30, 151, 5)]:
        for per_program_gbs in range(20, 201, 5):
            errors = [abs(predict_ms(r, p, aggregate_tbs * 1e12, per_program_gbs * 1e9,
                                     multiprocessors) / r["ms"] - 1) for r, p in fitted]
            score = statistics.median(errors)
            if best is None or score < best["median_error"]:
                best = {"aggregate_tbs": aggregate_tbs, "per_program_gbs": per_program_gbs,
                        "median_error": score, "max_error": max(errors),
                        "rows": len(fitted)}
    return best


def table(pairs: list[tuple[dict, dict]], model: dict,
          multiprocessors: int = MULTIPROCESSORS) -> str:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row, plan in pairs:
        programs, _, _ = traffic(row["batch"], row["d"], plan)
        kind = ("fitted" if is_fitted_kind(plan) else
                "split K" if plan["block_n"] <= 128 else f"BN {plan['block_n']}")
        predicted = predict_ms(row, plan, model["aggregate_tbs"] * 1e12,
                               model["per_program_gbs"] * 1e9, multiprocessors)
        groups[(row["hidden"], row["batch"], f"{plan['block_m']}x{plan['block_n']}",
                plan["split_k"], programs, kind)].append(row["ms"] / predicted)
    lines = ["| hidden layers | B | tile | split K | programs | kind | rows | measured / "
             "model |", "|" + "---|" * 8]
    for (hidden, batch, tile, split, programs, kind), ratios in sorted(groups.items()):
        spread = (f"{min(ratios):.2f}" if len(ratios) == 1
                  else f"{min(ratios):.2f}-{max(ratios):.2f}")
        lines.append(f"| {hidden} | {batch} | {tile} | {split} | {programs} | {kind} | "
                     f"{len(ratios)} | {spread} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="bench_kernel.py JSON files")
    p.add_argument("--multiprocessors", type=int, default=MULTIPROCESSORS)
    p.add_argument("--json", type=Path, help="save the fit here")
    args = p.parse_args(argv)
    rows = [r for path in args.results for r in json.loads(path.read_text()).get("rows", [])]
    pairs = usable_rows(rows)
    model = fit(pairs, args.multiprocessors)
    print(f"fit on {model['rows']} unsplit rows with BN <= 128: aggregate "
          f"{model['aggregate_tbs']:.1f} TB/s, per program {model['per_program_gbs']} GB/s; "
          f"median error {model['median_error']:.1%}, largest {model['max_error']:.1%}")
    print(table(pairs, model, args.multiprocessors))
    if args.json:
        args.json.write_text(json.dumps({"model": model, "inputs": [str(p) for p in
                                                                    args.results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
