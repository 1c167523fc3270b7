"""Stochastic depth (DropPath): timm's ``drop_path`` with the regops random rule.

Each sample (index along dim 0) is kept with probability 1 - p and then
scaled by 1 / (1 - p) (``scale_by_keep``), or zeroed. The keep decision of
sample s is bit s of ``regops.dropout_with_mask(ones(N), p, seed=seed,
offset=offset)``: the dropout random rule over the sample index, drawn by the
active backend's dropout kernel, so it is the same on every backend.
``drop_path_add`` adds a residual in the same elementwise pass.
"""

from __future__ import annotations

import torch

from regops.ops._common import check_probability, check_tensor
from regops.ops.dropout import _check_same_device, _check_seed_offset, dropout_with_mask


def _sample_factor(input: torch.Tensor, p: float, scale_by_keep: bool, seed, offset) -> torch.Tensor:
    """(N, 1, ..., 1) factors of input's dtype: 1 / (1 - p) (or 1) for a kept sample, 0 for a dropped one."""
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    ones = torch.ones(input.shape[0], dtype=compute, device=input.device)
    factor, _ = dropout_with_mask(ones, p, seed=seed, offset=offset)
    if not scale_by_keep:
        factor = (factor != 0).to(compute)
    return factor.to(input.dtype).reshape((input.shape[0],) + (1,) * (input.dim() - 1))


def _check(input, p, training, scale_by_keep, seed, offset) -> float:
    check_tensor(input, "input")
    if input.dim() == 0:
        raise ValueError("input must have a sample dimension (dim 0), got a 0-dimensional tensor")
    p = check_probability(p, "p")
    for name, value in (("training", training), ("scale_by_keep", scale_by_keep)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    _check_seed_offset(seed, offset)
    return p


def drop_path(input: torch.Tensor, p: float = 0.0, training: bool = True, scale_by_keep: bool = True, *,
              seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """timm's ``drop_path(x, drop_prob, training, scale_by_keep)`` (whose
    ``training`` defaults to False; here True): the identity when ``p == 0``
    or not training."""
    p = _check(input, p, training, scale_by_keep, seed, offset)
    if p == 0.0 or not training:
        return input
    return input * _sample_factor(input, p, scale_by_keep, seed, offset)


def drop_path_add(input: torch.Tensor, residual: torch.Tensor, p: float = 0.0, training: bool = True,
                  scale_by_keep: bool = True, *, seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """``residual + drop_path(input, p, training, scale_by_keep)`` in one pass
    (``torch.addcmul``); the keep decisions are ``drop_path``'s for the same
    (seed, offset)."""
    p = _check(input, p, training, scale_by_keep, seed, offset)
    check_tensor(residual, "residual")
    if residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    _check_same_device(residual, "residual", input, "input")
    if p == 0.0 or not training:
        return residual + input
    return torch.addcmul(residual, input, _sample_factor(input, p, scale_by_keep, seed, offset))
