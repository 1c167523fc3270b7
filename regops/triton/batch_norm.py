"""Batch normalization in Triton, following csrc/include/regops/batch_norm.h.

Every op first brings the input into one of the two dense layouts
(reference.batch_norm_memory_format) and derives its geometry from that
layout and the sizes alone, never from the strides, which torch leaves
arbitrary on size-1 dimensions. The input is then seen as
(outer, C, inner) with strides (C * inner, inner, 1): contiguous NCHW is
(N, C, S); channels_last (and any input with S == 1) is (N * S, C, 1).

- Per-channel reductions (statistics; the backward's sum(dy) and
  sum(dy * (x - mean))) read [BLOCK_O, BLOCK_C, BLOCK_I] tiles, contiguous
  along the innermost dimension of memory: BLOCK_C == 1 for NCHW (rows of S
  elements of one channel), BLOCK_I == 1 for channels_last (rows of C
  channels), so neither layout is read with strided gathers. Each channel is
  split over SPLIT programs by ranges of outer rows; each program writes its
  partial (Welford mean and M2, or the two sums) and a second kernel merges
  the SPLIT partials of each channel in order. The split depends on the shape
  only, so the result is the same bits on every run and every GPU. Bytes:
  read x (and dy) once.
- Elementwise passes (normalize; grad_input): one program per BLOCK
  elements in memory order, the channel of element i being (i // inner) % C.
  A full block runs without a mask, so its loads and stores vectorize
  whatever the element count; only the last block is masked. Bytes: read x
  (and dy), write y.

Loads are in the storage dtype, math in float32 (float64 for float64), one
cast on store. Side tensors (mean, invstd, weight, ...) are made contiguous
first: they hold C elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from regops.reference import batch_norm_accumulate_dtype, batch_norm_memory_format
from regops.triton import _checks
from regops.triton._launch import launch

REDUCE_TILE = 1024  # elements of a reduction tile: 4 KiB of float32 per load
ELEMENTWISE_BLOCK = 1024  # elements per elementwise program: 4 KiB of float32 in, 4 KiB out
MERGE_BLOCK = 128  # channels a merge program combines
# A reduction aims at this many programs (four per SM of a 132-SM H100) and
# gives each at least MIN_ELEMENTS_PER_PROGRAM elements, so that the partials
# stay a small fraction of the bytes read.
TARGET_PROGRAMS = 528
MIN_ELEMENTS_PER_PROGRAM = 4096


def reduce_warps(dtype: torch.dtype) -> int:
    """Warps of a reduction program. A 16-bit dtype takes four: eight
    elements a thread per tile, one 128-bit load. Wider dtypes take eight:
    four elements a thread are still a 128-bit load (two for float64), and
    eight float32 elements a thread spill on sm_80."""
    return 4 if dtype.itemsize == 2 else 8


@triton.jit
def _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_I: tl.constexpr):
    """Memory offsets and validity of the tile at (o_start, c_start, i_start)
    of the (outer, C, inner) view; rows at or past o_end are not this
    program's."""
    o = (o_start + tl.arange(0, BLOCK_O).to(tl.int64))[:, None, None]
    c = (c_start + tl.arange(0, BLOCK_C).to(tl.int64))[None, :, None]
    i = (i_start + tl.arange(0, BLOCK_I).to(tl.int64))[None, None, :]
    valid = (o < o_end) & (c < channels) & (i < inner)
    return (o * channels + c) * inner + i, valid


@triton.jit
def _channel_sum(tile):
    """[BLOCK_O, BLOCK_C, BLOCK_I] -> [BLOCK_C]."""
    return tl.sum(tl.sum(tile, axis=2), axis=0)


@triton.jit
def _welford_merge(mean, m2, count, other_mean, other_m2, other_count):
    """welford_merge of csrc/include/regops/welford.h, elementwise. Where a
    mean is not finite the mean is merged as the weighted sum of the two
    means, so that it is what torch's mean of such a batch is: +inf for a
    batch holding +inf (the delta form gives inf + (finite - inf) = NaN),
    NaN for one holding +inf and -inf."""
    total = count + other_count
    share = other_count.to(mean.dtype) / tl.maximum(total, 1).to(mean.dtype)
    delta = other_mean - mean
    merged_mean = tl.where(tl.abs(delta) < float("inf"), mean + delta * share,
                           mean * (1.0 - share) + other_mean * share)
    merged_m2 = m2 + other_m2 + delta * delta * count.to(mean.dtype) * share
    merged_mean = tl.where(count == 0, other_mean, tl.where(other_count == 0, mean, merged_mean))
    merged_m2 = tl.where(count == 0, other_m2, tl.where(other_count == 0, m2, merged_m2))
    return merged_mean, merged_m2, total


@triton.jit
def _program_rows(outer, rows_per_program):
    """The outer rows [start, end) of this program's part of the channels."""
    start = tl.program_id(1).to(tl.int64) * rows_per_program
    return start, tl.minimum(start + rows_per_program, outer)


@triton.jit
def _stats_partial_kernel(x_ptr, partial_ptr, outer, channels, inner, rows_per_program, splits,
                          BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    c_start = tl.program_id(0).to(tl.int64) * BLOCK_C
    o_begin, o_end = _program_rows(outer, rows_per_program)
    acc_dtype = partial_ptr.dtype.element_ty
    mean = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    m2 = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    count = tl.zeros((BLOCK_C,), dtype=tl.int64)
    for o_start in range(o_begin, o_end, BLOCK_O):
        for i_start in range(0, inner, BLOCK_I):
            offsets, valid = _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O, BLOCK_C,
                                           BLOCK_I)
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(acc_dtype)
            tile_count = _channel_sum(valid.to(tl.int64))
            n = tl.maximum(tile_count, 1).to(acc_dtype)
            tile_mean = _channel_sum(x) / n
            # Two passes over the tile, the second corrected by the rounding
            # error of the first mean (the sum of the deviations), so that a
            # large common offset does not leak into the variance. With an
            # infinite value the deviations hold NaN: the mean is then the
            # first pass's (inf, as torch's) and M2 is NaN.
            deviation = tl.where(valid, x - tile_mean[None, :, None], 0.0)
            deviation_sum = _channel_sum(deviation)
            tile_m2 = _channel_sum(deviation * deviation) - deviation_sum * deviation_sum / n
            tile_m2 = tl.where(tile_m2 < 0, 0.0, tile_m2)  # rounding below zero; keeps NaN
            correction = tl.where(tl.abs(deviation_sum) < float("inf"), deviation_sum / n, 0.0)
            mean, m2, count = _welford_merge(mean, m2, count, tile_mean + correction, tile_m2, tile_count)
    c = c_start + tl.arange(0, BLOCK_C)
    at = partial_ptr + tl.program_id(1).to(tl.int64) * channels + c
    tl.store(at, mean, mask=c < channels)
    tl.store(at + splits * channels, m2, mask=c < channels)


@triton.jit
def _stats_merge_kernel(partial_ptr, mean_ptr, var_ptr, outer, channels, inner, rows_per_program, splits,
                        BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = c < channels
    mean = tl.zeros((BLOCK,), dtype=mean_ptr.dtype.element_ty)
    m2 = tl.zeros((BLOCK,), dtype=mean_ptr.dtype.element_ty)
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    for split in range(0, splits):
        at = partial_ptr + split * channels + c
        start = tl.cast(split, tl.int64) * rows_per_program
        rows = tl.minimum(start + rows_per_program, outer) - start
        part_count = tl.zeros((BLOCK,), dtype=tl.int64) + rows * inner
        mean, m2, count = _welford_merge(mean, m2, count, tl.load(at, mask=valid, other=0.0),
                                         tl.load(at + splits * channels, mask=valid, other=0.0), part_count)
    tl.store(mean_ptr + c, mean, mask=valid)
    tl.store(var_ptr + c, tl.where(count > 0, m2 / tl.maximum(count, 1).to(mean.dtype), 0.0), mask=valid)


@triton.jit
def _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, valid, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """(mean, invstd, scale, shift) of each channel index: scale = invstd *
    weight, shift = bias - mean * scale."""
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
def _masked_grad(dy, x, scale, shift, RELU: tl.constexpr):
    if RELU:
        dy = tl.where(x * scale + shift <= 0, 0.0, dy)
    return dy


@triton.jit
def _masked_grad_residual(dy, x, z, scale, shift, RELU: tl.constexpr):
    if RELU:
        dy = tl.where(x * scale + shift + z <= 0, 0.0, dy)
    return dy


@triton.jit
def _backward_partial_kernel(dy_ptr, x_ptr, z_ptr, dz_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, partial_ptr,
                             outer, channels, inner, rows_per_program, splits, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """With HAS_RESIDUAL the mask includes z and dz receives the masked dy."""
    c_start = tl.program_id(0).to(tl.int64) * BLOCK_C
    o_begin, o_end = _program_rows(outer, rows_per_program)
    c = c_start + tl.arange(0, BLOCK_C)
    mean, _, scale, shift = _channel_affine(c, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, c < channels, HAS_WEIGHT,
                                            HAS_BIAS)
    mean, scale, shift = mean[None, :, None], scale[None, :, None], shift[None, :, None]
    sum_dy = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=mean.dtype)
    sum_dy_xmu = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=mean.dtype)
    for o_start in range(o_begin, o_end, BLOCK_O):
        for i_start in range(0, inner, BLOCK_I):
            offsets, valid = _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O, BLOCK_C,
                                           BLOCK_I)
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(mean.dtype)
            dy_raw = tl.load(dy_ptr + offsets, mask=valid, other=0.0)
            if HAS_RESIDUAL:
                z = tl.load(z_ptr + offsets, mask=valid, other=0.0).to(mean.dtype)
                dy = _masked_grad_residual(dy_raw.to(mean.dtype), x, z, scale, shift, RELU)
                tl.store(dz_ptr + offsets, dy.to(dy_raw.dtype), mask=valid)
            else:
                dy = _masked_grad(dy_raw.to(mean.dtype), x, scale, shift, RELU)
            sum_dy += dy
            sum_dy_xmu += tl.where(valid, dy * (x - mean), 0.0)
    at = partial_ptr + tl.program_id(1).to(tl.int64) * channels + c
    tl.store(at, _channel_sum(sum_dy), mask=c < channels)
    tl.store(at + splits * channels, _channel_sum(sum_dy_xmu), mask=c < channels)


@triton.jit
def _sum_merge_kernel(partial_ptr, sum_dy_ptr, sum_dy_xmu_ptr, channels, splits, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = c < channels
    sum_dy = tl.zeros((BLOCK,), dtype=sum_dy_ptr.dtype.element_ty)
    sum_dy_xmu = tl.zeros((BLOCK,), dtype=sum_dy_ptr.dtype.element_ty)
    for split in range(0, splits):
        at = partial_ptr + split * channels + c
        sum_dy += tl.load(at, mask=valid, other=0.0)
        sum_dy_xmu += tl.load(at + splits * channels, mask=valid, other=0.0)
    tl.store(sum_dy_ptr + c, sum_dy, mask=valid)
    tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=valid)


@triton.jit
def _normalize_block(x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, index, valid, channels, inner,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    channel = (index // inner) % channels
    _, _, scale, shift = _channel_affine(channel, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, valid, HAS_WEIGHT,
                                         HAS_BIAS)
    x = tl.load(x_ptr + index, mask=valid, other=0.0)
    y = x.to(scale.dtype) * scale + shift
    if HAS_RESIDUAL:
        y += tl.load(z_ptr + index, mask=valid, other=0.0).to(scale.dtype)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # keeps NaN, as torch.relu
    tl.store(y_ptr + index, y.to(x.dtype), mask=valid)


@triton.jit
def _elementwise_kernel(x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, numel, channels, inner,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    index = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _normalize_block(x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, index,
                         tl.full((BLOCK,), True, tl.int1), channels, inner, HAS_WEIGHT, HAS_BIAS, RELU, HAS_RESIDUAL)
    else:
        _normalize_block(x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, index, index < numel,
                         channels, inner, HAS_WEIGHT, HAS_BIAS, RELU, HAS_RESIDUAL)


@triton.jit
def _grad_input_block(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
                      count, index, valid, channels, inner, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    channel = (index // inner) % channels
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


# count is a value, not a size: a count of 1 (SyncBatchNorm passes it) must
# not become a compile-time constant, whose .to() does not exist.
@triton.jit(do_not_specialize=["count"])
def _backward_elementwise_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr,
                                 sum_dy_xmu_ptr, count, numel, channels, inner, TRAINING: tl.constexpr,
                                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                                 BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    index = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _grad_input_block(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr,
                          sum_dy_xmu_ptr, count, index, tl.full((BLOCK,), True, tl.int1), channels, inner, TRAINING,
                          HAS_WEIGHT, HAS_BIAS, RELU)
    else:
        _grad_input_block(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_dy_ptr,
                          sum_dy_xmu_ptr, count, index, index < numel, channels, inner, TRAINING, HAS_WEIGHT,
                          HAS_BIAS, RELU)


# --- launchers ------------------------------------------------------------------------

class _Geometry:
    """The (outer, C, inner) view of an input in its working layout, and how
    the reductions tile and split it. Derived from the sizes and the layout
    only."""

    def __init__(self, x: torch.Tensor, memory_format: torch.memory_format):
        spatial = 1
        for size in x.shape[2:]:
            spatial *= size
        self.channels = x.shape[1]
        if memory_format == torch.contiguous_format and spatial > 1:
            self.outer, self.inner = x.shape[0], spatial
        else:
            self.outer, self.inner = x.shape[0] * spatial, 1
        self.blocks = reduce_blocks(self.channels, self.inner)
        block_o, block_c, _ = self.blocks
        channel_programs = triton.cdiv(self.channels, block_c)
        elements = self.outer * self.inner
        splits = min(max(1, TARGET_PROGRAMS // max(1, channel_programs)),
                     max(1, elements * block_c // MIN_ELEMENTS_PER_PROGRAM), max(1, self.outer))
        self.rows_per_program = max(1, triton.cdiv(self.outer, splits))
        self.splits = triton.cdiv(self.outer, self.rows_per_program) if self.outer > 0 else 1
        self.grid = (channel_programs, self.splits)

    def partials(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty((2, self.splits, self.channels), dtype=batch_norm_accumulate_dtype(x.dtype),
                           device=x.device)


def reduce_blocks(channels: int, inner: int) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_I) of a reduction tile of REDUCE_TILE elements:
    along the spatial run for NCHW (inner > 1), along the channels otherwise.
    Powers of four bound the number of compiled variants."""
    if inner > 1:
        power_of_four = 4 ** (((inner - 1).bit_length() + 1) // 2)  # the smallest >= inner
        block_i = min(REDUCE_TILE, max(16, power_of_four))
        return REDUCE_TILE // block_i, 1, block_i
    block_c = min(64, max(4, triton.next_power_of_2(channels)))
    return REDUCE_TILE // block_c, block_c, 1


def _channels(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=batch_norm_accumulate_dtype(x.dtype), device=x.device)


def _launch_stats(x: torch.Tensor, geometry: _Geometry):
    mean, var = _channels(x), _channels(x)
    if geometry.channels == 0:
        return mean, var
    partials = geometry.partials(x)
    block_o, block_c, block_i = geometry.blocks
    args = (geometry.outer, geometry.channels, geometry.inner, geometry.rows_per_program, geometry.splits)
    launch(_stats_partial_kernel, geometry.grid, x.device, x, partials, *args, BLOCK_O=block_o, BLOCK_C=block_c,
           BLOCK_I=block_i, num_warps=reduce_warps(x.dtype))
    launch(_stats_merge_kernel, (triton.cdiv(geometry.channels, MERGE_BLOCK),), x.device, partials, mean, var, *args,
           BLOCK=MERGE_BLOCK)
    return mean, var


def _launch_elementwise(x, geometry, mean, invstd, weight, bias, relu, z=None):
    y = torch.empty_like(x)
    numel = x.numel()
    if numel > 0:
        launch(_elementwise_kernel, (triton.cdiv(numel, ELEMENTWISE_BLOCK),), x.device,
               x, z if z is not None else x, y, mean, invstd, weight if weight is not None else mean,
               bias if bias is not None else mean, numel, geometry.channels, geometry.inner,
               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, HAS_RESIDUAL=z is not None,
               BLOCK=ELEMENTWISE_BLOCK)
    return y


def _launch_backward_reduce(dy, x, geometry, mean, invstd, weight, bias, relu, z=None, dz=None):
    """The per-channel sums; with a residual z the mask includes it and dz
    receives the masked dy."""
    sum_dy, sum_dy_xmu = _channels(x), _channels(x)
    if geometry.channels == 0:
        return sum_dy, sum_dy_xmu
    partials = geometry.partials(x)
    block_o, block_c, block_i = geometry.blocks
    launch(_backward_partial_kernel, geometry.grid, x.device,
           dy, x, z if z is not None else x, dz if dz is not None else dy, mean, invstd,
           weight if weight is not None else mean, bias if bias is not None else mean, partials,
           geometry.outer, geometry.channels, geometry.inner, geometry.rows_per_program, geometry.splits,
           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, HAS_RESIDUAL=z is not None,
           BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_I=block_i, num_warps=reduce_warps(x.dtype))
    launch(_sum_merge_kernel, (triton.cdiv(geometry.channels, MERGE_BLOCK),), x.device, partials, sum_dy, sum_dy_xmu,
           geometry.channels, geometry.splits, BLOCK=MERGE_BLOCK)
    return sum_dy, sum_dy_xmu


def _launch_backward_elementwise(dy, x, geometry, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, training,
                                 relu):
    dx = torch.empty_like(x)
    numel = x.numel()
    if numel > 0:
        launch(_backward_elementwise_kernel, (triton.cdiv(numel, ELEMENTWISE_BLOCK),), x.device,
               dy, x, dx, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
               sum_dy, sum_dy_xmu, max(1, count), numel, geometry.channels, geometry.inner, TRAINING=training,
               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, BLOCK=ELEMENTWISE_BLOCK)
    return dx


def _prepare(input: torch.Tensor, grad_out: torch.Tensor | None = None):
    """(x, dy, geometry): the input in its working layout, grad_out brought
    into the same layout, and the geometry of that layout."""
    memory_format = batch_norm_memory_format(input)
    x = input.contiguous(memory_format=memory_format)
    dy = None if grad_out is None else grad_out.contiguous(memory_format=memory_format)
    return x, dy, _Geometry(x, memory_format)


def _residual(residual: torch.Tensor | None, memory_format: torch.memory_format) -> torch.Tensor | None:
    return None if residual is None else residual.contiguous(memory_format=memory_format)


def _side(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel tensor as the kernels index it: C consecutive elements."""
    return None if tensor is None else tensor.contiguous()


# --- the registered ops (same schemas and checks as the C++ ones) -------------------------

@triton_op("regops::triton_batch_norm_stats", mutates_args=())
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_batch_norm_input(input, "batch_norm_stats")
    x, _, geometry = _prepare(input)
    return _launch_stats(x, geometry)


@triton_op("regops::triton_batch_norm_elementwise", mutates_args=())
def batch_norm_elementwise(input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    _checks.check_batch_norm_arguments("batch_norm_elementwise", input, mean=mean, invstd=invstd, weight=weight,
                                       bias=bias)
    x, _, geometry = _prepare(input)
    return _launch_elementwise(x, geometry, _side(mean), _side(invstd), _side(weight), _side(bias), relu)


@triton_op("regops::triton_batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None,
                               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_batch_norm_arguments("batch_norm_backward_reduce", input, grad_out, mean=mean, invstd=invstd,
                                       weight=weight, bias=bias)
    x, dy, geometry = _prepare(input, grad_out)
    return _launch_backward_reduce(dy, x, geometry, _side(mean), _side(invstd), _side(weight), _side(bias), relu)


@triton_op("regops::triton_batch_norm_backward_elementwise", mutates_args=())
def batch_norm_backward_elementwise(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                    invstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                    sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor, count: int,
                                    relu: bool) -> torch.Tensor:
    op = "batch_norm_backward_elementwise"
    _checks.check_batch_norm_arguments(op, input, grad_out, mean=mean, invstd=invstd, weight=weight, bias=bias,
                                       sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    _checks.check_batch_norm_count(count, op)
    x, dy, geometry = _prepare(input, grad_out)
    return _launch_backward_elementwise(dy, x, geometry, _side(mean), _side(invstd), _side(weight), _side(bias),
                                        _side(sum_dy), _side(sum_dy_xmu), count, True, relu)


@triton_op("regops::triton_batch_norm_forward", mutates_args=())
def batch_norm_forward(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                       eps: float, relu: bool,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    _checks.check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, "batch_norm_forward")
    _checks.check_residual(residual, input, "batch_norm_forward")
    x, _, geometry = _prepare(input)
    z = _residual(residual, batch_norm_memory_format(input))
    if training:
        mean, var = _launch_stats(x, geometry)
        batch_var = var
    else:
        mean, var = running_mean.clone(memory_format=torch.contiguous_format), running_var
        batch_var = x.new_empty((0,), dtype=batch_norm_accumulate_dtype(x.dtype))
    invstd = torch.rsqrt(var + eps)
    return _launch_elementwise(x, geometry, mean, invstd, _side(weight), _side(bias), relu, z), mean, invstd, batch_var


@triton_op("regops::triton_batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, save_mean: torch.Tensor, save_invstd: torch.Tensor, training: bool,
                        relu: bool, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor]:
    _checks.check_batch_norm_arguments("batch_norm_backward", input, grad_out, weight=weight, bias=bias,
                                       save_mean=save_mean, save_invstd=save_invstd)
    _checks.check_residual(residual, input, "batch_norm_backward")
    x, dy, geometry = _prepare(input, grad_out)
    z = _residual(residual, batch_norm_memory_format(input))
    weight, bias, save_mean, save_invstd = _side(weight), _side(bias), _side(save_mean), _side(save_invstd)
    # With a residual the reduction writes the masked dy (grad_residual), and
    # grad_input is computed from it without a mask.
    dz = torch.empty_like(x) if z is not None else x.new_empty((0,))
    sum_dy, sum_dy_xmu = _launch_backward_reduce(dy, x, geometry, save_mean, save_invstd, weight, bias, relu, z,
                                                 dz if z is not None else None)
    count = x.numel() // max(1, x.shape[1])
    if z is not None:
        dy, relu = dz, False
    dx = _launch_backward_elementwise(dy, x, geometry, save_mean, save_invstd, weight, bias, sum_dy, sum_dy_xmu,
                                      count, training, relu)
    return dx, sum_dy_xmu * save_invstd, sum_dy, dz


# --- what the offline compile gate compiles (benchmarks/static_triton.py) ---------------

def compile_cases() -> None:
    """Calls of the ops above whose launches (recorded, not run) are every
    variant the gate compiles: each dtype; NCHW with every spatial tile width
    and channels_last with every channel tile width; every combination of
    weight, bias and ReLU; training and eval; count = 1; sizes and counts of 1,
    of multiples of 16 and of neither; offset (not 16-byte aligned) inputs. A
    kernel, constexpr value or int value that no call here reaches fails the
    gate."""
    def channel(c, dtype=torch.float32):
        return torch.empty(c, dtype=batch_norm_accumulate_dtype(dtype))

    def train_and_back(x, weight=True, bias=True, relu=False, residual=None):
        c = x.shape[1]
        w, b = (channel(c, x.dtype) if weight else None), (channel(c, x.dtype) if bias else None)
        batch_norm_forward(x, w, b, None, None, True, 1e-5, relu, residual)
        batch_norm_backward(torch.empty_like(x), x, w, b, channel(c, x.dtype), channel(c, x.dtype), True, relu,
                            residual)

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        train_and_back(torch.empty(16, 32, 8, 8, dtype=dtype))  # NCHW, S = 64
        train_and_back(torch.empty(4, 64, 5, 5, dtype=dtype).to(memory_format=torch.channels_last), relu=True)
        nchw = torch.empty(16, 32, 8, 8, dtype=dtype)
        train_and_back(nchw, relu=True, residual=torch.empty_like(nchw))  # the bottleneck's bn + residual + ReLU
    cl = torch.empty(4, 64, 5, 5).to(memory_format=torch.channels_last)
    train_and_back(cl, weight=False, residual=torch.empty_like(cl))  # a residual without the ReLU
    for spatial in ((3, 3), (10, 20), (28, 28)):  # spatial tiles of 16, 256 and 1024 (64 above)
        train_and_back(torch.empty(3, 5, *spatial), weight=False, relu=True)
    for channels in (3, 8, 16, 24):  # channel tiles of 4, 8, 16 and 32 (64 above)
        train_and_back(torch.empty(6, channels, 3, 3).to(memory_format=torch.channels_last), bias=False)
    train_and_back(torch.empty(65536, 1, 16))  # 256 programs of 256 rows for one channel
    train_and_back(torch.empty(1, 1, 2), weight=False, bias=False)  # every size 1 but the spatial one
    storage = torch.empty(1 + 7 * 16 * 33)
    train_and_back(storage[1:].view(7, 16, 33))  # offset: not 16-byte aligned
    x = torch.empty(5, 16, 4, 4)
    c = channel(16)
    batch_norm_forward(x, c, c, c, c, False, 1e-5, False)  # eval
    one = channel(1)
    batch_norm_forward(torch.empty(1, 1), one, one, one, one, False, 1e-5, False)  # a single element
    batch_norm_backward(torch.empty(1, 1), torch.empty(1, 1), one, one, one, one, False, False)
    batch_norm_backward(x, x, c, c, c, c, False, True)
    batch_norm_backward_elementwise(x, x, c, c, None, None, c, c, 1, False)  # SyncBatchNorm's count of 1


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _reduction_loads(a, *pointers) -> set[str]:
    """A reduction tile is contiguous along its inner dimension: 16-byte
    loads when the rows start 16-byte aligned. It stores per-channel
    partials only."""
    run = a["inner"] if a["BLOCK_I"] > 1 else a["channels"]
    return {"ld"} if _aligned(*(a[p] for p in pointers)) and run % 16 == 0 else set()


def _elementwise(a, *pointers) -> set[str]:
    return {"ld", "st"} if _aligned(*(a[p] for p in pointers)) and a["numel"] > 1 else set()


# The global accesses that must be 128-bit in the compiled code of a kernel,
# given the launch's arguments by name (see dropout.VECTOR_ACCESS).
VECTOR_ACCESS = {
    "_stats_partial_kernel": lambda a: _reduction_loads(a, "x_ptr"),
    "_backward_partial_kernel": lambda a: _reduction_loads(a, "x_ptr", "dy_ptr", "z_ptr"),
    "_elementwise_kernel": lambda a: _elementwise(a, "x_ptr", "z_ptr", "y_ptr"),
    "_backward_elementwise_kernel": lambda a: _elementwise(a, "dy_ptr", "x_ptr", "dx_ptr"),
}
NEVER_ONE: dict[str, str] = {}
