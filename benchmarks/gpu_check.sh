#!/usr/bin/env bash
# GPU correctness checks and the quick benchmark of the Triton ascent kernel, in one call.
#
# Runs from a plain checkout (no pip install, no vLLM needed: torch, triton and transformers
# suffice). Writes under $OUT (default ./out): env.txt, check.json, check.log, bench.json,
# bench.md, bench.log (JSON and markdown are rewritten after every case, so a part stopped by
# its time limit still reports what it measured). Expected on an H100: 1-2 min of checks,
# mostly Triton compiles, and 3-4 min of benchmark (compiles again: Triton, torch.compile);
# the limits (130 s + 250 s, override with CHECK_LIMIT / BENCH_LIMIT) keep the whole call
# under 6.5 minutes.
# Exit status: 0 when the checks passed and the benchmark ran.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
CHECK_LIMIT="${CHECK_LIMIT:-130}"
BENCH_LIMIT="${BENCH_LIMIT:-250}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
    "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== correctness checks (limit ${CHECK_LIMIT}s)"
timeout "$CHECK_LIMIT" "$PY" benchmarks/bench_kernel.py --check --json "$OUT/check.json" \
    2>&1 | tee "$OUT/check.log"
check_status=${PIPESTATUS[0]}

echo "== benchmark, quick preset (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" benchmarks/bench_kernel.py --quick --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== check exit status ${check_status}, benchmark exit status ${bench_status}" \
     "(124 = time limit)"
if [ "$check_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    exit 1
fi
