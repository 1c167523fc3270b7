"""Batch normalization in Triton, following csrc/include/regops/batch_norm.h.

Every op first brings the input into one of the two dense layouts
(reference.batch_norm_memory_format) and derives its geometry from that
layout and the sizes alone, never from the strides, which torch leaves
arbitrary on size-1 dimensions. The input is then seen as
(outer, C, inner) with strides (C * inner, inner, 1): contiguous NCHW is
(N, C, S); channels_last (and any input with S == 1) is (N * S, C, 1).

How the work is split: every pass over the elements (the statistics, the
normalize, the backward's sums and grad_input) runs on a grid
(channel blocks, slices). A program owns BLOCK_C channels (one for NCHW, a
block of consecutive channels for channels_last) and one slice of the outer
rows, and walks it in [BLOCK_O, BLOCK_C, BLOCK_I] tiles contiguous along the
innermost dimension of memory (BLOCK_C == 1 for NCHW: rows of S elements of
one channel; BLOCK_I == 1 for channels_last: rows of C channels), so
neither layout is read with strided gathers and no element needs channel
arithmetic: a program loads its channels' values once. Where the rows
alone give too few programs (a small batch of long NCHW rows), the
elementwise passes also cut each row into runs of whole tiles (grid axis 2).

- Reductions accumulate elementwise in the tile's registers and sum the
  tile once at the end; each program writes one partial per channel, and a
  finalize kernel adds the partials of each channel in slice order. The
  split depends on the shape only, so the result is the same bits on every
  run. Statistics are the sums of x - s and (x - s)^2 with one shift s per
  channel (its first element, zero when that is not finite: welford_shift),
  so partials add like plain sums and the variance keeps its digits when
  |mean| >> std; infinite values give torch's mean (sum / n) and a NaN
  variance.
- Finalize kernels compute each channel's coefficients once: the forward is
  y = act(x * scale + shift [+ z]), the backward dx = a * g + b * (x - mean)
  + c, g being dy masked by the recomputed ReLU (mask scale and shift are
  the forward's).

Bytes per element: statistics read x; normalize reads x (and z) and writes
y; the backward's sums read dy and x (with a residual also z, and write
dz = g); grad_input reads dy (or dz) and x and writes dx. Per-channel
values and partials are a few values per channel and slice.

Loads are in the storage dtype, math in float32 (float64 for float64), one
cast on store. Side tensors (mean, invstd, weight, ...) are made contiguous
first: they hold C elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from regops._spec import batch_norm_accumulate_dtype, batch_norm_memory_format
from regops.triton import _checks
from regops.triton._launch import launch

REDUCE_TILE = 1024  # elements of a tile: 4 KiB of float32 per load
FINALIZE_BLOCK = 128  # channels a finalize program handles
# A reduction aims at this many programs (four per SM of a 132-SM H100), an
# elementwise pass at more (each program has one tile in flight, so the
# device needs several per SM); each program gets at least
# MIN_ELEMENTS_PER_PROGRAM elements, so that per-program work (partials, the
# channels' values) stays a small fraction of the bytes moved.
TARGET_PROGRAMS = 528
ELEMENTWISE_TARGET_PROGRAMS = 4096
MIN_ELEMENTS_PER_PROGRAM = 4096
MAX_SLICES = 65535  # a grid's second dimension

# Rows of the per-channel coefficient tensors.
FORWARD_ROWS = 2  # scale, shift
BACKWARD_ROWS = 5  # dy_scale (a), xmu_scale (b), constant (c), mask scale, mask shift
MASK_ROW = 3


def reduce_warps(dtype: torch.dtype) -> int:
    """Warps of a tile program. A 16-bit dtype takes four: eight elements a
    thread per tile, one 128-bit load. Wider dtypes take eight: four
    elements a thread are still a 128-bit load (two for float64), and eight
    float32 elements a thread spill on sm_80."""
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
def _program_channels(channels, BLOCK_C: tl.constexpr):
    """This program's channel block: its first channel, the channel indices
    and which of them exist."""
    c_start = tl.program_id(0).to(tl.int64) * BLOCK_C
    c = c_start + tl.arange(0, BLOCK_C)
    return c_start, c, c < channels


@triton.jit
def _program_rows(outer, rows_per_program):
    """The outer rows [start, end) of this program's slice."""
    start = tl.program_id(1).to(tl.int64) * rows_per_program
    return start, tl.minimum(start + rows_per_program, outer)


@triton.jit
def _program_run(inner, inner_per_program, BLOCK_I: tl.constexpr):
    """The part [start, end) of each row that this program's elementwise
    pass covers (grid axis 2; a multiple of BLOCK_I, all of it unless a few
    long rows must be split for parallelism). Rows of channels (BLOCK_I ==
    1, inner == 1) are never split, and the constant bounds keep their tile
    offsets provably aligned."""
    if BLOCK_I == 1:
        start = 0
        end = 1
    else:
        start = tl.program_id(2).to(tl.int64) * inner_per_program
        end = tl.minimum(start + inner_per_program, inner)
    return start, end


@triton.jit
def _elementwise_program(outer, channels, inner, rows_per_program, inner_per_program, BLOCK_C: tl.constexpr,
                         BLOCK_I: tl.constexpr):
    """The slice of an elementwise pass's program: its channel block
    (_program_channels), rows [o_begin, o_end) and run [i_begin, i_end)."""
    c_start, c, valid_c = _program_channels(channels, BLOCK_C)
    o_begin, o_end = _program_rows(outer, rows_per_program)
    i_begin, i_end = _program_run(inner, inner_per_program, BLOCK_I)
    return c_start, c, valid_c, o_begin, o_end, i_begin, i_end


@triton.jit
def _elementwise_tile(tile, c_start, o_begin, o_end, i_begin, i_end, channels, inner, BLOCK_O: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets and validity of tile `tile` of an elementwise program's slice,
    rows outer and runs inner (_elementwise_tiles of them)."""
    run_tiles = tl.cdiv(i_end - i_begin, BLOCK_I)
    o_start = o_begin + (tile // run_tiles) * BLOCK_O
    i_start = i_begin + (tile % run_tiles) * BLOCK_I
    return _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O, BLOCK_C, BLOCK_I)


@triton.jit
def _elementwise_tiles(o_begin, o_end, i_begin, i_end, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    return tl.cdiv(o_end - o_begin, BLOCK_O) * tl.cdiv(i_end - i_begin, BLOCK_I)


@triton.jit
def _partial_sums(partial_ptr, splits, channels, c, valid, dtype, BLOCK: tl.constexpr):
    """The two sums of the partials (rows [0, splits) and [splits, 2 splits)
    of C values) of the channels c, added in slice order."""
    first = tl.zeros((BLOCK,), dtype=dtype)
    second = tl.zeros((BLOCK,), dtype=dtype)
    for split in range(0, splits):
        at = partial_ptr + split * channels + c
        first += tl.load(at, mask=valid, other=0.0)
        second += tl.load(at + splits * channels, mask=valid, other=0.0)
    return first, second


@triton.jit
def _channel_row(pointer, row, channels, c, valid):
    """Row `row` (C values) of a per-channel coefficient tensor, as a
    [1, BLOCK_C, 1] tile factor."""
    return tl.load(pointer + row * channels + c, mask=valid, other=0.0)[None, :, None]


@triton.jit
def _channel_rows(pointer, row, channels, c, valid):
    """Rows `row` and `row + 1` of a per-channel coefficient tensor (a
    scale and its shift), as [1, BLOCK_C, 1] tile factors."""
    return _channel_row(pointer, row, channels, c, valid), _channel_row(pointer, row + 1, channels, c, valid)


@triton.jit
def _channel_shift(x_ptr, c, valid, inner, dtype):
    """welford_shift of csrc/include/regops/welford.h: each channel's first
    element (n = 0, i = 0), zero when that is not finite."""
    first = tl.load(x_ptr + c * inner, mask=valid, other=0.0).to(dtype)
    return tl.where(tl.abs(first) < float("inf"), first, 0.0)


@triton.jit
def _stats_partial_kernel(x_ptr, partial_ptr, outer, channels, inner, rows_per_program, splits,
                          BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """partial[0 / 1, slice, c] = sum(x - s) / sum((x - s)^2) over the slice."""
    c_start, c, valid_c = _program_channels(channels, BLOCK_C)
    o_begin, o_end = _program_rows(outer, rows_per_program)
    acc_dtype = partial_ptr.dtype.element_ty
    shift = _channel_shift(x_ptr, c, valid_c & (outer > 0), inner, acc_dtype)[None, :, None]
    sum_d = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=acc_dtype)
    sum_d2 = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=acc_dtype)
    for o_start in range(o_begin, o_end, BLOCK_O):
        for i_start in range(0, inner, BLOCK_I):
            offsets, valid = _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O, BLOCK_C,
                                           BLOCK_I)
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(acc_dtype)
            d = tl.where(valid, x - shift, 0.0)
            sum_d += d
            sum_d2 += d * d
    at = partial_ptr + tl.program_id(1).to(tl.int64) * channels + c
    tl.store(at, _channel_sum(sum_d), mask=valid_c)
    tl.store(at + splits * channels, _channel_sum(sum_d2), mask=valid_c)


@triton.jit
def _affine(mean, invstd, weight_ptr, bias_ptr, c, valid, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """batch_norm_affine: scale = invstd * weight, shift = bias - mean * scale."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=valid, other=0.0)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c, mask=valid, other=0.0)
    return scale, shift


@triton.jit
def _inverse_std(var, eps_high, eps_low):
    """1 / sqrt(var + eps), eps given as two float32 parts (a Python float
    reaches a kernel as float32) so that float64 adds all of it."""
    if var.dtype == tl.float64:
        root = tl.sqrt(var + eps_high + eps_low)  # sqrt.rn.f64
    else:
        root = tl.sqrt_rn(var + eps_high + eps_low)  # tl.sqrt is sqrt.approx for float32
    return 1.0 / root


@triton.jit
def _stats_finalize_kernel(partial_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, invstd_ptr, coefficient_ptr,
                           outer, channels, inner, splits, eps_high, eps_low, AFFINE: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """mean and biased var from the partials, added in slice order; with
    AFFINE also invstd and the forward coefficients (scale, shift)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = c < channels
    dtype = mean_ptr.dtype.element_ty
    sum_d, sum_d2 = _partial_sums(partial_ptr, splits, channels, c, valid, dtype, BLOCK)
    count = outer * inner
    n = tl.maximum(count, 1).to(dtype)
    offset = sum_d / n
    mean = _channel_shift(x_ptr, c, valid & (count > 0), inner, dtype) + offset
    m2 = sum_d2 - sum_d * offset
    m2 = tl.where(m2 < 0, 0.0, m2)  # rounding below zero (clamp_m2); keeps NaN
    var = tl.where(count > 0, m2 / n, 0.0)
    tl.store(mean_ptr + c, mean, mask=valid)
    tl.store(var_ptr + c, var, mask=valid)
    if AFFINE:
        invstd = _inverse_std(var, eps_high, eps_low)
        tl.store(invstd_ptr + c, invstd, mask=valid)
        scale, shift = _affine(mean, invstd, weight_ptr, bias_ptr, c, valid, HAS_WEIGHT, HAS_BIAS)
        tl.store(coefficient_ptr + c, scale, mask=valid)
        tl.store(coefficient_ptr + channels + c, shift, mask=valid)


@triton.jit
def _affine_kernel(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, mean_out_ptr, invstd_out_ptr, coefficient_ptr,
                   channels, eps_high, eps_low, FROM_VAR: tl.constexpr, COPY_OUT: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """scale and shift (coefficient rows 0 and 1) from a mean and an invstd,
    or (FROM_VAR) a variance; COPY_OUT also writes the mean and the invstd
    (eval: save_mean and save_invstd from the running statistics)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = c < channels
    mean = tl.load(mean_ptr + c, mask=valid, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=valid, other=0.0)
    if FROM_VAR:
        invstd = _inverse_std(invstd, eps_high, eps_low)
    if COPY_OUT:
        tl.store(mean_out_ptr + c, mean, mask=valid)
        tl.store(invstd_out_ptr + c, invstd, mask=valid)
    scale, shift = _affine(mean, invstd, weight_ptr, bias_ptr, c, valid, HAS_WEIGHT, HAS_BIAS)
    tl.store(coefficient_ptr + c, scale, mask=valid)
    tl.store(coefficient_ptr + channels + c, shift, mask=valid)


@triton.jit
def _normalize_kernel(x_ptr, z_ptr, y_ptr, coefficient_ptr, outer, channels, inner, rows_per_program,
                      inner_per_program, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_I: tl.constexpr):
    """y = act(x * scale + shift [+ z]): one FMA per element (then the add
    and the ReLU)."""
    c_start, c, valid_c, o_begin, o_end, i_begin, i_end = _elementwise_program(
        outer, channels, inner, rows_per_program, inner_per_program, BLOCK_C, BLOCK_I)
    scale, shift = _channel_rows(coefficient_ptr, 0, channels, c, valid_c)
    for tile in range(0, _elementwise_tiles(o_begin, o_end, i_begin, i_end, BLOCK_O, BLOCK_I)):
        offsets, valid = _elementwise_tile(tile, c_start, o_begin, o_end, i_begin, i_end, channels, inner, BLOCK_O,
                                           BLOCK_C, BLOCK_I)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        y = x.to(scale.dtype) * scale + shift
        if HAS_RESIDUAL:
            y += tl.load(z_ptr + offsets, mask=valid, other=0.0).to(scale.dtype)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # keeps NaN, as torch.relu
        tl.store(y_ptr + offsets, y.to(x.dtype), mask=valid)


@triton.jit
def _backward_partial_kernel(dy_ptr, x_ptr, z_ptr, dz_ptr, mean_ptr, coefficient_ptr, partial_ptr, outer, channels,
                             inner, rows_per_program, splits, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """partial[0 / 1, slice, c] = sum(g) / sum(g * (x - mean)), g = dy masked
    where x * scale + shift (+ z) <= 0 (coefficient rows MASK_ROW and
    MASK_ROW + 1); with HAS_RESIDUAL dz receives g."""
    c_start, c, valid_c = _program_channels(channels, BLOCK_C)
    o_begin, o_end = _program_rows(outer, rows_per_program)
    mean = tl.load(mean_ptr + c, mask=valid_c, other=0.0)[None, :, None]
    if RELU:
        mask_scale, mask_shift = _channel_rows(coefficient_ptr, 3, channels, c, valid_c)
    sum_dy = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=mean.dtype)
    sum_dy_xmu = tl.zeros((BLOCK_O, BLOCK_C, BLOCK_I), dtype=mean.dtype)
    for o_start in range(o_begin, o_end, BLOCK_O):
        for i_start in range(0, inner, BLOCK_I):
            offsets, valid = _tile_offsets(o_start, o_end, c_start, channels, i_start, inner, BLOCK_O, BLOCK_C,
                                           BLOCK_I)
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(mean.dtype)
            dy_raw = tl.load(dy_ptr + offsets, mask=valid, other=0.0)
            g = dy_raw.to(mean.dtype)
            if HAS_RESIDUAL:
                if RELU:
                    z = tl.load(z_ptr + offsets, mask=valid, other=0.0).to(mean.dtype)
                    g = tl.where(x * mask_scale + mask_shift + z <= 0, 0.0, g)
                tl.store(dz_ptr + offsets, g.to(dy_raw.dtype), mask=valid)
            elif RELU:
                g = tl.where(x * mask_scale + mask_shift <= 0, 0.0, g)
            sum_dy += g
            sum_dy_xmu += tl.where(valid, g * (x - mean), 0.0)
    at = partial_ptr + tl.program_id(1).to(tl.int64) * channels + c
    tl.store(at, _channel_sum(sum_dy), mask=valid_c)
    tl.store(at + splits * channels, _channel_sum(sum_dy_xmu), mask=valid_c)


# count is a value, not a size: a count of 1 (SyncBatchNorm passes it) must
# not become a compile-time constant, whose .to() does not exist.
@triton.jit(do_not_specialize=["count"])
def _gradient_finalize_kernel(partial_ptr, sum_dy_ptr, sum_dy_xmu_ptr, invstd_ptr, weight_ptr, grad_weight_ptr,
                              grad_bias_ptr, coefficient_ptr, count, channels, splits, FROM_PARTIALS: tl.constexpr,
                              WRITE_SUMS: tl.constexpr, WRITE_GRADS: tl.constexpr, COEFFICIENTS: tl.constexpr,
                              TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient sums (from the partials, added in slice order, or given),
    written out (WRITE_SUMS), grad_weight = sum(g * (x - mean)) * invstd and
    grad_bias = sum(g) (WRITE_GRADS), and the grad_input coefficients
    a, b, c of batch_norm_backward_coefficients (COEFFICIENTS)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = c < channels
    dtype = invstd_ptr.dtype.element_ty
    if FROM_PARTIALS:
        sum_dy, sum_dy_xmu = _partial_sums(partial_ptr, splits, channels, c, valid, dtype, BLOCK)
    else:
        sum_dy = tl.load(sum_dy_ptr + c, mask=valid, other=0.0)
        sum_dy_xmu = tl.load(sum_dy_xmu_ptr + c, mask=valid, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=valid, other=0.0)
    if WRITE_SUMS:
        tl.store(sum_dy_ptr + c, sum_dy, mask=valid)
        tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=valid)
    if WRITE_GRADS:
        tl.store(grad_weight_ptr + c, sum_dy_xmu * invstd, mask=valid)
        tl.store(grad_bias_ptr + c, sum_dy, mask=valid)
    if COEFFICIENTS:
        dy_scale = invstd
        if HAS_WEIGHT:
            dy_scale = dy_scale * tl.load(weight_ptr + c, mask=valid, other=0.0)
        tl.store(coefficient_ptr + c, dy_scale, mask=valid)
        if TRAINING:
            inverse_count = 1.0 / count.to(dtype)
            tl.store(coefficient_ptr + channels + c, -dy_scale * invstd * invstd * sum_dy_xmu * inverse_count,
                     mask=valid)
            tl.store(coefficient_ptr + 2 * channels + c, -dy_scale * sum_dy * inverse_count, mask=valid)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, coefficient_ptr, outer, channels, inner, rows_per_program,
                       inner_per_program, TRAINING: tl.constexpr, RELU: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_I: tl.constexpr):
    """dx = a * g + b * (x - mean) + c (batch_norm_grad_input), g = dy masked
    by the ReLU (RELU false: dy is already masked, or there is no ReLU).
    Eval has b = c = 0 and skips both, so a NaN or infinite input element
    does not turn its gradient NaN (torch's eval backward is dy * a)."""
    c_start, c, valid_c, o_begin, o_end, i_begin, i_end = _elementwise_program(
        outer, channels, inner, rows_per_program, inner_per_program, BLOCK_C, BLOCK_I)
    dy_scale = _channel_row(coefficient_ptr, 0, channels, c, valid_c)
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=valid_c, other=0.0)[None, :, None]
        xmu_scale = _channel_row(coefficient_ptr, 1, channels, c, valid_c)
        constant = _channel_row(coefficient_ptr, 2, channels, c, valid_c)
    if RELU:
        mask_scale, mask_shift = _channel_rows(coefficient_ptr, 3, channels, c, valid_c)
    for tile in range(0, _elementwise_tiles(o_begin, o_end, i_begin, i_end, BLOCK_O, BLOCK_I)):
        offsets, valid = _elementwise_tile(tile, c_start, o_begin, o_end, i_begin, i_end, channels, inner, BLOCK_O,
                                           BLOCK_C, BLOCK_I)
        dy_raw = tl.load(dy_ptr + offsets, mask=valid, other=0.0)
        g = dy_raw.to(dy_scale.dtype)
        if RELU:
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(dy_scale.dtype)
            g = tl.where(x * mask_scale + mask_shift <= 0, 0.0, g)
        elif TRAINING:
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(dy_scale.dtype)
        dx = g * dy_scale
        if TRAINING:
            dx += (x - mean) * xmu_scale + constant
        tl.store(dx_ptr + offsets, dx.to(dy_raw.dtype), mask=valid)


# --- launchers ------------------------------------------------------------------------

class _Geometry:
    """The (outer, C, inner) view of an input in its working layout, its
    tiles and how its passes split it. Derived from the sizes and the layout
    only. `grid`, `rows_per_program` and `splits` are the reductions'."""

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
        self.channel_programs = triton.cdiv(self.channels, self.blocks[1])
        self.grid, self.rows_per_program, self.splits = self.split(TARGET_PROGRAMS)

    def split(self, target_programs: int) -> tuple[tuple[int, int], int, int]:
        """(grid, rows_per_program, splits) of a pass aiming at
        target_programs programs of at least MIN_ELEMENTS_PER_PROGRAM elements."""
        elements = self.outer * self.inner
        splits = min(max(1, target_programs // max(1, self.channel_programs)),
                     max(1, elements * self.blocks[1] // MIN_ELEMENTS_PER_PROGRAM), max(1, self.outer), MAX_SLICES)
        rows_per_program = max(1, triton.cdiv(self.outer, splits))
        splits = triton.cdiv(self.outer, rows_per_program) if self.outer > 0 else 1
        return (self.channel_programs, splits), rows_per_program, splits

    def elementwise_split(self) -> tuple[tuple[int, int, int], int, int]:
        """(grid, rows_per_program, inner_per_program) of an elementwise
        pass: rows split as for a reduction (aiming at
        ELEMENTWISE_TARGET_PROGRAMS), and where that leaves too few programs
        (a small batch of long NCHW rows) each row cut into runs of whole
        tiles, so that a batch of one still fills the device."""
        (channel_programs, splits), rows_per_program, _ = self.split(ELEMENTWISE_TARGET_PROGRAMS)
        block_i = self.blocks[2]
        tiles = triton.cdiv(self.inner, block_i)
        by_work = max(1, self.outer * self.inner * self.blocks[1] // MIN_ELEMENTS_PER_PROGRAM) // splits
        by_device = ELEMENTWISE_TARGET_PROGRAMS // max(1, channel_programs * splits)
        runs = max(1, min(tiles, by_work, by_device, MAX_SLICES))
        inner_per_program = triton.cdiv(tiles, runs) * block_i
        runs = triton.cdiv(self.inner, inner_per_program)
        return (channel_programs, splits, runs), rows_per_program, inner_per_program

    def partials(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty((2, self.splits, self.channels), dtype=batch_norm_accumulate_dtype(x.dtype),
                           device=x.device)

    def tiles(self) -> dict:
        block_o, block_c, block_i = self.blocks
        return dict(BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_I=block_i)


def reduce_blocks(channels: int, inner: int) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_I) of a tile of REDUCE_TILE elements: along
    the spatial run for NCHW (inner > 1), along the channels otherwise.
    Powers of four bound the number of compiled variants."""
    if inner > 1:
        power_of_four = 4 ** (((inner - 1).bit_length() + 1) // 2)  # the smallest >= inner
        block_i = min(REDUCE_TILE, max(16, power_of_four))
        return REDUCE_TILE // block_i, 1, block_i
    block_c = min(64, max(4, triton.next_power_of_2(channels)))
    return REDUCE_TILE // block_c, block_c, 1


def _eps_parts(eps: float) -> tuple[float, float]:
    high = float(torch.tensor(eps, dtype=torch.float32))
    return high, eps - high


def _channels(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=batch_norm_accumulate_dtype(x.dtype), device=x.device)


def _coefficients(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.empty((rows, x.shape[1]), dtype=batch_norm_accumulate_dtype(x.dtype), device=x.device)


def _finalize_grid(channels: int) -> tuple[int]:
    return (triton.cdiv(channels, FINALIZE_BLOCK),)


def _launch_stats(x, geometry, eps=0.0, weight=None, bias=None, coefficients=None):
    """(mean, var, invstd): invstd and the forward coefficients only when
    `coefficients` is given (invstd None otherwise)."""
    mean, var = _channels(x), _channels(x)
    invstd = _channels(x) if coefficients is not None else None
    if geometry.channels == 0:
        return mean, var, invstd
    partials = geometry.partials(x)
    launch(_stats_partial_kernel, geometry.grid, x.device, x, partials, geometry.outer, geometry.channels,
           geometry.inner, geometry.rows_per_program, geometry.splits, **geometry.tiles(),
           num_warps=reduce_warps(x.dtype))
    affine = coefficients is not None
    launch(_stats_finalize_kernel, _finalize_grid(geometry.channels), x.device, partials, x,
           weight if weight is not None else mean, bias if bias is not None else mean, mean, var,
           invstd if affine else mean, coefficients if affine else mean, geometry.outer, geometry.channels,
           geometry.inner, geometry.splits, *_eps_parts(eps), AFFINE=affine, HAS_WEIGHT=weight is not None,
           HAS_BIAS=bias is not None, BLOCK=FINALIZE_BLOCK)
    return mean, var, invstd


def _launch_affine(x, mean, invstd_or_var, weight, bias, coefficients, eps=0.0, from_var=False, mean_out=None,
                   invstd_out=None):
    """Coefficient rows 0 and 1 of `coefficients` (scale, shift)."""
    if x.shape[1] == 0:
        return
    copy_out = mean_out is not None
    launch(_affine_kernel, _finalize_grid(x.shape[1]), x.device, mean, invstd_or_var,
           weight if weight is not None else mean, bias if bias is not None else mean,
           mean_out if copy_out else mean, invstd_out if copy_out else mean, coefficients, x.shape[1],
           *_eps_parts(eps), FROM_VAR=from_var, COPY_OUT=copy_out, HAS_WEIGHT=weight is not None,
           HAS_BIAS=bias is not None, BLOCK=FINALIZE_BLOCK)


def _launch_normalize(x, geometry, coefficients, relu, z=None):
    y = torch.empty_like(x)
    if x.numel() > 0:
        grid, rows_per_program, inner_per_program = geometry.elementwise_split()
        launch(_normalize_kernel, grid, x.device, x, z if z is not None else x, y, coefficients, geometry.outer,
               geometry.channels, geometry.inner, rows_per_program, inner_per_program, RELU=relu, HAS_RESIDUAL=z is not None,
               **geometry.tiles(), num_warps=reduce_warps(x.dtype))
    return y


def _launch_backward_reduce(dy, x, geometry, mean, coefficients, relu, z=None, dz=None):
    """The partials of the per-channel sums; with a residual z the mask
    includes it and dz receives the masked dy. `coefficients` holds the mask
    rows when relu is set."""
    partials = geometry.partials(x)
    launch(_backward_partial_kernel, geometry.grid, x.device,
           dy, x, z if z is not None else x, dz if dz is not None else dy, mean, coefficients, partials,
           geometry.outer, geometry.channels, geometry.inner, geometry.rows_per_program, geometry.splits,
           RELU=relu, HAS_RESIDUAL=z is not None, **geometry.tiles(), num_warps=reduce_warps(x.dtype))
    return partials


def _launch_gradient_finalize(x, invstd, weight, coefficients, count, training, partials=None, splits=1,
                              sum_dy=None, sum_dy_xmu=None, write_sums=False, grad_weight=None, grad_bias=None):
    channels = x.shape[1]
    if channels == 0:
        return
    write_grads = grad_weight is not None
    launch(_gradient_finalize_kernel, _finalize_grid(channels), x.device,
           partials if partials is not None else invstd, sum_dy if sum_dy is not None else invstd,
           sum_dy_xmu if sum_dy_xmu is not None else invstd, invstd, weight if weight is not None else invstd,
           grad_weight if write_grads else invstd, grad_bias if write_grads else invstd,
           coefficients if coefficients is not None else invstd, max(1, count), channels, splits,
           FROM_PARTIALS=partials is not None, WRITE_SUMS=write_sums, WRITE_GRADS=write_grads,
           COEFFICIENTS=coefficients is not None, TRAINING=training, HAS_WEIGHT=weight is not None,
           BLOCK=FINALIZE_BLOCK)


def _launch_grad_input(dy, x, geometry, mean, coefficients, training, relu):
    dx = torch.empty_like(x)
    if x.numel() > 0:
        grid, rows_per_program, inner_per_program = geometry.elementwise_split()
        launch(_grad_input_kernel, grid, x.device, dy, x, dx, mean, coefficients, geometry.outer, geometry.channels,
               geometry.inner, rows_per_program, inner_per_program, TRAINING=training, RELU=relu, **geometry.tiles(),
               num_warps=reduce_warps(x.dtype))
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
    mean, var, _ = _launch_stats(x, geometry)
    return mean, var


@triton_op("regops::triton_batch_norm_elementwise", mutates_args=())
def batch_norm_elementwise(input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    _checks.check_batch_norm_arguments("batch_norm_elementwise", input, mean=mean, invstd=invstd, weight=weight,
                                       bias=bias)
    x, _, geometry = _prepare(input)
    coefficients = _coefficients(x, FORWARD_ROWS)
    _launch_affine(x, _side(mean), _side(invstd), _side(weight), _side(bias), coefficients)
    return _launch_normalize(x, geometry, coefficients, relu)


def _gradient_sums(dy, x, geometry, mean, invstd, weight, bias, relu, z=None, dz=None):
    """(partials, coefficients): the partials of the backward's sums and a
    BACKWARD_ROWS coefficient tensor whose mask rows hold the ReLU's scale
    and shift (when relu)."""
    coefficients = _coefficients(x, BACKWARD_ROWS)
    if relu:
        _launch_affine(x, mean, invstd, weight, bias, coefficients[MASK_ROW:])
    return _launch_backward_reduce(dy, x, geometry, mean, coefficients, relu, z, dz), coefficients


@triton_op("regops::triton_batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None,
                               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_batch_norm_arguments("batch_norm_backward_reduce", input, grad_out, mean=mean, invstd=invstd,
                                       weight=weight, bias=bias)
    x, dy, geometry = _prepare(input, grad_out)
    sum_dy, sum_dy_xmu = _channels(x), _channels(x)
    if geometry.channels == 0:
        return sum_dy, sum_dy_xmu
    invstd = _side(invstd)
    partials, _ = _gradient_sums(dy, x, geometry, _side(mean), invstd, _side(weight), _side(bias), relu)
    _launch_gradient_finalize(x, invstd, None, None, 1, True, partials=partials, splits=geometry.splits,
                              sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, write_sums=True)
    return sum_dy, sum_dy_xmu


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
    mean, invstd, weight = _side(mean), _side(invstd), _side(weight)
    coefficients = _coefficients(x, BACKWARD_ROWS)
    if relu:
        _launch_affine(x, mean, invstd, weight, _side(bias), coefficients[MASK_ROW:])
    _launch_gradient_finalize(x, invstd, weight, coefficients, count, True, sum_dy=_side(sum_dy),
                              sum_dy_xmu=_side(sum_dy_xmu))
    return _launch_grad_input(dy, x, geometry, mean, coefficients, True, relu)


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
    weight, bias = _side(weight), _side(bias)
    coefficients = _coefficients(x, FORWARD_ROWS)
    if training:
        mean, batch_var, invstd = _launch_stats(x, geometry, eps, weight, bias, coefficients)
    else:
        mean, invstd = _channels(x), _channels(x)
        batch_var = x.new_empty((0,), dtype=batch_norm_accumulate_dtype(x.dtype))
        _launch_affine(x, _side(running_mean), _side(running_var), weight, bias, coefficients, eps, from_var=True,
                       mean_out=mean, invstd_out=invstd)
    return _launch_normalize(x, geometry, coefficients, relu, z), mean, invstd, batch_var


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
    grad_weight, grad_bias = _channels(x), _channels(x)
    if geometry.channels == 0:
        return torch.empty_like(x), grad_weight, grad_bias, dz
    partials, coefficients = _gradient_sums(dy, x, geometry, save_mean, save_invstd, weight, bias, relu, z,
                                            dz if z is not None else None)
    count = x.numel() // geometry.channels
    _launch_gradient_finalize(x, save_invstd, weight, coefficients, count, training, partials=partials,
                              splits=geometry.splits, grad_weight=grad_weight, grad_bias=grad_bias)
    if z is not None:
        dy, relu = dz, False
    dx = _launch_grad_input(dy, x, geometry, save_mean, coefficients, training, relu)
    return dx, grad_weight, grad_bias, dz


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
    train_and_back(torch.empty(1, 2, 128, 128))  # one long row a channel: cut into runs of 4 tiles
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
    batch_norm_backward_elementwise(x, x, c, c, c, c, c, c, 80, True)
    # The split-up ops SyncBatchNorm calls.
    batch_norm_stats(x)
    batch_norm_elementwise(x, c, c, None, c, True)
    batch_norm_backward_reduce(x, x, c, c, c, None, False)
    batch_norm_backward_reduce(x, x, c, c, None, c, True)
    batch_norm_backward_reduce(x, x, c, c, c, None, True)


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _reduction_loads(a, *pointers) -> set[str]:
    """A reduction tile is contiguous along its inner dimension: 16-byte
    loads when the rows start 16-byte aligned. It stores per-channel
    partials only."""
    run = a["inner"] if a["BLOCK_I"] > 1 else a["channels"]
    return {"ld"} if _aligned(*(a[p] for p in pointers)) and run % 16 == 0 else set()


def _elementwise(a, *pointers) -> set[str]:
    """An elementwise tile: 16-byte loads and stores under the same
    condition."""
    run = a["inner"] if a["BLOCK_I"] > 1 else a["channels"]
    return {"ld", "st"} if _aligned(*(a[p] for p in pointers)) and run % 16 == 0 else set()


def _backward_partial(a) -> set[str]:
    """Loads as any reduction; with a residual it also stores dz."""
    if a["HAS_RESIDUAL"]:
        return _elementwise(a, "x_ptr", "dy_ptr", "z_ptr", "dz_ptr")
    return _reduction_loads(a, "x_ptr", "dy_ptr")


# The global accesses that must be 128-bit in the compiled code of a kernel,
# given the launch's arguments by name (see dropout.VECTOR_ACCESS).
VECTOR_ACCESS = {
    "_stats_partial_kernel": lambda a: _reduction_loads(a, "x_ptr"),
    "_backward_partial_kernel": _backward_partial,
    "_normalize_kernel": lambda a: _elementwise(a, "x_ptr", "z_ptr", "y_ptr"),
    "_grad_input_kernel": lambda a: _elementwise(a, "dy_ptr", "x_ptr", "dx_ptr"),
}
NEVER_ONE: dict[str, str] = {}
