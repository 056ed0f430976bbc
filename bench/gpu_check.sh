#!/usr/bin/env bash
# GPU readiness check of the MAISI and BraTS bundles, for a bare GPU machine whose python3 already has torch.
#
#   bash bench/gpu_check.sh fetch        # on a machine with pip access: download the pure-Python wheels into .whl/
#   bash bench/gpu_check.sh [ARGS...]    # on the GPU machine: install .whl/*.whl if present, run bench/gpu_check.py
#   bash bench/gpu_check.sh --tiny       # CPU smoke run in seconds (the test suite runs this)
#
# The run prints one table next to the published MAISI A100 80 GB figures and finishes in well under
# 8 minutes on an A100/H100/H200 (rflow-ct pairs at 256x256x128 and 512x512x512 with random weights,
# the BraTS training steps, float32/float16/bfloat16 forwards with and without flash attention).
# Extra ARGS go to bench/gpu_check.py (e.g. --json-out "$OUT/gpu_check.json").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(monai==1.6.1 nibabel==5.4.2 pytorch-ignite==0.5.5 fire==0.7.1 einops==0.8.2)

if [[ "${1:-}" == "fetch" ]]; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" bench/gpu_check.py "$@"
