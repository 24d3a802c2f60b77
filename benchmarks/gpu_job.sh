#!/usr/bin/env bash
# Run THERE, on the GPU machine, from the repository root, as one short job (about 5 minutes on
# an H200): installs the carried wheels (benchmarks/gpu_wheels.sh made them), then
#   1. the GPU tests (the split-teacher cache equals the one-GPU cache; CUDA paths of the dump),
#   2. benchmarks/bench_gpu.py: dump vs bare forward of a 1B Llama-shaped teacher at 128k ids in
#      bfloat16, and the fused loss in bf16,
# and leaves RESULTS.md's new section, the JSON and the logs in $OUT (or ./gpu-out).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/logitcache/dumping/test_device_map.py \
  tests/logitcache/dumping/test_overlap.py -k "gpu or cuda or pool or profile" 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
