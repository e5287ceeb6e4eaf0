#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine: compiled-kernel tests, then the benchmarks, all
# results under $OUT (default ./gpu-results). Each step runs even if an earlier one failed; the
# exit status is the tests'. diffusers is not installed there: carry its wheel (see README).
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pytest -q tests/test_cross_attention_gpu.py tests/test_cross_attention.py -x 2>&1 | tee "$OUT/tests.txt"
status=${PIPESTATUS[0]}
for dtype in float16 bfloat16; do
  python3 bench/bench_kernels.py --dtype $dtype --out "$OUT/kernels_$dtype.json" 2>&1 | tail -60 > "$OUT/kernels_$dtype.txt"
done
[ -f bench/bench_unet.py ] && python3 bench/bench_unet.py --out "$OUT/unet.json" > "$OUT/unet.txt" 2>&1
[ -f bench/bench_forget.py ] && python3 bench/bench_forget.py --out "$OUT/forget.json" > "$OUT/forget.txt" 2>&1
exit $status
