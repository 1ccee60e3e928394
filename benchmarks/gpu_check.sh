#!/usr/bin/env bash
# GPU correctness checks and benchmarks of the Triton ascent kernel, in one call.
#
# Runs from a plain checkout (no pip install, no vLLM needed: torch, triton and transformers
# suffice). Phases, each under its own time limit (seconds, overridable):
#   warm   (WARM_LIMIT 150)  background: compile every Triton kernel (and torch.compile graph)
#                            the timed phases will launch, in WARM_SHARDS processes side by side
#   check  (CHECK_LIMIT 240) correctness against float64, and the engine's CUDA-graph cache
#                            against eager launches, warm-up, split-K fix-up, tensor-descriptor
#                            (TMA) loads, batch invariance, the Gram-form kernel; runs while
#                            the warm-up compiles
#   sweep  (SWEEP_LIMIT 130) Triton plan overrides at B 128, 256, 512, 1 and 2 hidden layers
#                            (pipeline depths, plain and TMA loads, warp specialization)
#   bench  (BENCH_LIMIT 220) issue 3's variants, the Gram form's and the engine's, d 4096,
#                            1 and 2 hidden layers, 30 steps, B 1..512; with the sweep's JSON, plus a
#                            "triton-graph tuned" row per case the sweep found a faster plan for
#                            (the last sweep's JSON is also kept in /tmp, so a bench in a later
#                            call on the same warm machine still finds it)
#   extra  (EXTRA_LIMIT 60)  triton-graph vs torch-graph at d 2048 / 8192 and steps 1 / 200
#   grid   (GRID_LIMIT 300)  not run by default: issue 3's whole grid (d 2048/4096/8192 x 1-2
#                            hidden layers x steps 1/30/200 x B 1..512) for triton-graph and
#                            torch-graph, for a session with device time to spare
# Writes under $OUT (default ./out), at most 8 files: run.log (everything printed), warm.log,
# check.json, bench.json, bench.md, sweep.json, extra.json, grid.json. JSON and markdown are
# rewritten after every row, so a phase stopped by its limit still reports what it measured.
# PHASES (default "check sweep bench") picks the phases to run; they run in the order above.
# Precompiled kernels: if .triton-sm90.tgz (benchmarks/precompile.py, built on a machine without
# a GPU) was carried along and TRITON_CACHE_DIR is unset, it is unpacked to the path recorded in
# it and used as Triton's cache; the log says how many kernels still had to compile here.
# Exit status: 0 when the checks passed and every timed phase ran to its end; 2 at once when
# torch/triton do not import or a phase needs CUDA and there is none. Each run truncates
# run.log and warm.log and removes the files of the phases it runs before they start.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
BENCH="benchmarks/bench_kernel.py"
LAST_SWEEP="${LAST_SWEEP:-/tmp/recontrol-last-sweep.json}"  # outlives $OUT on a warm machine
WARM_SHARDS="${WARM_SHARDS:-12}"
EXTRA_ARGS=(--variants torch-graph triton-graph --layers 2 --batch 1 32 256)
PHASES=" ${PHASES:-check sweep bench} "
check_status=0 bench_status=0 sweep_status=0 extra_status=0 grid_status=0
GRID_ARGS=(--variants torch-graph triton-graph)
phase() { [[ "$PHASES" == *" $1 "* ]]; }
# this run's files only: an $OUT used before (OUT=out) must not pass off an earlier run's
# results (a sweep that failed here was fitted and used from the old sweep.json)
: > "$OUT/run.log"
: > "$OUT/warm.log"
phase check && rm -f "$OUT/check.json"
phase sweep && rm -f "$OUT/sweep.json" "$LAST_SWEEP"  # a failed sweep leaves no tuned rows
phase bench && rm -f "$OUT/bench.json" "$OUT/bench.md"
phase extra && rm -f "$OUT/extra.json" "$OUT/extra.a.json" "$OUT/extra.b.json"
phase grid && rm -f "$OUT/grid.json"
exec > >(tee -a "$OUT/run.log") 2>&1

date -u
CACHE_ARCHIVE="${CACHE_ARCHIVE:-$ROOT/.triton-sm90.tgz}" PRECOMPILED_FILES=""
if [ -z "${TRITON_CACHE_DIR:-}" ] && [ -f "$CACHE_ARCHIVE" ]; then
    manifest="$(tar xzf "$CACHE_ARCHIVE" -O ./recontrol-precompile.json)"
    cache_path="$(printf '%s' "$manifest" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
    mkdir -p "$cache_path" && tar xzf "$CACHE_ARCHIVE" -C "$cache_path" \
        && export TRITON_CACHE_DIR="$cache_path" \
        && PRECOMPILED_FILES="$(find "$cache_path" -type f | wc -l)"
    echo "precompiled Triton cache in ${TRITON_CACHE_DIR:-(failed to unpack)}: $(printf '%s' "$manifest" | tr -d '\n')"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
"$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
try:  # part of Triton's cache key: a precompiled cache needs the same
    import re
    from triton.backends.nvidia.compiler import get_ptxas_version
    found = re.search(r"release [\d.]+, V[\d.]+", get_ptxas_version(90))
    print("ptxas", found.group(0) if found else get_ptxas_version(90))
except Exception as exc:
    print("ptxas version unknown:", exc)
try:  # Triton's own part of the cache key (sources + libtriton), as precompile.py records it
    import hashlib
    from triton.runtime.cache import triton_key
    print("triton_key", hashlib.sha256(triton_key().encode()).hexdigest()[:16])
except Exception as exc:
    print("triton_key unknown:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
[ $? -eq 0 ] || { echo "gpu_check: torch and triton do not import with $PY (PYTHON=...)"; exit 2; }
gpu_phases=0
for name in check sweep bench extra grid; do phase "$name" && gpu_phases=1; done
if [ "$gpu_phases" -eq 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: CUDA is not available here; every phase of '$(echo $PHASES)' needs a GPU"
    exit 2
fi

echo "== warm-up: ${WARM_SHARDS} compile processes per timed phase, in the background"
warm_pids=()
warm() {  # warm SHARDS ARGS...: compile what `bench_kernel.py ARGS` will launch
    local shards="$1"; shift
    for ((i = 0; i < shards; i++)); do
        TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${WARM_LIMIT:-150}" "$PY" "$BENCH" --warm-only \
            --shard "$i" --shards "$shards" "$@" >>"$OUT/warm.log" 2>&1 &
        warm_pids+=($!)
    done
}
# shellcheck disable=SC2086
phase bench && warm "$WARM_SHARDS" ${BENCH_ARGS:---quick}
phase grid && warm 6 "${GRID_ARGS[@]}"
phase sweep && warm 4 --sweep
if phase extra; then
    warm 2 --hidden-sizes 2048 8192 --steps 30 "${EXTRA_ARGS[@]}"
    warm 1 --hidden-sizes 4096 --steps 1 200 "${EXTRA_ARGS[@]}"
fi

if phase check; then
    echo "== correctness checks (limit ${CHECK_LIMIT:-240}s)"
    timeout "${CHECK_LIMIT:-240}" "$PY" "$BENCH" --check --json "$OUT/check.json"
    check_status=$?
fi

for pid in "${warm_pids[@]}"; do wait "$pid"; done
[ -s "$OUT/warm.log" ] && awk '/^warm shard/ {n += $4; f += $7; s++}
     END {print s " warm-up processes: " n " launches compiled, " f " failed"}' "$OUT/warm.log"

if phase sweep; then
    echo "== plan sweep (limit ${SWEEP_LIMIT:-130}s)"
    timeout "${SWEEP_LIMIT:-130}" "$PY" "$BENCH" --sweep --json "$OUT/sweep.json"
    sweep_status=$?
    [ -f "$OUT/sweep.json" ] && cp "$OUT/sweep.json" "$LAST_SWEEP"
    # the on-chip traffic model fitted to this sweep (no GPU needed; informative only)
    [ -f "$OUT/sweep.json" ] && { "$PY" "$ROOT/benchmarks/onchip_model.py" "$OUT/sweep.json" \
        || echo "onchip_model.py: no fit"; }
fi

if phase bench; then
    echo "== benchmark, quick preset (limit ${BENCH_LIMIT:-220}s)"
    tuned=()
    [ -f "$LAST_SWEEP" ] && tuned=(--plans-from "$LAST_SWEEP") && echo "tuned rows from $LAST_SWEEP"
    # BENCH_ARGS (default --quick): e.g. "--quick --variants torch-graph triton-graph --batch 256"
    # shellcheck disable=SC2086
    timeout "${BENCH_LIMIT:-220}" "$PY" "$BENCH" ${BENCH_ARGS:---quick} "${tuned[@]}" --json "$OUT/bench.json" \
        --markdown "$OUT/bench.md"
    bench_status=$?
fi

if phase extra; then
    echo "== other sizes and step counts (limit ${EXTRA_LIMIT:-60}s)"
    timeout "${EXTRA_LIMIT:-60}" bash -c '
        "$0" "$1" --hidden-sizes 2048 8192 --steps 30 "${@:3}" --json "$2.a.json" &&
        "$0" "$1" --hidden-sizes 4096 --steps 1 200 "${@:3}" --json "$2.b.json"' \
        "$PY" "$BENCH" "$OUT/extra" "${EXTRA_ARGS[@]}"
    extra_status=$?
    "$PY" - "$OUT/extra" <<'EOF'
import json, os, sys
parts = [json.load(open(p)) for p in (sys.argv[1] + ".a.json", sys.argv[1] + ".b.json")
         if os.path.exists(p)]
if parts:
    merged = {**parts[0], "rows": [r for p in parts for r in p.get("rows", [])]}
    json.dump(merged, open(sys.argv[1] + ".json", "w"), indent=1)
for p in (sys.argv[1] + ".a.json", sys.argv[1] + ".b.json"):
    if os.path.exists(p):
        os.remove(p)
EOF
fi

if phase grid; then
    echo "== issue 3's whole grid, triton-graph and torch-graph (limit ${GRID_LIMIT:-300}s)"
    timeout "${GRID_LIMIT:-300}" "$PY" "$BENCH" "${GRID_ARGS[@]}" --json "$OUT/grid.json"
    grid_status=$?
fi

if [ -n "$PRECOMPILED_FILES" ]; then
    echo "precompiled cache: $(( $(find "$TRITON_CACHE_DIR" -type f | wc -l) - PRECOMPILED_FILES ))" \
         "files added here (kernels that were not precompiled, or a cache key that differs)"
fi
echo "== exit status: check ${check_status}, bench ${bench_status}, sweep ${sweep_status}," \
     "extra ${extra_status}, grid ${grid_status} (124 = time limit)"
date -u
for s in "$check_status" "$bench_status" "$sweep_status" "$extra_status" "$grid_status"; do
    [ "$s" -eq 0 ] || exit 1
done
