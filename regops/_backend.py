"""Backend selection: which implementation runs an op.

Backends: ``"cuda"`` (hand-written CUDA kernels), ``"triton"``, ``"cpu"`` (C++)
and ``"reference"`` (pure torch, the oracle of the tests). By default a CPU
tensor uses ``cpu`` and a CUDA tensor ``cuda`` (``triton`` if this build has no
CUDA kernels). ``set_backend``, ``use_backend`` or the environment variable
``REGOPS_BACKEND`` force one.

``REGOPS_CUDA_SIM=1`` makes the ``cuda`` backend available for CPU tensors, as
``TRITON_INTERPRET=1`` does for ``triton``: the same CUDA kernel sources,
compiled by the host compiler against a SIMT execution layer
(regops._C_cuda_sim, csrc/simt/), run on the CPU with every barrier, warp
collective, shared-memory index and launch configuration checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from regops import _C  # noqa: F401  (loads the operator library)

_CUDA_SIMULATED = os.environ.get("REGOPS_CUDA_SIM", "0") == "1"
if _CUDA_SIMULATED:
    from regops import _C_cuda_sim  # noqa: F401  (loads the simulated CUDA kernels: regops_cuda_sim::*)

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
            return ("this build of regops has no CUDA kernels (built with REGOPS_CUDA=0 or without a CUDA toolkit); "
                    "REGOPS_CUDA_SIM=1 runs them on CPU tensors")
        return "no CUDA device is visible; REGOPS_CUDA_SIM=1 runs the CUDA kernels on CPU tensors"
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


def cuda_simulated() -> bool:
    """Whether the cuda backend runs on CPU tensors under the SIMT simulation (REGOPS_CUDA_SIM=1)."""
    return _CUDA_SIMULATED


def native_ops(backend: str, device_type: str):
    """The namespace of the compiled operators that run ``backend`` on
    tensors of ``device_type``: ``torch.ops.regops_cuda_sim`` for the cuda
    backend on CPU tensors (the simulation, same schemas), else
    ``torch.ops.regops`` (where the triton ops are ``triton_``-prefixed)."""
    if backend == "cuda" and device_type == "cpu":
        return torch.ops.regops_cuda_sim
    return torch.ops.regops


def native_namespaces() -> tuple[str, ...]:
    """The operator libraries loaded with regops' schemas (fake kernels and
    autograd go to each)."""
    return ("regops", "regops_cuda_sim") if _CUDA_SIMULATED else ("regops",)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends this build and machine offer, fastest first."""
    names = []
    if (has_cuda_kernels() and torch.cuda.is_available()) or _CUDA_SIMULATED:
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
def use_backend(name: str | None) -> Iterator[None]:
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
    if name == "cuda" and device != "cuda" and not (device == "cpu" and _CUDA_SIMULATED):
        raise RuntimeError(f"regops backend 'cuda' needs CUDA tensors (or CPU tensors with REGOPS_CUDA_SIM=1), "
                           f"got a tensor on {tensor.device}")
    if name == "cpu" and device != "cpu":
        raise RuntimeError(f"regops backend 'cpu' needs CPU tensors, got a tensor on {tensor.device}")
    if name == "triton" and device != "cuda" and not (device == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"regops backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got a tensor on {tensor.device}"
        )
    return name


_forced = _validate(os.environ.get("REGOPS_BACKEND"), "REGOPS_BACKEND") if os.environ.get("REGOPS_BACKEND") else None
