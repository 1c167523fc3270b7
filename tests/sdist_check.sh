#!/usr/bin/env bash
# `make sdist-check`: what a user installs builds and works.
#
# `python -m build` makes the sdist and then the wheel from that sdist (it
# unpacks the sdist and compiles the extensions from what it holds, CPU only
# here: REGOPS_CUDA=0), the same build as
# `pip install --no-build-isolation regops-<version>.tar.gz`. The wheel is then
# installed into a fresh virtualenv and imported from outside the source tree:
# the version is pyproject.toml's, py.typed ships, the compiled CPU and
# simulated CUDA ops run and agree with torch.
#
# Offline and quick to set up: --no-isolation builds with this environment's
# setuptools and torch (the extension must match the torch that loads it),
# and the fresh virtualenv sees this environment's torch through a .pth file
# instead of installing its own.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
cd "$ROOT"
# An absolute path (the checks run from another directory), without
# resolving the virtualenv's symlink to its base interpreter.
if [[ "$PYTHON" == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi
OUT=$ROOT/build/sdist-check
rm -rf "$OUT"
mkdir -p "$OUT/run"

echo "== python -m build (sdist, then the wheel built from the sdist) into $OUT/dist"
REGOPS_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m build --no-isolation --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 \
  || { tail -n 60 "$OUT/build.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/regops-*.tar.gz)
WHEEL=$(ls "$OUT"/dist/regops-*.whl)

echo "== the sdist holds the sources the build needs"
tar tzf "$SDIST" >"$OUT/sdist-files.txt"
for file in setup.py pyproject.toml MANIFEST.in README.md CHANGELOG.md csrc/build_flags.py csrc/regops.cpp \
            csrc/include/regops/schemas.h csrc/include/regops/optim.h csrc/include/regops/cuda_runtime.cuh \
            csrc/cpu/optim.cpp csrc/cuda/optim.cu csrc/simt/runtime.cpp regops/py.typed regops/__init__.py; do
  grep -q "^regops-[^/]*/$file\$" "$OUT/sdist-files.txt" || { echo "the sdist lacks $file"; exit 1; }
done

echo "== a fresh virtualenv with this environment's torch, and the wheel"
"$PYTHON" -m venv --without-pip "$OUT/venv"
PARENT_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NEW_SITE=$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PARENT_SITE" >"$NEW_SITE/_parent_environment.pth"
"$PYTHON" -m pip --python "$OUT/venv/bin/python" install -q --no-deps --no-index "$WHEEL"

echo "== the installed package"
cd "$OUT/run"
VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$ROOT/pyproject.toml")
REGOPS_CUDA_SIM=1 "$OUT/venv/bin/python" - "$OUT/venv" "$VERSION" <<'EOF'
import os
import sys

import torch

import regops

venv, version = sys.argv[1], sys.argv[2]
assert regops.__file__.startswith(os.path.realpath(venv)) or regops.__file__.startswith(venv), regops.__file__
assert regops.__version__ == version, (regops.__version__, version)
assert os.path.exists(os.path.join(os.path.dirname(regops.__file__), "py.typed"))
x = torch.randn(6, 3, 5)
expected = torch.nn.functional.batch_norm(x, None, None, training=True)
torch.testing.assert_close(regops.batch_norm(x, None, None, training=True), expected, atol=1e-5, rtol=1e-5)
with regops.use_backend("cuda"):  # the simulated CUDA kernels, built from the sdist's csrc/cuda
    torch.testing.assert_close(regops.batch_norm(x, None, None, training=True), expected, atol=1e-5, rtol=1e-5)
y, mask = regops.dropout_with_mask(torch.ones(1000), 0.25, seed=1)
assert ((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75))).all() and mask.dtype == torch.uint8
p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
twin = torch.nn.Parameter(p.detach().clone())
p.grad = twin.grad = torch.randn(4, dtype=torch.float64)
regops.optim.AdamW([p], lr=0.1).step()
torch.optim.AdamW([twin], lr=0.1, foreach=False).step()
torch.testing.assert_close(p, twin)
print(f"regops {regops.__version__} from {os.path.dirname(regops.__file__)}: ok")
EOF
echo "== sdist-check passed: $(basename "$SDIST"), $(basename "$WHEEL")"
