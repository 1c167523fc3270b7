"""Helpers shared by the op modules."""

from __future__ import annotations

import math
import numbers

import torch


def check_probability(value, name: str) -> float:
    """A float in [0, 1] from a real number or, as torch.nn.functional.dropout
    takes, a one-element real tensor (read once on the host); anything else
    raises ValueError naming the argument."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number in [0, 1] or a one-element real tensor holding one, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_tensor(value, name: str, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value

