#!/usr/bin/env bash
# One-shot check on a lent CUDA GPU machine, ~7 min on one H200: the GPU tests, an end-to-end validation,
# the benchmarks. From the repository root:  OUT=/some/dir bash scripts/gpu_check.sh   (default OUT=gpu-results)
#
# Needs, beyond python3 with torch (CUDA) and triton:
#   - pytest (step 1);
#   - diffusers 0.42.1 and importlib_metadata 8.7.0 as wheels in .whl/ (fmn imports diffusers: steps 2 and 3;
#     the kernel tests of step 1 do not). Fetch them on a machine with a package index
#     (../shared/tools/device/fetch_wheels.sh); they are installed below with pip --no-index into /tmp/site.
#   - transformers, accelerate, peft, safetensors, matplotlib (benchmark PNGs): on the H200 machine's image.
#
# Output, at most 2 files in $OUT: results.tar.gz (the folder results/, packed again after every step, so
# a step killed by its time cap still returns what was done) and steps.txt (one line per step: name, exit
# status, seconds; 124 = time cap). In results/: env.txt; per test group junit-<group>.xml (JUnit report)
# and tests-<group>.log; validate-*.log/.png/.safetensors; bench-*.log and the benchmarks' JSON/PNG.
#
# Steps and time caps (timeout sends SIGTERM; tests/conftest.py makes pytest end as on Ctrl-C, with its report):
#   0 setup: wheels, results/env.txt (versions, GPU)
#   1 GPU tests (pytest -m gpu), 5 groups in parallel processes (Triton compiles use the CPUs), 180 s
#   2 validate: `fmn forget` on the toy model through the Triton kernels (attention rule, 100 steps), 75 s
#   3 benchmarks: kernels bf16 75 s, UNet --quick 45 s, forget --quick 60 s
# Exit status: 0 when every step passed, else 1.
set -u
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${OUT:-gpu-results}" && cd "${OUT:-gpu-results}" && pwd)
R="$OUT/results"
mkdir -p "$R"
: > "$OUT/steps.txt"
failed=0

pack() { tar -czf "$OUT/results.tar.gz.tmp" -C "$OUT" results && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under its own time cap, logs to results/NAME.log, packs.
step() {
  local name=$1 cap=$2 start=$SECONDS rc
  shift 2
  echo "== $name (cap ${cap}s)"
  timeout -k 20 "$cap" "$@" > "$R/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || failed=1
  pack
}

# ---- 0. setup: wheels, environment, CUDA
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  || echo "no wheels installed from .whl/ (diffusers missing: steps 2 and 3 will fail)"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic-algorithm tests run cuBLAS matmuls (tests/conftest.py sets it too)
env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  git log -1 --format='commit %H %s' 2>/dev/null
  timeout 60 python3 - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "pytest", "diffusers", "transformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING:", e)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE VISIBLE")
EOF
}
env_info > "$R/env.txt" 2>&1
cat "$R/env.txt"
pack
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" || exit 2

# ---- 1. GPU tests: every test marked gpu, no -x, a JUnit report per group; the groups run side by side,
# each under the cap (SIGTERM: tests/conftest.py turns it into Ctrl-C, so pytest still writes its report)
run_group() {  # GROUP FILE [-k EXPR]
  local group=$1
  shift
  timeout -k 20 "$TESTS_CAP" python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$R/junit-$group.xml" \
    "$@" > "$R/tests-$group.log" 2>&1
}
TESTS_CAP=180
echo "== tests (cap ${TESTS_CAP}s)"
start=$SECONDS
pids=()
run_group oracle tests/kernels/test_cross_attention.py -k "matches_oracle_with_all_masks" & pids+=($!)
run_group kernels tests/kernels/test_cross_attention.py -k "not matches_oracle_with_all_masks" & pids+=($!)
run_group sd-shapes-a tests/kernels/test_cross_attention_gpu.py -k "bfloat16 or tf32 or deterministic or batch_heads" & pids+=($!)
run_group sd-shapes-b tests/kernels/test_cross_attention_gpu.py -k "not (bfloat16 or tf32 or deterministic or batch_heads)" \
  & pids+=($!)
run_group compile tests/kernels/test_torch_compile.py & pids+=($!)
rcs=""
for pid in "${pids[@]}"; do wait "$pid"; rcs="$rcs $?"; done
echo "tests rc=[${rcs# }] $((SECONDS - start))s (oracle kernels sd-shapes-a sd-shapes-b compile)" | tee -a "$OUT/steps.txt"
case " $rcs " in *" "[1-9]*) failed=1 ;; esac
tail -n 1 "$R"/tests-*.log
pack

# ---- 2. validation: the fused kernels inside a real forgetting run (toy model, CUDA, Triton backend)
step validate-forget 75 python3 -m fmn forget --concept circle --no-closed-form --backend triton --device cuda \
  --out "$R/validate-toy-circle.safetensors" --grid "$R/validate-toy-circle.png" --force

# ---- 3. benchmarks (tables in the logs, JSON + PNG beside them)
step bench-kernels 75 python3 bench/bench_kernels.py --dtype bfloat16 --out "$R/kernels_cuda_bf16.json"
step bench-unet 45 python3 bench/bench_unet.py --quick --dtype float16 --out "$R/unet_cuda.json"
step bench-forget 60 python3 bench/bench_forget.py --quick --out "$R/forget_cuda.json"

exit $failed
