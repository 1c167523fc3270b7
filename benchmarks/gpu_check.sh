#!/usr/bin/env bash
# One visit to a GPU machine proves everything (`make gpu-check`): build for
# the local GPU, run the whole test suite there (cuda and triton backends),
# compute-sanitizer memcheck over every op's CUDA tests (racecheck over the
# kernels that use shared memory), then the benchmark suite. Writes one
# markdown report, $OUT/gpu-check.md, and exits non-zero on any failure.
# Uses the machine's own python3 and torch: no venv, no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
report="$OUT/gpu-check.md"
failures=()

section() { printf '\n## %s\n\n' "$1" >> "$report"; }
fence() { printf '```\n' >> "$report"; cat "$1" >> "$report"; printf '```\n' >> "$report"; }
step() {  # step NAME LOGFILE TIMEOUT COMMAND...
  local name=$1 log=$2 limit=$3; shift 3
  local start=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 40 "$log"
  section "$name (exit $rc, $((SECONDS - start)) s)"
  if [ $rc -ne 0 ]; then failures+=("$name (exit $rc)"); fi
  return $rc
}

{
  echo "# regops gpu-check"
  echo
  echo "Date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
  echo '```'
} > "$report"

step "build" "$OUT/build.log" 400 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
tail -n 5 "$OUT/build.log" > "$OUT/build.tail"; fence "$OUT/build.tail"

step "tests (all, on the GPU)" "$OUT/pytest.log" 300 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" tests
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 3 > "$OUT/pytest.tail"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 30 >> "$OUT/pytest.tail"
fence "$OUT/pytest.tail"

# Sanitizers: the CUDA tests of every op (compile tests left out: they spend
# their time in Inductor, not in our kernels), since every access is
# instrumented. memcheck: out-of-bounds and misaligned accesses; racecheck:
# shared-memory hazards, so only the ops whose kernels use shared memory.
# SANITIZE_TESTS / RACECHECK_TESTS (pytest arguments without -k) and
# SANITIZE_K / RACECHECK_K override the defaults; RACECHECK_TESTS="" skips it.
op_tests() { for f in "$@"; do [ -e "$f" ] && printf '%s ' "$f"; done; }
SANITIZE_TESTS=${SANITIZE_TESTS:-$(op_tests tests/test_dropout.py tests/test_batch_norm.py tests/test_optim*.py tests/test_hostile.py)}
SANITIZE_K=${SANITIZE_K:-"cuda and not compile"}
RACECHECK_TESTS=${RACECHECK_TESTS-$(op_tests tests/test_batch_norm.py)}
RACECHECK_K=${RACECHECK_K:-"cuda and not compile"}
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# shellcheck disable=SC2086  # the test lists are meant to split into words
step "compute-sanitizer memcheck" "$OUT/memcheck.log" 300 \
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
  $SANITIZE_TESTS -k "$SANITIZE_K"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -n 4 > "$OUT/memcheck.tail"; fence "$OUT/memcheck.tail"
if [ -n "${RACECHECK_TESTS// /}" ]; then
  # shellcheck disable=SC2086
  step "compute-sanitizer racecheck" "$OUT/racecheck.log" 240 \
    compute-sanitizer --tool racecheck --error-exitcode 1 "$PYTHON" -m pytest -q -x \
    -p no:cacheprovider $RACECHECK_TESTS -k "$RACECHECK_K"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -n 4 > "$OUT/racecheck.tail"
  fence "$OUT/racecheck.tail"
fi

step "benchmarks" "$OUT/bench.log" 420 "$PYTHON" benchmarks/run.py --out "$OUT"
section "benchmark summary"
cat "$OUT/summary-cuda.md" >> "$report" 2>/dev/null || echo "(no summary)" >> "$report"

section "result"
if [ ${#failures[@]} -eq 0 ]; then
  echo "All steps passed." | tee -a "$report"
  exit 0
fi
printf -- '- failed: %s\n' "${failures[@]}" | tee -a "$report"
exit 1
