"""Backend selection: which implementation runs an op.

Backends: ``"cuda"`` (hand-written CUDA kernels), ``"triton"``, ``"cpu"`` (C++)
and ``"reference"`` (pure torch, the oracle of the tests). By default a CPU
tensor uses ``cpu`` and a CUDA tensor ``cuda`` (``triton`` if this build has no
CUDA kernels). ``set_backend``, ``use_backend`` or the environment variable
``REGOPS_BACKEND`` force one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from regops import _C  # noqa: F401  (loads the operator library)

BACKENDS = ("cuda", "triton", "cpu", "reference")

_forced: str | None = None


def _validate(name: str | None, where: str) -> str | None:
    if name is None or name == "":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS} or None, got {name!r}")
    if name not in available_backends():
        raise RuntimeError(
            f"regops backend {name!r} is not available here (available: {available_backends()}); "
            + _why_unavailable(name)
        )
    return name


def _why_unavailable(name: str) -> str:
    if name == "cuda":
        if not has_cuda_kernels():
            return "this build of regops has no CUDA kernels (built with REGOPS_CUDA=0 or without a CUDA toolkit)"
        return "no CUDA device is visible"
    if name == "triton":
        return "triton needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors"
    return "the regops._C extension is not built"


# Plain module constants, not cached functions, so torch.compile reads them
# without tracing into the dispatcher.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("regops::dropout_forward", "CUDA")
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def has_cuda_kernels() -> bool:
    """Whether this build of regops._C contains the CUDA kernels."""
    return _HAS_CUDA_KERNELS


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends this build and machine offer, fastest first."""
    names = []
    if has_cuda_kernels() and torch.cuda.is_available():
        names.append("cuda")
    if _TRITON_IMPORTABLE and (torch.cuda.is_available() or triton_interpreted()):
        names.append("triton")
    names += ["cpu", "reference"]
    return names


def set_backend(name: str | None) -> None:
    """Force every regops op to use backend ``name`` (None restores the default)."""
    global _forced
    _forced = _validate(name, "backend")


def get_backend() -> str | None:
    """The forced backend, or None when each tensor's device picks it."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of ``set_backend``."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op on ``tensor``; raises if the forced backend
    cannot run on that tensor's device."""
    device = tensor.device.type
    name = _forced
    if name is None:
        if device == "cuda":
            return "cuda" if _HAS_CUDA_KERNELS else "triton"
        return "cpu" if device == "cpu" else "reference"
    if name == "cuda" and device != "cuda":
        raise RuntimeError(f"regops backend 'cuda' needs CUDA tensors, got a tensor on {tensor.device}")
    if name == "cpu" and device != "cpu":
        raise RuntimeError(f"regops backend 'cpu' needs CPU tensors, got a tensor on {tensor.device}")
    if name == "triton" and device != "cuda" and not (device == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"regops backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got a tensor on {tensor.device}"
        )
    return name


_forced = _validate(os.environ.get("REGOPS_BACKEND"), "REGOPS_BACKEND") if os.environ.get("REGOPS_BACKEND") else None
