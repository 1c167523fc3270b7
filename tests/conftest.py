"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any @triton.jit function is created,
so before regops is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import regops  # noqa: E402

# Hypothesis profiles (tests/test_properties.py, tests/test_hostile.py), chosen
# with HYPOTHESIS_PROFILE. "ci", the default, is bounded and derandomized: the
# same examples every run, so a CI failure replays anywhere. "dev" draws fresh
# random examples each run and prints a reproduction blob on failure
# (@reproduce_failure); "thorough" is for a long local hunt.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def backend_devices() -> list[tuple[str, str]]:
    """Every (backend, device) pair this build and machine can run."""
    available = regops.available_backends()
    pairs = [("cpu", "cpu"), ("reference", "cpu")]
    if "triton" in available and not HAS_CUDA:
        pairs.append(("triton", "cpu"))  # under TRITON_INTERPRET=1
    if HAS_CUDA:
        if "cuda" in available:
            pairs.append(("cuda", "cuda"))
        if "triton" in available:
            pairs.append(("triton", "cuda"))
        pairs.append(("reference", "cuda"))
    return pairs


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


def triton_interpreted(backend: str, device) -> bool:
    return backend == "triton" and torch.device(device).type == "cpu"
