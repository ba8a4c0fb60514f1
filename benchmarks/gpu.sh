#!/usr/bin/env bash
# Everything measured on a lent GPU machine, in one call: GPU tests, the memory benchmark, then extraction
# benchmarks for EfficientNet-Lite0 and ResNet-50 (bf16, PIL and nvJPEG decoding), then logreg and ridge fitted on
# the CPU and on the GPU. Logs and JSON go to $OUT.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu.sh [--ablations]
# About 10 minutes in all; STEPS="tests memory" (or lite0, resnet50, fit) runs only those steps, so the work can be
# split over calls that each have a time limit.
set -u
STEPS=${STEPS:-tests memory lite0 resnet50 fit}
step() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-$PWD/benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 EMBEDFIT_OFFLINE=1
export EMBEDFIT_BENCH_CACHE=/tmp/embedfit-bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
step tests && python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_gpu.py tests/test_speed_correctness.py > "$OUT/gpu_tests.log" 2>&1
step tests && tail -3 "$OUT/gpu_tests.log"
cd benchmarks
step memory && python3 bench_memory.py --device cuda --counts 1000 10000 20000 2>&1 | tee "$OUT/memory.log"
step lite0 && python3 bench_extract.py --device cuda --precision bf16 --images 6000 --large-images 400 --naive-images 200 --rounds 1 \
  --decode pil --decode device "$@" 2>&1 | tee "$OUT/extract_lite0.log"
step resnet50 && python3 bench_extract.py --device cuda --precision bf16 --backbone resnet50 --random-weights --images 4000 \
  --large-images 300 --naive-images 200 --rounds 1 --decode pil --decode device "$@" 2>&1 | tee "$OUT/extract_resnet50.log"
step fit && python3 bench_fit.py --device cuda 2>&1 | tee "$OUT/fit_cuda.log"
cp results/*cuda*.json "$OUT/" 2>/dev/null
