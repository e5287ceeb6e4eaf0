#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (needs torch + triton; pytest for step 1; diffusers only
# for the UNet/forget benchmarks, which are skipped without it). All results under $OUT
# (default ./gpu-results). Each step runs even if an earlier one failed; the exit status is that of
# the tests and the validation. On CUDA, tests/conftest.py leaves the interpreter off and the kernel
# tests move their tensors to the GPU, so what runs is the compiled kernels.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
unset TRITON_INTERPRET
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
status=0
# 1. kernel tests, compiled (8 min cap)
if python3 -c "import pytest" 2>/dev/null; then
  timeout 480 python3 -m pytest -q -x tests/kernels/test_cross_attention_gpu.py tests/kernels/test_cross_attention.py \
    tests/kernels/test_torch_compile.py 2>&1 | tee "$OUT/tests.txt"
  status=${PIPESTATUS[0]}
fi
# 2. one-shot validation: correctness at full shapes, properties, timings, peak memory, resources
OUT="$OUT/validate" bash scripts/gpu_validate/run.sh > "$OUT/validate.txt" 2>&1 || status=1
# 3. benchmarks (tables, JSON, PNG)
for dtype in float16 bfloat16; do
  python3 bench/bench_kernels.py --dtype $dtype --out "$OUT/kernels_$dtype.json" 2>&1 | tail -60 > "$OUT/kernels_$dtype.txt"
done
if python3 -c "import diffusers" 2>/dev/null; then
  python3 bench/bench_unet.py --out "$OUT/unet.json" > "$OUT/unet.txt" 2>&1
  python3 bench/bench_forget.py --out "$OUT/forget.json" > "$OUT/forget.txt" 2>&1
else
  echo "diffusers not installed: UNet and forget benchmarks skipped" > "$OUT/unet.txt"
fi
exit $status
