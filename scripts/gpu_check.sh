#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA device (CI has none, so these never run there):
#   1. tests/test_cuda.py: exits, layer-wise loss and the fairseq CLIs (--fp16) on CUDA agree with the CPU;
#      tests/test_ngram_blocking.py on the device as well;
#   2. the inference benchmark on the GPU: mue_ofa_base at OFA's 480 px, batch 1/16/64, fp32 (with peak
#      memory per configuration) and bf16.
#      (Not fp16: the benchmark's random-weight ResNet has untrained BatchNorm statistics, and its stage-3
#      activations reach ~8e4 at 480 px, past fp16's 65504, so the plain model itself yields NaN.)
# Usage: scripts/gpu_check.sh OUT_DIR     (writes test_cuda.log, bench_*.md and bench_*.json there)
# Each step has its own time limit and a failure does not stop the next one; the exit status is
# non-zero if any step failed.
set -u -o pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || status=1

timeout 240 "$python" -m pytest tests/test_cuda.py tests/test_ngram_blocking.py -q \
    -p no:cacheprovider -W ignore::UserWarning 2>&1 \
    | tee "$out/test_cuda.log" || status=1

for dtype in float32 bfloat16; do
    memory=$([ "$dtype" = float32 ] && echo --memory)
    timeout 200 "$python" scripts/bench_inference.py --device cuda --dtype "$dtype" --sizes base \
        --image-size 480 --batch-sizes 1,16,64 --repeats 3 --img-thres 0.8 --txt-thres 0.8 --dec-thres 0.8 \
        $memory --json "$out/bench_$dtype.json" 2>&1 | tee "$out/bench_$dtype.md" || status=1
done
exit $status
