"""Batch normalization in Triton, following csrc/include/regops/batch_norm.h.

The input is seen as (N, C, S) with its own strides, so contiguous and
channels_last inputs are read in place. Two kinds of kernels:

- per-channel reductions (statistics; the backward's sum(dy) and
  sum(dy * (x - mean))): one program per channel walks its N * S elements in
  blocks; statistics merge block by block with the Welford merge of
  csrc/include/regops/welford.h.
- elementwise passes (normalize; grad_input): one program per BLOCK elements
  in memory order, the channel of element i being (i // stride_c) % C, which
  holds for both layouts. Bytes: read x (and dy), write y.

Loads are in the storage dtype, math in float32 (float64 for float64), one cast on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from regops.reference import batch_norm_accumulate_dtype, batch_norm_memory_format

REDUCE_BLOCK = 1024  # elements of one channel per loop step of a reduction program
ELEMENTWISE_BLOCK = 1024  # elements per elementwise program: 4 KB of float32 in, 4 KB out


@triton.jit
def _channel_offsets(index, S, stride_n, stride_s):
    """Memory offsets (int64) of the per-channel flat indices n * S + s."""
    n = index // S
    return n * stride_n + (index - n * S) * stride_s


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, var_ptr, count_per_channel, S, stride_n, stride_c, stride_s,
                  BLOCK: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)
    base = x_ptr + channel * stride_c
    acc_dtype = mean_ptr.dtype.element_ty
    mean = tl.zeros((), dtype=acc_dtype)
    m2 = tl.zeros((), dtype=acc_dtype)
    count = tl.zeros((), dtype=acc_dtype)
    for start in range(0, count_per_channel, BLOCK):
        index = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = index < count_per_channel
        x = tl.load(base + _channel_offsets(index, S, stride_n, stride_s), mask=valid, other=0.0).to(acc_dtype)
        block_count = tl.sum(valid.to(acc_dtype), axis=0)
        block_mean = tl.sum(x, axis=0) / block_count
        deviation = tl.where(valid, x - block_mean, 0.0)
        block_m2 = tl.sum(deviation * deviation, axis=0)
        # Welford merge of (mean, m2, count) with the block's partial.
        total = count + block_count
        share = block_count / total
        delta = block_mean - mean
        mean = mean + delta * share
        m2 = m2 + block_m2 + delta * delta * count * share
        count = total
    tl.store(mean_ptr + channel, mean)
    tl.store(var_ptr + channel, tl.where(count > 0, m2 / tl.maximum(count, 1.0), 0.0))


@triton.jit
def _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, valid, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """(mean, invstd, scale, shift) per element: scale = invstd * weight,
    shift = bias - mean * scale."""
    mean = tl.load(mean_ptr + channel, mask=valid, other=0.0)
    invstd = tl.load(invstd_ptr + channel, mask=valid, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + channel, mask=valid, other=0.0)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + channel, mask=valid, other=0.0)
    return mean, invstd, scale, shift


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, numel, channels, stride_c,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < numel
    channel = (index // stride_c) % channels
    _, _, scale, shift = _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, valid, HAS_WEIGHT,
                                         HAS_BIAS)
    x = tl.load(x_ptr + index, mask=valid, other=0.0)
    y = x.to(scale.dtype) * scale + shift
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # keeps NaN, as torch.relu
    tl.store(y_ptr + index, y.to(x.dtype), mask=valid)


@triton.jit
def _masked_grad(dy, x, scale, shift, RELU: tl.constexpr):
    if RELU:
        dy = tl.where(x * scale + shift <= 0, 0.0, dy)
    return dy


@triton.jit
def _backward_reduce_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
                            count_per_channel, S, stride_n, stride_c, stride_s, dy_stride_n, dy_stride_c, dy_stride_s,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                            BLOCK: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)
    always = channel >= 0
    mean, _, scale, shift = _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, always, HAS_WEIGHT,
                                            HAS_BIAS)
    sum_dy = tl.zeros((BLOCK,), dtype=mean.dtype)
    sum_dy_xmu = tl.zeros((BLOCK,), dtype=mean.dtype)
    for start in range(0, count_per_channel, BLOCK):
        index = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = index < count_per_channel
        x = tl.load(x_ptr + channel * stride_c + _channel_offsets(index, S, stride_n, stride_s), mask=valid,
                    other=0.0).to(mean.dtype)
        dy = tl.load(dy_ptr + channel * dy_stride_c + _channel_offsets(index, S, dy_stride_n, dy_stride_s),
                     mask=valid, other=0.0).to(mean.dtype)
        dy = _masked_grad(dy, x, scale, shift, RELU)
        sum_dy += dy
        sum_dy_xmu += tl.where(valid, dy * (x - mean), 0.0)
    tl.store(sum_dy_ptr + channel, tl.sum(sum_dy, axis=0))
    tl.store(sum_dy_xmu_ptr + channel, tl.sum(sum_dy_xmu, axis=0))


@triton.jit
def _backward_elementwise_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr,
                                 sum_dy_xmu_ptr, count, numel, channels, stride_c, TRAINING: tl.constexpr,
                                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                                 BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < numel
    channel = (index // stride_c) % channels
    mean, invstd, scale, shift = _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, valid,
                                                 HAS_WEIGHT, HAS_BIAS)
    x_raw = tl.load(x_ptr + index, mask=valid, other=0.0)
    x = x_raw.to(mean.dtype)
    dy = _masked_grad(tl.load(dy_ptr + index, mask=valid, other=0.0).to(mean.dtype), x, scale, shift, RELU)
    dx = dy * scale  # scale = invstd * weight
    if TRAINING:
        inverse_count = 1.0 / count.to(mean.dtype)
        sum_dy = tl.load(sum_dy_ptr + channel, mask=valid, other=0.0)
        sum_dy_xmu = tl.load(sum_dy_xmu_ptr + channel, mask=valid, other=0.0)
        dx += (x - mean) * (-scale * invstd * invstd * sum_dy_xmu * inverse_count) - scale * sum_dy * inverse_count
    tl.store(dx_ptr + index, dx.to(x_raw.dtype), mask=valid)


# --- launchers ------------------------------------------------------------------------

def _geometry(x: torch.Tensor):
    """(count per channel, S, stride_n, stride_c, stride_s) of x in a dense layout."""
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    # The spatial dims of a contiguous or channels_last tensor are one run
    # with the innermost spatial stride.
    stride_s = x.stride(-1) if x.dim() > 2 else 1
    return x.shape[0] * spatial, spatial, x.stride(0), x.stride(1), stride_s


def _channels(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=batch_norm_accumulate_dtype(x.dtype), device=x.device)


def _launch_stats(x: torch.Tensor):
    mean, var = _channels(x), _channels(x)
    count, spatial, stride_n, stride_c, stride_s = _geometry(x)
    if x.shape[1] > 0:
        wrap_triton(_stats_kernel)[(x.shape[1],)](x, mean, var, count, spatial, stride_n, stride_c, stride_s,
                                                  BLOCK=REDUCE_BLOCK)
    return mean, var


def _launch_elementwise(x, mean, invstd, weight, bias, relu):
    y = torch.empty_like(x)
    numel = x.numel()
    if numel > 0:
        wrap_triton(_elementwise_kernel)[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
            x, y, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean, numel,
            x.shape[1], x.stride(1), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu,
            BLOCK=ELEMENTWISE_BLOCK)
    return y


def _launch_backward_reduce(dy, x, mean, invstd, weight, bias, relu):
    sum_dy, sum_dy_xmu = _channels(x), _channels(x)
    count, spatial, stride_n, stride_c, stride_s = _geometry(x)
    _, _, dy_stride_n, dy_stride_c, dy_stride_s = _geometry(dy)
    if x.shape[1] > 0:
        wrap_triton(_backward_reduce_kernel)[(x.shape[1],)](
            dy, x, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean, sum_dy,
            sum_dy_xmu, count, spatial, stride_n, stride_c, stride_s, dy_stride_n, dy_stride_c, dy_stride_s,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, BLOCK=REDUCE_BLOCK)
    return sum_dy, sum_dy_xmu


def _launch_backward_elementwise(dy, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, training, relu):
    dx = torch.empty_like(x)
    numel = x.numel()
    if numel > 0:
        wrap_triton(_backward_elementwise_kernel)[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
            dy, x, dx, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            sum_dy, sum_dy_xmu, max(1, count), numel, x.shape[1], x.stride(1), TRAINING=training,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, BLOCK=ELEMENTWISE_BLOCK)
    return dx


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=batch_norm_memory_format(x))


# --- the registered ops (same schemas as the C++ ones) ------------------------------------

@triton_op("regops::triton_batch_norm_stats", mutates_args=())
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_stats(_dense(input))


@triton_op("regops::triton_batch_norm_elementwise", mutates_args=())
def batch_norm_elementwise(input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    return _launch_elementwise(_dense(input), mean, invstd, weight, bias, relu)


@triton_op("regops::triton_batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None,
                               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = _dense(input)
    return _launch_backward_reduce(grad_out.contiguous(memory_format=batch_norm_memory_format(x)), x, mean, invstd,
                                   weight, bias, relu)


@triton_op("regops::triton_batch_norm_backward_elementwise", mutates_args=())
def batch_norm_backward_elementwise(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                    invstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                    sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor, count: int,
                                    relu: bool) -> torch.Tensor:
    x = _dense(input)
    dy = grad_out.contiguous(memory_format=batch_norm_memory_format(x))
    return _launch_backward_elementwise(dy, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, True, relu)


@triton_op("regops::triton_batch_norm_forward", mutates_args=())
def batch_norm_forward(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                       eps: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _dense(input)
    if training:
        mean, var = _launch_stats(x)
        batch_var = var
    else:
        mean, var = running_mean.clone(), running_var
        batch_var = x.new_empty((0,), dtype=batch_norm_accumulate_dtype(x.dtype))
    invstd = torch.rsqrt(var + eps)
    return _launch_elementwise(x, mean, invstd, weight, bias, relu), mean, invstd, batch_var


@triton_op("regops::triton_batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, save_mean: torch.Tensor, save_invstd: torch.Tensor, training: bool,
                        relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _dense(input)
    dy = grad_out.contiguous(memory_format=batch_norm_memory_format(x))
    sum_dy, sum_dy_xmu = _launch_backward_reduce(dy, x, save_mean, save_invstd, weight, bias, relu)
    count = x.numel() // max(1, x.shape[1])
    dx = _launch_backward_elementwise(dy, x, save_mean, save_invstd, weight, bias, sum_dy, sum_dy_xmu, count, training,
                                      relu)
    return dx, sum_dy_xmu * save_invstd, sum_dy
