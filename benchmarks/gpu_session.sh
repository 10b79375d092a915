#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device tool: `bash benchmarks/gpu_session.sh`):
# build against the machine's own torch, run the whole test suite (CUDA cases included), then every benchmark,
# writing benchmarks/results/<gpu>-<date>.{json,md} (and a copy plus the logs under $OUT when set).
# The machine has no network: dependencies missing there must be carried as wheels (device README).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out" benchmarks/results
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
MAX_JOBS=16 python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
python -m pytest -q -x --timeout=900 -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -40
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
results="benchmarks/results/${gpu}-$(date +%F)"
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --dk-results "$results" 2>&1 \
  | tee "$out/benchmarks.log" | grep -A200 "benchmark summary"
cp "$results".json "$results".md "$out"/ 2>/dev/null || true
