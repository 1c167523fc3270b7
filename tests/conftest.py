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

import regops  # noqa: E402

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
