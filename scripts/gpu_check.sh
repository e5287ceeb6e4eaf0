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
# Steps and time caps (timeout sends SIGTERM; tests/conftest.py makes pytest end as on Ctrl-C, with its report),
# about 8.5 min in all on one H200; the measurements first, so that a cut run still has them:
#   0 setup: wheels, results/env.txt (versions, GPU)
#   1 tune: tiles timed on this GPU (fmn_kernels.tune), copied to bench/results/ for the steps after it, 80 s
#   2 benchmarks: kernels bf16 95 s, host path 25 s, UNet inference + step 50 s, forget --quick 80 s, MM-DiT 60 s
#   3 GPU tests (pytest -m gpu), 6 groups in parallel processes (Triton compiles use the CPUs), 120 s; beside
#     them a cold-cache warm-up count (fmn_kernels.warmup) and the toy main job through the Triton kernels
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

# ---- 1. tiles from measurement on this GPU; the benchmarks after it use the winners (configs.py reads them)
step tune 80 python3 -m fmn_kernels.tune --budget-s 55 --out "$R/tune_h200.json"
[ -s "$R/tune_h200.json" ] && cp "$R/tune_h200.json" bench/results/tune_h200.json

# ---- 2. benchmarks (tables in the logs, JSON + PNG beside them)
step bench-kernels 95 python3 bench/bench_kernels.py --dtype bfloat16 --out "$R/kernels_h200_bf16.json"
step bench-host 25 python3 bench/bench_host.py --device cuda --dtype bfloat16 --out "$R/host_h200.json"
step bench-unet 50 python3 bench/bench_unet.py --quick --dtype float16 --out "$R/unet_h200.json"
step bench-forget 80 python3 bench/bench_forget.py --quick --out "$R/forget_h200.json"
step bench-mmdit 60 python3 bench/bench_mmdit.py --resolution 1024 --double 2 --single 2 --quick \
  --out "$R/mmdit_h200.json"

# ---- 3. GPU tests: every test marked gpu or needing CUDA, no -x, a JUnit report per group; the groups run
# side by side, each under the cap (SIGTERM: tests/conftest.py turns it into Ctrl-C, so pytest still writes
# its report). Beside them: a cold-cache compile count and the toy main job through the Triton kernels.
run_group() {  # GROUP MARKER-EXPR FILE... [-k EXPR]
  local group=$1 marker=$2
  shift 2
  timeout -k 20 "$TESTS_CAP" python3 -m pytest -m "$marker" -q -rfEs -p no:cacheprovider \
    --junitxml="$R/junit-$group.xml" "$@" > "$R/tests-$group.log" 2>&1
}
TESTS_CAP=120
echo "== tests (cap ${TESTS_CAP}s)"
start=$SECONDS
pids=()
run_group oracle gpu tests/kernels/test_cross_attention.py -k "matches_oracle_with_all_masks" & pids+=($!)
run_group kernels gpu tests/kernels/test_cross_attention.py -k "not matches_oracle_with_all_masks" & pids+=($!)
run_group sd-shapes-a gpu tests/kernels/test_cross_attention_gpu.py -k "bfloat16 or tf32 or deterministic or batch_heads" \
  & pids+=($!)
run_group sd-shapes-b gpu tests/kernels/test_cross_attention_gpu.py \
  -k "not (bfloat16 or tf32 or deterministic or batch_heads)" & pids+=($!)
run_group compile gpu tests/kernels/test_torch_compile.py & pids+=($!)
run_group graphs "not nothing" tests/forgetting/test_cuda_graphs_gpu.py tests/processors/test_attention_dispatch.py \
  tests/bench/test_bench_common.py & pids+=($!)
(TRITON_CACHE_DIR=/tmp/fmn-cold timeout 110 python3 -m fmn_kernels.warmup --family all --dtype bfloat16 \
  > "$R/warmup-cold.log" 2>&1) &
(cd /tmp && timeout 110 python3 -m fmn forget --concept circle --device cuda \
  --out "$R/main-job-circle.safetensors" --grid "$R/main-job-circle.png" --force > "$R/main-job.log" 2>&1) &
rcs=""
for pid in "${pids[@]}"; do wait "$pid"; rcs="$rcs $?"; done
wait
echo "tests rc=[${rcs# }] $((SECONDS - start))s (oracle kernels sd-shapes-a sd-shapes-b compile graphs)" | tee -a "$OUT/steps.txt"
case " $rcs " in *" "[1-9]*) failed=1 ;; esac
tail -n 1 "$R"/tests-*.log
pack

exit $failed
