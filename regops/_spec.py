"""The values of regops' written specs (README: the dropout random rule, batch
normalization, layer norm) that every Python backend reads: the Triton
kernels, the ops' checks and the pure-torch oracle in reference.py. The C++
and CUDA kernels have theirs in csrc/include/regops/ (philox.h, dropout.h,
batch_norm.h)."""

from __future__ import annotations

import torch

# Philox4x32-10's multipliers and Weyl increments (Random123).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def dropout_threshold(p: float) -> int:
    """floor(p * 2^32): a word keeps its element iff it is >= this."""
    return 1 << 32 if p >= 1.0 else int(p * 4294967296.0)


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def mask_bytes(numel: int) -> int:
    """Packed-mask length: one bit per element, padded to 16 bytes."""
    return (numel + 127) // 128 * 16


def memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of ``x`` from outermost to innermost in memory when ``x`` is
    dense (its elements fill numel consecutive places in some order of dims:
    contiguous, channels_last, any permutation; the strides of size-1 dims do
    not matter), so that ``x.permute(order)`` is a contiguous view; None when
    ``x`` is not dense. The dropout random rule numbers a dense tensor's
    elements in this order, any other tensor's in row-major order."""
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return order if x.permute(order).is_contiguous() else None


def batch_norm_accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The kernels' working (and output) layout: the input's when it is
    contiguous or channels_last(_3d), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def layer_norm_h_dtype(x_dtype: torch.dtype, residual_dtype: torch.dtype | None, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of h = dropout(x) + residual."""
    if residual_in_fp32:
        return batch_norm_accumulate_dtype(x_dtype)
    return x_dtype if residual_dtype is None else residual_dtype
