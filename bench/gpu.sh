#!/usr/bin/env bash
# ResNet-50 on a lent GPU, in one call (about 4-6 minutes; see bench/gpu.py for what is measured):
#   here:        bash bench/gpu_prepare.sh
#   device tool: run(command="bash bench/gpu.sh", carry=[".bench-gpu"], timeout_s=540)
# Prints a table (img/s and the ratio to the card's forward-only rate) last; the full log is in $OUT/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bench-gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench-gpu/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.log"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' \
    | tee -a "$OUT/gpu.log"
python3 -m bench.gpu --photos .bench-gpu/photos "$@" 2>&1 | tee -a "$OUT/gpu.log"
