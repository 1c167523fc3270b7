"""The one way the Triton ops launch a kernel.

A launch runs with the tensors' CUDA device made current: Triton launches on
the current device and stream, so a call on ``cuda:1`` tensors while device
0 is current would otherwise run on device 0 and read memory it cannot
address. Every launch goes through ``launch``, so ``device_guard`` is the
single place that decides it (and the place a test watches), and
``recording`` can collect the launches a call makes without running them:
the offline compile gate (benchmarks/static_triton.py) compiles exactly the
argument sets the launchers produce.
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import wrap_triton


def device_guard(device: torch.device):
    """The context a launch on ``device`` runs in."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_recorded: list | None = None


@contextlib.contextmanager
def recording():
    """Within it, launches are appended to the yielded list as
    (kernel, grid, args, constexprs) instead of running."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def launch(kernel, grid, device: torch.device, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) on ``device``. ``wrap_triton`` lets
    torch.compile see the launch inside a triton_op and is a plain call
    otherwise."""
    if _recorded is not None:
        _recorded.append((kernel, grid, args, constexprs))
        return
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **constexprs)
