"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter on CPU tensors
(TRITON_INTERPRET must be set before any @triton.jit function is created, so
before regops is imported) and the CUDA kernels under the SIMT simulation
(REGOPS_CUDA_SIM, read when regops is imported): the cuda backend then runs on
CPU tensors.
"""

import contextlib
import os
import shutil
import subprocess

import torch

# pytest-xdist (`make test` runs a worker per core): each worker's thread pool
# gets its share of the cores. Workers that each start a thread per core
# oversubscribe them, and OpenMP threads spinning at a barrier then take the
# time of the other worker's (the CPU tests ran 2-4x slower). Subprocesses of
# the tests inherit the same share. Tests of thread counts set their own
# (num_threads below).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _threads = max(1, len(os.sched_getaffinity(0)) // _XDIST_WORKERS)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("REGOPS_CUDA_SIM", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import regops  # noqa: E402

if os.environ.get("REGOPS_SANITIZED"):
    # tests/sanitize.sh: every process (pytest-xdist workers too) must import
    # the instrumented build, not the normal one next to the sources.
    import sys

    _sanitized_lib = os.path.join("build", "sanitize", "lib", "regops")
    for _name in ("regops._C", "regops._C_cuda_sim"):
        _module = sys.modules.get(_name)
        if _module is not None and _sanitized_lib not in _module.__file__:
            raise RuntimeError(f"REGOPS_SANITIZED is set but {_name} comes from {_module.__file__}")

# Hypothesis profiles (tests/test_*_properties.py, tests/test_*_hostile.py), chosen
# with HYPOTHESIS_PROFILE. "ci", the default, is bounded and derandomized: the
# same examples every run, so a CI failure replays anywhere. "dev" draws fresh
# random examples each run and prints a reproduction blob on failure
# (@reproduce_failure); "thorough" is for a long local hunt.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def load_hypothesis_profiles() -> None:
    """Registers and loads the profiles; called again after importing
    torch.testing._internal, which registers and loads profiles of its own."""
    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


load_hypothesis_profiles()

HAS_CUDA = torch.cuda.is_available()
CUDA_SIMULATED = regops._backend.cuda_simulated()
# Where the tests of the cuda backend run: a GPU, else CPU tensors under the
# simulation; None when neither is there.
CUDA_DEVICE = "cuda" if HAS_CUDA else ("cpu" if CUDA_SIMULATED else None)
needs_cuda_backend = pytest.mark.skipif(CUDA_DEVICE is None, reason="needs a CUDA device or REGOPS_CUDA_SIM=1")


def backend_devices() -> list[tuple[str, str]]:
    """Every (backend, device) pair this build and machine can run."""
    available = regops.available_backends()
    pairs = [("cpu", "cpu"), ("reference", "cpu")]
    if "triton" in available and not HAS_CUDA:
        pairs.append(("triton", "cpu"))  # under TRITON_INTERPRET=1
    if CUDA_SIMULATED:
        pairs.append(("cuda", "cpu"))  # under REGOPS_CUDA_SIM=1
    if HAS_CUDA:
        if "cuda" in available:
            pairs.append(("cuda", "cuda"))
        if "triton" in available:
            pairs.append(("triton", "cuda"))
        pairs.append(("reference", "cuda"))
    return pairs


def reschedule(seed: int) -> None:
    """Another thread schedule for the simulated CUDA kernels (nothing on a GPU)."""
    if CUDA_SIMULATED:
        torch.ops.regops_cuda_sim.set_schedule_seed(seed)


def native_op_targets() -> list[tuple[str, str]]:
    """(operator namespace, device) of every compiled C++/CUDA op set this
    machine runs: regops on the CPU (and a GPU), regops_cuda_sim on the CPU
    under the simulation."""
    devices = {"regops": ["cpu", "cuda"] if HAS_CUDA else ["cpu"], "regops_cuda_sim": ["cpu"]}
    return [(namespace, device) for namespace in regops._backend.native_namespaces() for device in devices[namespace]]


def compile_backend_devices() -> list[tuple[str, str]]:
    """The (backend, device) pairs of the torch.compile tests. Inductor cannot
    compile Triton kernels for CPU tensors: on the CPU the compiled path is the
    C++ backend; on a GPU, cuda and triton."""
    pairs = [("cpu", "cpu")]
    if HAS_CUDA:
        pairs += [(b, "cuda") for b in ("cuda", "triton") if b in regops.available_backends()]
    return pairs


# opcheck's test_utils for the triton ops: all of them on a GPU; under the
# interpreter, which runs the kernel even on fake tensors, only the schema and
# autograd registration checks.
TRITON_OPCHECK_UTILS = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
                        if HAS_CUDA else ("test_schema", "test_autograd_registration"))


def _pair_id(pair):
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture(params=backend_devices(), ids=_pair_id)
def backend_device(request):
    """Runs the test once per available (backend, device) with that backend forced."""
    backend, device = request.param
    with regops.use_backend(backend):
        yield backend, torch.device(device)


@pytest.fixture(autouse=True)
def _no_leaked_backend():
    yield
    regops.set_backend(None)


@pytest.fixture
def small_triton_optim_programs(monkeypatch):
    """Under the Triton interpreter, optimizer programs of 512 elements in
    blocks of 256 (instead of 4096 in blocks of 1024): the interpreter runs
    every block of a program in Python, masked or not, so small tensors cost
    as much as 4096 elements each. The kernels read both sizes per launch;
    tensors past 512 elements still span several programs, whole ones
    (unmasked) and a masked tail, and the random rule depends on the element
    index only."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in regops.available_backends():
        from regops.triton import optim

        monkeypatch.setattr(optim, "CHUNK", 512)
        monkeypatch.setattr(optim, "BLOCK", 256)


def triton_interpreted(backend: str, device) -> bool:
    return backend == "triton" and torch.device(device).type == "cpu"


def cuda_simulated(backend: str, device) -> bool:
    return backend == "cuda" and torch.device(device).type == "cpu"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor in logical (row-major) order, so that equal bits
    compare equal whatever the layout: NaN == NaN, -0 != +0."""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """actual and expected hold the same dtype, shape and bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        actual.dtype, expected.dtype, actual.shape, expected.shape)
    assert torch.equal(bits(actual), bits(expected))


# --- hostile-input helpers (the *_hostile.py tests) ------------------------------

NAN, INF = float("nan"), float("inf")
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def specials(n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Random normals with NaN, +inf, -inf, -0.0 and the largest finite
    value of ``dtype`` mixed in at random places."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 6, (n,), generator=gen)
    big = torch.finfo(dtype).max
    for code, value in enumerate([NAN, INF, -INF, -0.0, big]):
        x[pick == code] = value
    return x.to(dtype=dtype, device=device)


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor, bf16_truncated: bool = False):
    """Same NaN positions, and bitwise-equal everything else (so -0.0 and
    +0.0 are told apart). ``bf16_truncated``: the Triton interpreter rounds
    float32 -> bfloat16 by truncation (a GPU rounds to nearest), so finite
    values may be 1 bf16 ulp off there."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    if bf16_truncated and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual[~nan], expected[~nan], atol=0, rtol=2**-7)
        assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    else:
        assert torch.equal(actual[~nan], expected[~nan])


@contextlib.contextmanager
def num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def same_bits_for_thread_counts(fn):
    """fn() under 1 and 2 threads (and one per core): every returned tensor
    bit-identical."""
    results = []
    for threads in (1, 2, max(2, len(os.sched_getaffinity(0)))):
        with num_threads(threads):
            out = fn()
        results.append([t.detach().clone() for t in (out if isinstance(out, (tuple, list)) else (out,))])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same_bits(a, b)


# (atol, rtol) of batch norm's outputs and gradients against torch in float64
# (tests/test_batch_norm*.py): float32 and float64 agree to rounding; 16-bit
# outputs are one rounding of a float32 result.
BATCH_NORM_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def assert_batch_norm_close(actual, expected, dtype, what, scale=1.0):
    """actual against expected at BATCH_NORM_TOLERANCES[dtype], the absolute
    tolerance times scale."""
    atol, rtol = BATCH_NORM_TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# How far above the elementwise tolerance a batch norm result may be: the
# input's gradient adds a few terms per element, a parameter's gradient
# count of them (rounding errors of a sum grow about as its square root).
_BATCH_NORM_SCALES = {"grad_input": lambda count: 4, "grad_weight": lambda count: count ** 0.5,
                      "grad_bias": lambda count: count ** 0.5}


def assert_batch_norm_results(names, actual, expected, dtype, count: int, case: str) -> None:
    """One batch norm's results (output, gradients, running statistics, as
    names says) against the reference's, for count elements per channel; the
    running statistics are float32 (float64 for float64 inputs)."""
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, value, want in zip(names, actual, expected, strict=True):
        scale = _BATCH_NORM_SCALES[name](count) if name in _BATCH_NORM_SCALES else 1.0
        assert_batch_norm_close(value, want, stats_dtype if name.startswith("running_") else dtype, f"{name} {case}",
                                scale=scale)


def run_host_program(tmp_path_factory, name: str, program: str, args) -> str:
    """Compiles ``program`` (C++ against csrc/include/, the launch arithmetic
    of the CUDA kernels built for the host) and returns what it prints for
    ``args``; skips when there is no host compiler."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp(name)
    source, binary = folder / f"{name}.cpp", folder / name
    source.write_text(program)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([compiler, "-std=c++17", "-O1", "-I", os.path.join(root, "csrc", "include"), str(source), "-o",
                    str(binary)], check=True)
    return subprocess.run([str(binary)] + [str(v) for v in args], check=True, capture_output=True, text=True).stdout
