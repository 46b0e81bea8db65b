#!/usr/bin/env bash
# The GPU suite: one call on a GPU machine measures everything and writes the results.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root (or anywhere)
#
# Made for a machine with torch 2.11 + triton 3.6 preinstalled and no network. In order, each
# step under its own time limit (and all of them under one deadline, so the whole suite ends in
# under 8 minutes); a step that fails or times out is recorded as such and the suite goes on:
#   1. env        GPU name, driver, torch/triton/CUDA versions            -> env.json
#   2. build      the C++/CUDA extension in place (setup.py build_ext --inplace, for the visible
#                 GPU's arch, CUDA required); skipped if setup.py defines no extension
#   3. tests      pytest on the test files that mention CUDA (the GPU tests; they also hold CPU
#                 cases), in parallel when pytest-xdist is there            -> tests.xml
#   4. bench      python -m resnet_fused bench: resnet50 224x224, fp16/bf16/fp32 x batch 1/32/256,
#                 providers eager NCHW, eager channels_last, fused (auto backend), fused (cuda
#                 backend), fused + CUDA graphs                             -> bench.json, .png
#   5. profile    per-layer profile, resnet50 fp16, batch 1 and batch 256   -> profile_{1,2}.json
#   6. compile    torch.compile (default, then max-autotune + freezing) vs eager, resnet50 fp16,
#                 batch 1 and 256, in whatever time is left                 -> compile.json
#   7. report     benchmarks/results/<date>-<gpu>.json and .md (and copies under $OUT if set)
# Partial results survive a timeout: bench rewrites its JSON after every row.
# SUITE_SMOKE=1 runs the same plumbing on a CPU-only machine with tiny sizes (to check the script;
# its compile step only with SUITE_SMOKE_COMPILE=1), SUITE_RESULTS_DIR puts the results elsewhere.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEADLINE=${SUITE_DEADLINE_S:-420}   # seconds for steps 1-6 (+15 s kill grace, + the report)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Triton autotuning results on disk, so that later steps (profile) reuse what bench measured.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
DEV=cuda ARCH=resnet50 SIZE=224 BATCHES=(1 32 256) DTYPES=(fp16 bf16 fp32) PB=(1 256) MT=0.2 PMT=0.05
if [ "${SUITE_SMOKE:-0}" = 1 ]; then
  DEV=cpu ARCH=resnet18 SIZE=32 BATCHES=(1 2) DTYPES=(fp32) PB=(1 2) MT=0 PMT=0
fi

TMP=$(mktemp -d)
LOG=$TMP/suite.log
STEPS=$TMP/steps.tsv
: >"$STEPS"

run_step() {  # run_step NAME LIMIT_S CMD... : run under min(LIMIT_S, time left), log, record rc
  local name=$1 cap=$2 left start rc
  shift 2
  left=$((DEADLINE - SECONDS))
  ((cap > left)) && cap=$left
  if ((cap < 15)); then
    echo "== $name: skipped, no time left" | tee -a "$LOG"
    printf '%s\t-1\t0\t0\n' "$name" >>"$STEPS"
    return
  fi
  echo "== $name (limit ${cap}s, t=${SECONDS}s): $*" | tee -a "$LOG"
  start=$SECONDS
  # SIGINT first: pytest then still writes its summary and junit XML, python exits cleanly.
  timeout -s INT -k 15 "$cap" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$cap" >>"$STEPS"
  echo "   $name: rc $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

# 1. env -------------------------------------------------------------------------------------
run_step env 30 "$PY" - "$TMP/env.json" <<'EOF'
import datetime, json, platform, subprocess, sys
import torch
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}
try:
    import triton; env["triton"] = triton.__version__
except Exception as e:
    env["triton"] = f"not available ({e})"
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
    env["capability"] = "%d.%d" % torch.cuda.get_device_capability()
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
EOF
GPU=$("$PY" -c "import json,re,sys; print(re.sub(r'[^A-Za-z0-9._-]+','-',json.load(open(sys.argv[1]))['gpu']))" "$TMP/env.json" 2>/dev/null || echo unknown-gpu)

# 2. build -----------------------------------------------------------------------------------
# setup.py picks the visible GPU's arch itself; REQUIRE_CUDA turns a silent CPU-only fallback
# build into a failed step.
if [ "${SUITE_SMOKE:-0}" = 1 ] && [ "${SUITE_SMOKE_BUILD:-0}" != 1 ]; then
  echo "== build: skipped in smoke mode (SUITE_SMOKE_BUILD=1 to build)" | tee -a "$LOG"
elif grep -q "ext_modules" setup.py 2>/dev/null; then
  RESNET_FUSED_REQUIRE_CUDA=$([ "$DEV" = cuda ] && echo 1 || echo 0) MAX_JOBS=${MAX_JOBS:-16} \
    run_step build 100 "$PY" setup.py build_ext --inplace
else
  echo "== build: setup.py defines no extension, nothing to build" | tee -a "$LOG"
fi

# 3. tests -----------------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l -i "cuda" tests/test_*.py 2>/dev/null)
[ "${SUITE_SMOKE:-0}" = 1 ] && GPU_TESTS=(tests/test_bench.py)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
if ((${#GPU_TESTS[@]})); then
  run_step tests 75 "$PY" -m pytest "${GPU_TESTS[@]}" -q -rfs -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$TMP/tests.xml"
fi

# 4. bench -----------------------------------------------------------------------------------
# dtype is the outer loop (fp16 first): if time runs out, the rows done are kept.
run_step bench 170 "$PY" -m resnet_fused bench --device $DEV --arch $ARCH --size $SIZE \
  --batch "${BATCHES[@]}" --dtype "${DTYPES[@]}" \
  --providers eager,eager_cl,fused:auto,fused:cuda,fused+graphs \
  --min-time $MT --json "$TMP/bench.json" --plot "$TMP/bench.png"

# 5. profile ---------------------------------------------------------------------------------
run_step profile_b${PB[0]} 40 "$PY" -m resnet_fused profile --device $DEV --arch $ARCH \
  --size $SIZE --batch ${PB[0]} --dtype ${DTYPES[0]} --min-time $PMT --json "$TMP/profile_1.json"
run_step profile_b${PB[1]} 45 "$PY" -m resnet_fused profile --device $DEV --arch $ARCH \
  --size $SIZE --batch ${PB[1]} --dtype ${DTYPES[0]} --min-time $PMT --no-peak \
  --json "$TMP/profile_2.json"

# 6. compile (whatever time is left) ---------------------------------------------------------
[ "${SUITE_SMOKE:-0}" = 1 ] && [ "${SUITE_SMOKE_COMPILE:-0}" != 1 ] && DEADLINE=0
run_step compile 600 "$PY" -m resnet_fused bench --device $DEV --arch $ARCH --size $SIZE \
  --batch ${PB[0]} ${PB[1]} --dtype ${DTYPES[0]} --providers eager,compile,compile_max \
  --min-time $MT --json "$TMP/compile.json"

# 7. report ----------------------------------------------------------------------------------
RESULTS=${SUITE_RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
OUTBASE="$RESULTS/$(date -u +%Y-%m-%d)-$GPU"
[ -e "$OUTBASE.json" ] && OUTBASE="$OUTBASE-$(date -u +%H%M)"
timeout 120 "$PY" benchmarks/suite_report.py --out "$OUTBASE" --env "$TMP/env.json" \
  --steps "$STEPS" --tests "$TMP/tests.xml" --bench "$TMP/bench.json" "$TMP/compile.json" \
  --profile "$TMP/profile_1.json" "$TMP/profile_2.json" 2>&1 | tee -a "$LOG"
[ -f "$TMP/bench.png" ] && cp "$TMP/bench.png" "$OUTBASE.png"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$OUTBASE.json" "$OUTBASE.md" "$OUT"/ 2>/dev/null
  cp "$LOG" "$OUT/suite.log" 2>/dev/null
  [ -f "$OUTBASE.png" ] && cp "$OUTBASE.png" "$OUT"/
fi
echo "== done in ${SECONDS}s; results: $OUTBASE.{json,md}"
cat "$STEPS"
# The last lines of output: the main table.
sed -n '/^## End-to-end: eager vs fused/,/^```$/p' "$OUTBASE.md" 2>/dev/null | head -70
