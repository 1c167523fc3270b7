"""The one way the Triton ops launch a kernel.

A launch runs with the tensors' CUDA device made current: Triton launches on
the current device and stream, so a call on ``cuda:1`` tensors while device
0 is current would otherwise run on device 0 and read memory it cannot
address. Every launch goes through ``launch``, so ``device_guard`` is the
single place that decides it (and the place a test watches).
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


def launch(kernel, grid, device: torch.device, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) on ``device``. ``wrap_triton`` lets
    torch.compile see the launch inside a triton_op and is a plain call
    otherwise."""
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **constexprs)
