#!/usr/bin/env bash
# Build .triton-sm90.tgz (compiled sm_90 kernels for gpu_check.sh) on this CPU machine, so
# that the device's minutes go to measuring rather than compiling. What "Next GPU session",
# item 1, of benchmarks/results/kernel-h100.md describes, as one command:
#   bash benchmarks/build_device_archive.sh [precompile.py options, e.g. --phases check bench]
# Needs the local package index (pip) for Triton 3.6.0, the device image's version; the
# cp312 wheel gives the cache key the device's Python computes (see precompile.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T36=${T36:-/tmp/t36}
W312=${W312:-/tmp/w312}
if [ ! -d "$T36/triton" ]; then
    "$PY" -m pip install -q --no-deps --target "$T36" triton==3.6.0
fi
wheel=$(ls "$W312"/triton-3.6.0-cp312-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 triton==3.6.0 -d "$W312"
    wheel=$(ls "$W312"/triton-3.6.0-cp312-*.whl | head -1)
fi
PYTHONPATH="$T36" "$PY" benchmarks/precompile.py --key-wheel "$wheel" "$@"
ls -l .triton-sm90.tgz
