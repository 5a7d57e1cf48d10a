#!/usr/bin/env bash
# Everything lowbit's CUDA kernels need checked on a GPU, in one run of about
# 8 minutes or less: build from source, CUDA tests, benchmark against fp16
# cuBLAS, compute-sanitizer (memcheck, racecheck, initcheck) on a small case.
# Each part is time-boxed; a part that fails or runs out of time is reported
# and the next one still runs. Logs and the benchmark table go to $OUT
# (default /tmp/lowbit-gpu-check); summary.txt says what passed.
#
#   bash bench/gpu/check.sh          # from the repository root, on the GPU machine
#
# TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200); MAX_JOBS to the CPU count.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-/tmp/lowbit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LOWBIT_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}   # no part starts or runs past this many seconds
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((TOTAL_S - ($(date +%s) - START))); }
# part NAME LIMIT_S LOG COMMAND...: runs COMMAND with a time limit (capped by
# the time left), logs its output, and records the outcome.
part() {
  local name=$1 limit=$2 log=$3
  shift 3
  local remaining
  remaining=$(left)
  if ((remaining < 20)); then
    note "$name: SKIPPED (time budget spent)"
    return 1
  fi
  ((limit > remaining)) && limit=$remaining
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    note "$name: ok (${took}s)"
  elif ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after ${took}s (limit ${limit}s)"
  else
    note "$name: FAILED with status $rc (${took}s), see $(basename "$log")"
  fi
  return $rc
}

{
  echo "lowbit GPU check, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -1
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} | tee -a "$SUMMARY"

# 1. Build the extension in place (the tests import lowbit from this checkout).
if ! part "build" 240 "$OUT/build.log" "$PYTHON" setup.py build_ext --inplace; then
  tail -30 "$OUT/build.log"
  note "stopping: nothing else can run without the build"
  exit 1
fi

# 2. The CUDA tests (and the kernel-choice tests that run anywhere).
part "tests" 170 "$OUT/tests.log" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider --durations=10 \
  tests/kernels/test_cuda.py tests/kernels/test_cuda_dispatch.py
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3 | tee -a "$SUMMARY"

# 3. The benchmark: ceilings, every kernel at every shape, targets.
part "benchmark" 170 "$OUT/bench.log" "$PYTHON" bench/gpu/bench_linear.py --out "$OUT" --budget-s 130
[[ -f "$OUT/bench.md" ]] && sed -n '/^Targets:/,$p' "$OUT/bench.md" | tee -a "$SUMMARY"

# 4. compute-sanitizer on a small case, only lowbit's kernels instrumented
# (when this compute-sanitizer accepts the kernel filter).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
FILTER=(--kernel-name kns=lowbit)
compute-sanitizer "${FILTER[@]}" true > /dev/null 2>&1 || FILTER=()
for tool in memcheck racecheck initcheck; do
  part "compute-sanitizer $tool" 60 "$OUT/$tool.log" compute-sanitizer --tool "$tool" \
    "${FILTER[@]}" --error-exitcode 3 "$PYTHON" bench/gpu/sanitize_case.py
  grep -E "ERROR SUMMARY|sanitize_case|Error" "$OUT/$tool.log" | tail -2 | tee -a "$SUMMARY"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING

note "total $(($(date +%s) - START))s"
