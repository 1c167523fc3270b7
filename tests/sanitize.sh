#!/usr/bin/env bash
# `make sanitize`: builds the C++ CPU kernels and the simulated CUDA kernels
# (regops._C_cuda_sim, whose fiber switches are annotated for ASan) with
# AddressSanitizer and UndefinedBehaviorSanitizer into build/sanitize (the
# normal in-place build is left alone) and runs the CPU tests, the cuda
# backend's among them (on CPU tensors under REGOPS_CUDA_SIM=1), against that build.
#
#   tests/sanitize.sh                       # every CPU test
#   tests/sanitize.sh tests/test_dropout.py -k cpu   # any pytest arguments
#
# The interpreter is not instrumented, so the ASan runtime must be loaded
# first (LD_PRELOAD). Python keeps objects alive until exit by design, so leak
# detection is off; any other report aborts the run with a stack trace.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
CXX_COMPILER=${CXX:-g++}
BUILD=$ROOT/build/sanitize
LIB=$BUILD/lib
cd "$ROOT"

echo "== building the sanitized CPU and simulated CUDA extensions into $LIB"
REGOPS_CUDA=0 REGOPS_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PYTHON" setup.py -q build_ext --build-lib "$LIB" --build-temp "$BUILD/temp"
# The Python sources next to the sanitized _C, so that `import regops` there
# can only load the instrumented library.
(cd "$ROOT" && find regops -name '*.py' -print0 | xargs -0 -I{} install -D -m 644 {} "$LIB/{}")

ASAN_LIB=$("$CXX_COMPILER" -print-file-name=libasan.so)
UBSAN_LIB=$("$CXX_COMPILER" -print-file-name=libubsan.so)
if [ ! -e "$ASAN_LIB" ]; then
  echo "sanitize.sh: $CXX_COMPILER has no libasan.so (install the compiler's sanitizer runtime)" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  # The C++ kernels run only under the cpu and (simulated) cuda backends and
  # their opcheck/compile tests; the Triton interpreter and the pure-torch
  # reference never call them.
  set -- tests -m "not slow" -k "not triton"
fi

echo "== pytest under ASan + UBSan: $*"
export LD_PRELOAD="$ASAN_LIB${UBSAN_LIB:+:$UBSAN_LIB}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export REGOPS_SANITIZED=1
export REGOPS_CUDA_SIM=${REGOPS_CUDA_SIM:-1}
# PYTHONSAFEPATH (-P, inherited by pytest-xdist's workers): the working directory (with the normal, uninstrumented build) is not
# put on sys.path; PYTHONPATH makes the instrumented regops the one imported.
# --capture=sys leaves file descriptor 2 alone, so a sanitizer report (written
# there just before the abort) reaches the terminal instead of pytest's buffer.
export PYTHONSAFEPATH=1
PYTHONPATH="$LIB" "$PYTHON" -P -m pytest -q -p no:cacheprovider --capture=sys "$@"
