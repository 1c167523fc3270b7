#!/usr/bin/env bash
# One short visit to a GPU machine (`make gpu-check`), everything worth doing
# there in under 10 minutes on an H100/H200, with the machine's own python3
# and torch (no venv, no network), in this order:
#   1. build for the local GPU only;
#   2. the tests aimed at the GPU-only defects, on the cuda and triton
#      backends, then the whole suite;
#   3. no host sync in forward, backward and step() of every op, and
#   4. a whole MNIST training step captured in a CUDA graph and replayed
#      (both in tests/test_gpu_only.py);
#   5. compute-sanitizer: memcheck over every CUDA test, racecheck, initcheck
#      and synccheck over the ops whose kernels use shared memory;
#   6. tests/test_huge.py on the GPU;
#   7. the benchmark suite (GB/s and % of a measured device-to-device copy).
# Each step has its own time limit, and no step may run past the visit's
# budget (BUDGET_S, default 570 s): a step that would is cut to what is left,
# and steps after the budget are reported as skipped. One markdown report,
# $OUT/gpu-check.md, with the time of every step and of the whole script;
# exits non-zero on any failure.
#
#   bash benchmarks/gpu_check.sh --dry-run   # print the plan, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
report="$OUT/gpu-check.md"
failures=()
start_all=$SECONDS
planned=0

# The tests aimed at the GPU-only defects (pytest -k over the cuda and
# triton parametrizations): Triton specialization of ints equal to 1, strides
# of size-1 dimensions and of side tensors, entry checks, device guards,
# launch tables, >65535 channels, vector paths at every alignment.
TARGETED_TESTS=${TARGETED_TESTS:-"tests/test_gpu_only.py tests/test_dropout_hostile.py tests/test_batch_norm_hostile.py tests/test_optim_hostile.py tests/test_optim.py tests/test_batch_norm.py tests/test_dropout.py tests/test_sync_batch_norm.py"}
TARGETED_K=${TARGETED_K:-"(cuda or triton) and (count_one or size_one or stride or strided or offset or guard or reject or check or more_tensors or many_channels or align or sync or graph)"}
# Ops whose kernels use shared memory: the batch-norm reductions and the
# gradient norm's block sums.
SHARED_MEMORY_TESTS=${SHARED_MEMORY_TESTS:-"tests/test_batch_norm.py tests/test_optim.py"}
SHARED_MEMORY_K=${SHARED_MEMORY_K:-"cuda and not compile and (batch_norm or norm or clip)"}
CUDA_K="cuda and not compile"
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="")
SANITIZER=(compute-sanitizer --error-exitcode 1 --print-limit 20)

section() { printf '\n## %s\n\n' "$1" >> "$report"; }
fence() { printf '```\n' >> "$report"; cat "$1" >> "$report" 2>/dev/null; printf '```\n' >> "$report"; }

# step NAME LIMIT_S SUMMARY_REGEX COMMAND...: runs COMMAND under
# timeout(min(LIMIT_S, what is left of the budget)), logs to $OUT/<slug>.log,
# and puts the log lines matching SUMMARY_REGEX (or its tail) in the report.
step() {
  local name=$1 cap=$2 pattern=$3; shift 3
  local limit=$cap
  local slug; slug=$(printf '%s' "$name" | tr -c 'a-zA-Z0-9' '-' | tr -s '-' | sed 's/-$//')
  local left=$((BUDGET_S - (SECONDS - start_all)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY_RUN" = 1 ]; then
    printf -- '- %s (limit %d s): %s\n' "$name" "$cap" "$*"
    planned=$((planned + cap))
    return 0
  fi
  if [ "$limit" -lt 15 ]; then
    section "$name: skipped (the visit's budget of $BUDGET_S s is spent)"
    failures+=("$name (skipped: budget)")
    return 1
  fi
  local log="$OUT/$slug.log" start=$SECONDS
  echo "== $name (limit $limit s)"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  local verdict="exit $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="timed out after $limit s"
  section "$name ($verdict, $((SECONDS - start)) s)"
  printf '`%s`\n\n' "$*" >> "$report"
  { grep -E "$pattern" "$log" | tail -n 30 || true; } > "$log.summary"
  [ -s "$log.summary" ] || tail -n 20 "$log" > "$log.summary"
  fence "$log.summary"
  [ $rc -ne 0 ] && failures+=("$name ($verdict)")
  return $rc
}

if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT"
  arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  {
    echo "# regops gpu-check"
    echo
    echo "Date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); budget $BUDGET_S s"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    echo '```'
  } > "$report"
else
  echo "gpu-check plan (budget $BUDGET_S s; TORCH_CUDA_ARCH_LIST = the local GPU's capability):"
fi

PASS='passed|failed|error|skipped'
SAN='ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error'
# shellcheck disable=SC2086  # the test lists are meant to split into words
{
  step "1 build for the local GPU" 180 'error|warning: |Successfully' \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
  step "2a tests aimed at the GPU-only defects" 60 "$PASS|^(FAILED|ERROR)" \
    "${PYTEST[@]}" $TARGETED_TESTS -k "$TARGETED_K"
  step "2b the whole suite" 150 "$PASS|^(FAILED|ERROR)" \
    "${PYTEST[@]}" tests -m "not slow"
  step "3-4 no host sync; CUDA-graph training step" 45 "$PASS|^(FAILED|ERROR)" \
    "${PYTEST[@]}" tests/test_gpu_only.py
  step "5a compute-sanitizer memcheck, every CUDA test" 100 "$SAN" \
    "${SANITIZER[@]}" --tool memcheck "${PYTEST[@]}" tests -m "not slow" -k "$CUDA_K"
  step "5b compute-sanitizer racecheck" 30 "$SAN" \
    "${SANITIZER[@]}" --tool racecheck "${PYTEST[@]}" $SHARED_MEMORY_TESTS -k "$SHARED_MEMORY_K"
  step "5c compute-sanitizer initcheck" 30 "$SAN" \
    "${SANITIZER[@]}" --tool initcheck "${PYTEST[@]}" $SHARED_MEMORY_TESTS -k "$SHARED_MEMORY_K"
  step "5d compute-sanitizer synccheck" 30 "$SAN" \
    "${SANITIZER[@]}" --tool synccheck "${PYTEST[@]}" $SHARED_MEMORY_TESTS -k "$SHARED_MEMORY_K"
  step "6 huge tensors on the GPU" 60 "$PASS|^(FAILED|ERROR)" \
    "${PYTEST[@]}" -m slow tests/test_huge.py -k cuda
  step "7 benchmarks" 120 'copy|GB/s|Error|error' \
    "$PYTHON" benchmarks/run.py --out "$OUT"
} || true

if [ "$DRY_RUN" = 1 ]; then
  echo "step limits add up to $planned s; the budget stops the run at $BUDGET_S s"
  exit 0
fi
section "benchmark summary"
cat "$OUT/summary-cuda.md" >> "$report" 2>/dev/null || echo "(no summary)" >> "$report"

section "result"
echo "gpu-check took $((SECONDS - start_all)) s of a $BUDGET_S s budget." | tee -a "$report"
if [ ${#failures[@]} -eq 0 ]; then
  echo "All steps passed." | tee -a "$report"
  exit 0
fi
printf -- '- failed: %s\n' "${failures[@]}" | tee -a "$report"
exit 1
