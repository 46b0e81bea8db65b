#!/usr/bin/env bash
# The GPU suite: one call on a GPU machine checks every kernel config and measures the headline.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root (or anywhere)
#
# Made for a machine with torch 2.11 + triton 3.6 preinstalled and no network: it never calls make
# or pip. Steps in order of value, each under its own time limit and all under one deadline
# (SUITE_DEADLINE_S, default 450 s, so that a cold 16-core H100/H200 finishes in about 8 minutes);
# a step that fails or times out is recorded and the suite goes on:
#   1. env       GPU, driver, versions                                         -> env.json
#   2. build     the C++/CUDA extension for the visible GPU's arch only, in the background
#                (nvcc runs while the sweep below compiles Triton kernels)     -> build.log
#   3. warmup    `python -m resnet_fused warmup` for resnet50 fp16 batch 1 and 256 (+ a first call
#                at an unseen batch size, 200) from empty caches, then again warm: cold- and
#                warm-start times; the tuning it persists serves every later step -> warmup_*.json
#   4. check     every Triton config on every distinct conv of resnet18/50/resnext50_32x4d at
#                batch 1 and 256 vs float64 (fp16; bf16/fp32 on resnet50), parallel workers;
#                fills Triton's disk cache for the steps after it               -> check.json
#   5. tests     the CUDA tests only (extension kernels, graph capture, GPU model parity, GPU
#                conv cases; no interpreter or AOT tests), after the build      -> tests.xml
#   6. headline  resnet50 fp16 batch 1 and 256: eager NCHW, eager channels_last, fused (auto),
#                fused + CUDA graphs, torch.compile (default)                   -> bench.json/.png
#   7. profile   per-layer profile, resnet50 fp16, batch 1 and 256             -> profile_{1,2}.json
#   8. train     training steps, resnet50 batch 64, AMP bf16 and fp16: eager, channels_last, fused
#                with the policy's BN (stock on CUDA until measured) and with the fused
#                bn_act_train kernels forced: the numbers that decide the CUDA policy -> train.json;
#                then the op alone vs stock BN + add + ReLU, and its GB/s vs a copy's (bf16,
#                batch 64; benchmarks/bench_train_ops.py)                       -> train_ops.json;
#                then activation memory, fp32 batch 64 with the fused kernels forced: saved
#                bytes and CUDA peak, recomputing stages vs saving vs torchvision
#                (benchmarks/train_memory.py)                                   -> train_memory/;
#                then eval mode with autograd (frozen-BN fine-tuning steps, AMP, batch 1 and 64)
#                with the fused bn_eval_act forced against torchvision          -> eval_grad.json
#   9. extra     bf16/fp32 rows, then torch.compile max-autotune, in whatever time is left
#  10. report    benchmarks/results/<date>-<gpu>.{json,md}; with $OUT set, the report, the log
#                and every raw file (raw.tar.gz) land under $OUT
# Exit status: non-zero when a correctness step (build, check, tests) failed.
# SUITE_SMOKE=1 runs the same plumbing on a CPU-only machine with tiny sizes (the sweep under
# TRITON_INTERPRET=1); SUITE_RESULTS_DIR puts the results elsewhere.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEADLINE=${SUITE_DEADLINE_S:-450}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NCPU=$(nproc 2>/dev/null || echo 4)
DEV=cuda ARCH=resnet50 SIZE=224 PB=(1 256) MT=0.2 PMT=0.05 TB=64 TDT=(bf16 fp16)
CHECK_ARGS=(--device cuda)
WARMUP_ARGS=(--probe-batch 200)
TEST_K="cuda or gpu"
TOPS_ARGS=(--benchmark-only)
if [ "${SUITE_SMOKE:-0}" = 1 ]; then
  DEV=cpu ARCH=resnet18 SIZE=32 PB=(1 2) MT=0 PMT=0 TB=2 TDT=(fp32)
  CHECK_ARGS=(--device cpu --arch resnet18 --batch 1 --size 32 --dtype fp32)
  WARMUP_ARGS=(--target sm_90)  # no GPU: the parallel compile only
  TEST_K="test_cpu_falls_back or test_bench_cli"
  TOPS_ARGS=(--benchmark-disable)  # tiny sizes, one call each: the plumbing only
fi

TMP=$(mktemp -d)
# Tuning decisions from empty, in this run's folder (they come back in raw.tar.gz); every step
# after the warm-up reuses them.
export RESNET_FUSED_CACHE_DIR=$TMP/tuning
LOG=$TMP/suite.log
STEPS=$TMP/steps.tsv
: >"$STEPS"
FAILED=0

record() {  # record NAME RC SECONDS LIMIT
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"
  echo "   $1: rc $2 after $3s" | tee -a "$LOG"
}

run_step() {  # run_step NAME LIMIT_S CMD... : run under min(LIMIT_S, time left), log, record rc
  local name=$1 cap=$2 left start rc
  shift 2
  left=$((DEADLINE - SECONDS))
  ((cap > left)) && cap=$left
  if ((cap < 15)); then
    echo "== $name: skipped, no time left" | tee -a "$LOG"
    printf '%s\t-1\t0\t0\n' "$name" >>"$STEPS"
    return 1
  fi
  echo "== $name (limit ${cap}s, t=${SECONDS}s): $*" | tee -a "$LOG"
  start=$SECONDS
  # SIGINT first: pytest still writes its summary and junit XML, python exits cleanly.
  timeout -s INT -k 15 "$cap" "$@" >>"$LOG" 2>&1
  rc=$?
  record "$name" "$rc" "$((SECONDS - start))" "$cap"
  return $rc
}

# 1. env -------------------------------------------------------------------------------------
run_step env 30 "$PY" - "$TMP/env.json" <<'EOF'
import datetime, json, platform, subprocess, sys
import torch
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}
for mod in ("triton", "torchvision", "numpy"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as e:
        env[mod] = f"not available ({e})"
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    env["driver"] = "?"
try:
    env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
except Exception:
    env["git"] = "?"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["capability"] = "%d.%d" % (p.major, p.minor)
    env["sms"] = p.multi_processor_count
    env["memory_gib"] = round(p.total_memory / 2**30, 1)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
EOF
GPU=$("$PY" -c "import json,re,sys; print(re.sub(r'[^A-Za-z0-9._-]+','-',json.load(open(sys.argv[1]))['gpu']))" "$TMP/env.json" 2>/dev/null || echo unknown-gpu)

# 2. build (background) ----------------------------------------------------------------------
BUILD_PID=
if [ "${SUITE_SMOKE:-0}" = 1 ] && [ "${SUITE_SMOKE_BUILD:-0}" != 1 ]; then
  echo "== build: skipped in smoke mode (SUITE_SMOKE_BUILD=1 to build)" | tee -a "$LOG"
else
  echo "== build (background, t=${SECONDS}s)" | tee -a "$LOG"
  BUILD_START=$SECONDS
  # The visible GPU's arch only (setup.py reads TORCH_CUDA_ARCH_LIST); REQUIRE_CUDA turns a silent
  # CPU-only build into a failed step.
  ARCHLIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  ( TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCHLIST} \
    RESNET_FUSED_REQUIRE_CUDA=$([ "$DEV" = cuda ] && echo 1 || echo 0) MAX_JOBS=${MAX_JOBS:-4} \
    timeout -k 10 200 "$PY" setup.py build_ext --inplace >"$TMP/build.log" 2>&1
    echo $? >"$TMP/build.rc" ) &
  BUILD_PID=$!
fi

# Leave a few cores to nvcc while the build runs.
WORKERS=$((NCPU > 6 ? NCPU - 4 : NCPU))

# 3. warmup (cold, then warm) -----------------------------------------------------------------
for run in cold warm; do
  run_step warmup_$run 120 "$PY" -m resnet_fused warmup --arch $ARCH --size $SIZE \
    --batch "${PB[@]}" --dtype fp16 --workers "$WORKERS" "${WARMUP_ARGS[@]}" \
    --json "$TMP/warmup_$run.json"
done

# 4. check -----------------------------------------------------------------------------------
[ "${SUITE_SMOKE:-0}" = 1 ] && export TRITON_INTERPRET=1
run_step check 150 "$PY" -m resnet_fused check "${CHECK_ARGS[@]}" --workers "$WORKERS" \
  --time-limit 120 --json "$TMP/check.json" || FAILED=1
unset TRITON_INTERPRET

if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  rc=$(cat "$TMP/build.rc" 2>/dev/null || echo 1)
  record build "$rc" "$((SECONDS - BUILD_START))" 200
  tail -5 "$TMP/build.log" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=1
fi

# 5. tests -----------------------------------------------------------------------------------
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [ "$DEV" = cuda ] && XDIST=(-n 8)
run_step tests 80 "$PY" -m pytest tests/test_ext.py tests/test_cuda_graphs.py \
  tests/test_models_triton.py tests/test_conv_triton.py tests/test_bench.py \
  tests/test_cudnn_fused.py -k "$TEST_K" \
  -q -rfs -p no:cacheprovider "${XDIST[@]}" --junitxml="$TMP/tests.xml" || FAILED=1

# 6. headline --------------------------------------------------------------------------------
run_step headline 150 "$PY" -m resnet_fused bench --device $DEV --arch $ARCH --size $SIZE \
  --batch "${PB[@]}" --dtype fp16 \
  --providers eager,eager_cl,fused:auto,fused+graphs,fused+graphs_safe,compile \
  --min-time $MT --json "$TMP/bench.json" --plot "$TMP/bench.png"

# 7. profile ---------------------------------------------------------------------------------
run_step profile_b${PB[0]} 40 "$PY" -m resnet_fused profile --device $DEV --arch $ARCH \
  --size $SIZE --batch ${PB[0]} --dtype fp16 --min-time $PMT --json "$TMP/profile_1.json"
run_step profile_b${PB[1]} 45 "$PY" -m resnet_fused profile --device $DEV --arch $ARCH \
  --size $SIZE --batch ${PB[1]} --dtype fp16 --min-time $PMT --no-peak \
  --json "$TMP/profile_2.json"

# 8. train ----------------------------------------------------------------------------------
run_step train 90 "$PY" -m resnet_fused bench --train --device $DEV --arch $ARCH --size $SIZE \
  --batch $TB --dtype "${TDT[@]}" --min-time $MT --json "$TMP/train.json"
run_step train_ops 60 "$PY" -m pytest benchmarks/bench_train_ops.py -q -p no:cacheprovider \
  -k "$DEV" "${TOPS_ARGS[@]}" --benchmark-json "$TMP/train_ops.json"
# (with stock BatchNorm, CUDA's policy until measured, a recomputing stage has nothing to redo)
run_step train_memory 60 env RESNET_FUSED_TRAIN_BN=fused "$PY" benchmarks/train_memory.py \
  --device $DEV --batch $TB --size $SIZE --out "$TMP/train_memory"
# eval mode with autograd (frozen-BN fine-tuning step, AMP) with bn_eval_act forced: the numbers
# that decide its CUDA policy (stock's ops until measured)
run_step eval_grad 40 env RESNET_FUSED_TRAIN_BN=fused "$PY" -m resnet_fused bench --device $DEV \
  --arch $ARCH --size $SIZE --batch 1 $TB --dtype "${TDT[0]}" --autocast --eval-grad backward \
  --providers eager,fused:auto --min-time $MT --json "$TMP/eval_grad.json"

# 9. extra (whatever time is left) -----------------------------------------------------------
if [ "${SUITE_SMOKE:-0}" != 1 ]; then
  run_step extra_dtypes 120 "$PY" -m resnet_fused bench --device $DEV --arch $ARCH --size $SIZE \
    --batch "${PB[@]}" --dtype bf16 fp32 --providers eager,eager_cl,fused:auto,fused+graphs \
    --min-time $MT --json "$TMP/bench_dtypes.json"
  run_step compile_max 600 "$PY" -m resnet_fused bench --device $DEV --arch $ARCH --size $SIZE \
    --batch "${PB[@]}" --dtype fp16 --providers eager,compile_max --min-time $MT \
    --json "$TMP/compile.json"
fi

# 10. report ---------------------------------------------------------------------------------
RESULTS=${SUITE_RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
OUTBASE="$RESULTS/$(date -u +%Y-%m-%d)-$GPU"
[ -e "$OUTBASE.json" ] && OUTBASE="$OUTBASE-$(date -u +%H%M)"
timeout 120 "$PY" benchmarks/suite_report.py --out "$OUTBASE" --env "$TMP/env.json" \
  --steps "$STEPS" --tests "$TMP/tests.xml" --check "$TMP/check.json" \
  --train-ops "$TMP/train_ops.json" --train-memory "$TMP/train_memory" \
  --warmup "cold=$TMP/warmup_cold.json" "warm=$TMP/warmup_warm.json" \
  --bench "$TMP/bench.json" "$TMP/train.json" "$TMP/eval_grad.json" "$TMP/bench_dtypes.json" \
  "$TMP/compile.json" \
  --profile "$TMP/profile_1.json" "$TMP/profile_2.json" 2>&1 | tee -a "$LOG"
[ -f "$TMP/bench.png" ] && cp "$TMP/bench.png" "$OUTBASE.png"
echo "== done in ${SECONDS}s, correctness failed: $FAILED; results: $OUTBASE.{json,md}" | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$OUTBASE.json" "$OUTBASE.md" "$LOG" "$OUT"/ 2>/dev/null
  [ -f "$OUTBASE.png" ] && cp "$OUTBASE.png" "$OUT"/
  tar -czf "$OUT/raw.tar.gz" -C "$TMP" . 2>/dev/null
fi
cat "$STEPS"
# The last lines of output: the verdict and the main table.
sed -n '/^## Correctness sweep/,/^## End-to-end/{/^## End-to-end/!p}' "$OUTBASE.md" 2>/dev/null | head -60
sed -n '/^## End-to-end: eager vs fused/,/^## /p' "$OUTBASE.md" 2>/dev/null | head -30
exit $FAILED
