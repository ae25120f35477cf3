#!/usr/bin/env bash
# Runs ON the GPU machine from the project root, with .device/ carried (TVM runtime bundle from
# ../shared/device/pack-tvm.sh runtime, setup-tvm.sh beside it, and the bundle of `bench/stage3_cuda.py prepare`):
#   bash bench/stage3_cuda_device.sh [measure options]    (pool parts copied to /tmp/sgpool by earlier runs)
set -eo pipefail
source .device/setup-tvm.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 bench/stage3_cuda.py measure --out "$OUT" "$@" 2>&1 | tee "$OUT/measure.log"
