"""Layer norm and RMSNorm fused with dropout and a residual add, in Triton.

The structure of the CUDA kernels (csrc/cuda/layer_norm.cu): the dropout
mask is drawn first (``_ln_mask_kernel``, the dropout random rule through
regops.triton.dropout's Philox), because mask bytes span rows when hidden
% 8 != 0; then one program per row of the forward walks the row in tiles of
BLOCK elements three times (sum, centred second moment, output), which the
caches serve. The backward runs a fixed number of programs, each over a
contiguous chunk of rows, and accumulates dweight and dbias into its own
partial row; the partials are summed in program order afterwards
(deterministic). Bytes per element: forward reads x (and the residual) and
writes y (and h), 1/8 of mask written and read; backward reads dy (and dh)
and h and writes dx (and dresidual).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from regops._spec import batch_norm_accumulate_dtype, dropout_scale, dropout_threshold, layer_norm_h_dtype, mask_bytes
from regops.triton import _checks
from regops.triton._launch import launch
from regops.triton.dropout import _elements, _keep_bits

MASK_BLOCK_BYTES = 128
MAX_BLOCK = 4096  # elements of a row tile
BACKWARD_PROGRAMS = 64  # programs (and partial rows) of the backward

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float64: tl.float64}


@triton.jit(do_not_specialize=["offset", "threshold"])
def _ln_mask_kernel(mask_ptr, seed_ptr, offset, threshold, numel, total_bytes, BLOCK: tl.constexpr):
    byte, element = _elements(BLOCK)
    keep = _keep_bits(seed_ptr, offset, threshold, byte, BLOCK) & (element < numel)
    bits = tl.sum(keep.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
    tl.store(mask_ptr + byte, bits.to(tl.uint8), mask=byte < total_bytes)


@triton.jit
def _h_tile(x_ptr, res_ptr, mask_ptr, params_ptr, base, cols, valid, DROPOUT: tl.constexpr, HAS_RES: tl.constexpr):
    """h of one tile in the accumulate dtype, as stored: dropout rounded to
    x's dtype, the sum rounded to h's (res_ptr's) dtype."""
    scale = tl.load(params_ptr)
    x = tl.load(x_ptr + base + cols, mask=valid, other=0.0)
    v = x.to(scale.dtype)
    if DROPOUT:
        i = base + cols
        bits = tl.load(mask_ptr + (i >> 3), mask=valid, other=0).to(tl.int32)
        keep = (bits >> (i & 7).to(tl.int32)) & 1
        v = (v * (keep.to(scale.dtype) * scale)).to(x.dtype).to(scale.dtype)
    if HAS_RES:
        r = tl.load(res_ptr + base + cols, mask=valid, other=0.0)
        v = (v + r.to(scale.dtype)).to(r.dtype).to(scale.dtype)
    return tl.where(valid, v, 0.0)


@triton.jit
def _ln_forward_kernel(x_ptr, res_ptr, w_ptr, b_ptr, mask_ptr, out_ptr, h_ptr, mean_ptr, rstd_ptr, params_ptr, hidden,
                       DROPOUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       STORE_H: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * hidden
    eps = tl.load(params_ptr + 1)
    mean = eps * 0
    if not RMS:
        total = tl.zeros((BLOCK,), dtype=eps.dtype)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            total += _h_tile(x_ptr, res_ptr, mask_ptr, params_ptr, base, cols, cols < hidden, DROPOUT, HAS_RES)
        mean = tl.sum(total, axis=0) / hidden
    second = tl.zeros((BLOCK,), dtype=eps.dtype)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < hidden
        h = _h_tile(x_ptr, res_ptr, mask_ptr, params_ptr, base, cols, valid, DROPOUT, HAS_RES)
        centred = tl.where(valid, h - mean, 0.0)
        second += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(second, axis=0) / hidden + eps)
    if not RMS:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < hidden
        h = _h_tile(x_ptr, res_ptr, mask_ptr, params_ptr, base, cols, valid, DROPOUT, HAS_RES)
        y = (h - mean) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=valid, other=0.0)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=valid, other=0.0)
        tl.store(out_ptr + base + cols, y.to(out_ptr.dtype.element_ty), mask=valid)
        if STORE_H:
            tl.store(h_ptr + base + cols, h.to(h_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _backward_tile(dy_ptr, h_ptr, w_ptr, base, cols, valid, mean, rstd, scale, HAS_W: tl.constexpr):
    """dy, xhat = (h - mean) * rstd and g = dy * weight of one tile of a row,
    in the accumulate dtype (scale's)."""
    dy = tl.load(dy_ptr + base + cols, mask=valid, other=0.0).to(scale.dtype)
    xhat = (tl.load(h_ptr + base + cols, mask=valid, other=0.0).to(scale.dtype) - mean) * rstd
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + cols, mask=valid, other=0.0)
    return dy, xhat, g


@triton.jit
def _ln_backward_kernel(dy_ptr, dh_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, mask_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr,
                        params_ptr, rows, hidden, rows_per_program, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
                        RMS: tl.constexpr, DROPOUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    scale = tl.load(params_ptr)
    zero = scale * 0
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(0, hidden, BLOCK):  # this program's partial rows start at zero
        cols = start + tl.arange(0, BLOCK)
        if HAS_W:
            tl.store(dw_ptr + program * hidden + cols, tl.zeros((BLOCK,), dtype=scale.dtype), mask=cols < hidden)
        if HAS_B:
            tl.store(db_ptr + program * hidden + cols, tl.zeros((BLOCK,), dtype=scale.dtype), mask=cols < hidden)
    for row in range(first, last):
        base = row * hidden
        mean = zero
        if not RMS:
            mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        sum_g = tl.zeros((BLOCK,), dtype=scale.dtype)
        sum_g_xhat = tl.zeros((BLOCK,), dtype=scale.dtype)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < hidden
            dy, xhat, g = _backward_tile(dy_ptr, h_ptr, w_ptr, base, cols, valid, mean, rstd, scale, HAS_W)
            if HAS_W:
                dw = tl.load(dw_ptr + program * hidden + cols, mask=valid, other=0.0)
                tl.store(dw_ptr + program * hidden + cols, dw + dy * xhat, mask=valid)
            if HAS_B:
                db = tl.load(db_ptr + program * hidden + cols, mask=valid, other=0.0)
                tl.store(db_ptr + program * hidden + cols, db + dy, mask=valid)
            sum_g += g
            sum_g_xhat += tl.where(valid, g * xhat, 0.0)
        mean_g = zero
        if not RMS:
            mean_g = tl.sum(sum_g, axis=0) / hidden
        mean_g_xhat = tl.sum(sum_g_xhat, axis=0) / hidden
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < hidden
            dy, xhat, g = _backward_tile(dy_ptr, h_ptr, w_ptr, base, cols, valid, mean, rstd, scale, HAS_W)
            dh = rstd * (g - mean_g - xhat * mean_g_xhat)
            if HAS_DH:
                dh += tl.load(dh_ptr + base + cols, mask=valid, other=0.0).to(scale.dtype)
            if HAS_RES:
                tl.store(dres_ptr + base + cols, dh.to(dres_ptr.dtype.element_ty), mask=valid)
            if DROPOUT:
                i = base + cols
                bits = tl.load(mask_ptr + (i >> 3), mask=valid, other=0).to(tl.int32)
                keep = (bits >> (i & 7).to(tl.int32)) & 1
                dh = dh * (keep.to(scale.dtype) * scale)
            tl.store(dx_ptr + base + cols, dh.to(dx_ptr.dtype.element_ty), mask=valid)


def _block(hidden: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(hidden, 16)))


def _params(dtype: torch.dtype, p: float, eps: float, device) -> torch.Tensor:
    """[scale, eps] in the accumulate dtype, by pointer (Triton takes float
    scalars as float32)."""
    return torch.tensor([dropout_scale(p), eps], dtype=batch_norm_accumulate_dtype(dtype), device=device)


def _make_mask(numel: int, p: float, seed: torch.Tensor, offset: int, device) -> torch.Tensor:
    total = mask_bytes(numel)
    mask = torch.empty((total,), dtype=torch.uint8, device=device)
    launch(_ln_mask_kernel, (triton.cdiv(total, MASK_BLOCK_BYTES),), device, mask, seed.to(device), offset,
           dropout_threshold(p), numel, total, BLOCK=MASK_BLOCK_BYTES)
    return mask


# --- argument checks, with the words of csrc/include/regops/layer_norm_host.h -------------

_check = _checks.check
_INPUT_DTYPES = tuple(_TRITON_DTYPES)


def _check_input(t: torch.Tensor, name: str) -> None:
    _check(t.dim() == 2, "regops layer_norm: ", name, " must be 2-dimensional (rows, hidden), got shape ",
           _checks.sizes(t))
    _check(t.dtype in _INPUT_DTYPES, "regops layer_norm: ", name, " must be float32, float16, bfloat16 or float64, "
           "got ", _checks.scalar_type(t.dtype))
    _check(t.shape[1] > 0, "regops layer_norm: ", name, " must have a positive hidden size, got shape ",
           _checks.sizes(t))


def _check_row(t, input, name, dtype, length) -> None:
    _check(t.device == input.device, "regops layer_norm: ", name, " is on ", t.device, " but input is on ", input.device)
    _check(t.dtype == dtype, "regops layer_norm: ", name, " must be ", _checks.scalar_type(dtype), ", got ",
           _checks.scalar_type(t.dtype))
    _check(t.dim() == 1 and t.shape[0] == length, "regops layer_norm: ", name, " must have shape (", length, "), got ",
           _checks.sizes(t))


def _check_same_shape(t, input, name) -> None:
    _check(t.device == input.device, "regops layer_norm: ", name, " is on ", t.device, " but input is on ", input.device)
    _check(t.shape == input.shape, "regops layer_norm: ", name, " must have input's shape ", _checks.sizes(input),
           ", got ", _checks.sizes(t))


def _check_seed(seed, input) -> None:
    if seed is None:
        return
    _check(seed.numel() == 1 and seed.dtype == torch.int64, "regops layer_norm: seed must be a one-element int64 "
           "tensor, got ", _checks.scalar_type(seed.dtype), " with ", seed.numel(), " elements")
    _check(seed.device == input.device or seed.device.type == "cpu", "regops layer_norm: seed is on ", seed.device,
           " but input is on ", input.device)


def _check_common(p, offset) -> None:
    _check(0.0 <= p <= 1.0, "regops layer_norm: p must be in [0, 1], got ", float(p))
    _check(offset >= 0, "regops layer_norm: offset must be non-negative, got ", offset)


@triton_op("regops::triton_layer_norm_forward", mutates_args=())
def layer_norm_forward(input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, p: float, seed: torch.Tensor | None, offset: int, eps: float,
                       rms: bool, store_mask: bool, store_h: bool, residual_in_fp32: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_input(input, "input")
    acc = batch_norm_accumulate_dtype(input.dtype)
    if residual is not None:
        _check_same_shape(residual, input, "residual")
        _check(residual.dtype in (input.dtype, acc), "regops layer_norm: residual must be ",
               _checks.scalar_type(input.dtype), " or ", _checks.scalar_type(acc), ", got ",
               _checks.scalar_type(residual.dtype))
    for tensor, name in ((weight, "weight"), (bias, "bias")):
        if tensor is not None:
            _check_row(tensor, input, name, acc, input.shape[1])
    _check_common(p, offset)
    _check(eps >= 0.0, "regops layer_norm: eps must be non-negative, got ", float(eps))
    _check_seed(seed, input)
    _check(not store_mask or seed is not None, "regops layer_norm: store_mask needs a seed (dropout)")
    rows, hidden = input.shape
    h_dtype = layer_norm_h_dtype(input.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    x = input.contiguous()
    res = None if residual is None else residual.to(h_dtype).contiguous()
    out = torch.empty_like(x)
    h = torch.empty((rows, hidden) if store_h else (0,), dtype=h_dtype, device=x.device)
    mean = torch.empty((0 if rms else rows,), dtype=acc, device=x.device)
    rstd = torch.empty((rows,), dtype=acc, device=x.device)
    mask = torch.empty((0,), dtype=torch.uint8, device=x.device)
    if x.numel() == 0:
        if store_mask:
            mask = torch.zeros((mask_bytes(0),), dtype=torch.uint8, device=x.device)
        return out, h, mean, rstd, mask
    dropout_mask = _make_mask(x.numel(), p, seed, offset, x.device) if seed is not None else None
    if store_mask:
        mask = dropout_mask
    dummy = rstd  # stands in for absent pointers (never read: the constexpr flags)
    launch(_ln_forward_kernel, (rows,), x.device, x, dummy if res is None else res,
           dummy if weight is None else weight.contiguous(), dummy if bias is None else bias.contiguous(),
           dummy if dropout_mask is None else dropout_mask, out, h if store_h else dummy, mean if not rms else dummy,
           rstd, _params(x.dtype, p, eps, x.device), hidden, DROPOUT=dropout_mask is not None, HAS_RES=res is not None,
           HAS_W=weight is not None, HAS_B=bias is not None, STORE_H=store_h, RMS=rms, BLOCK=_block(hidden))
    return out, h, mean, rstd, mask


@triton_op("regops::triton_layer_norm_backward", mutates_args=())
def layer_norm_backward(grad_out: torch.Tensor, grad_h: torch.Tensor | None, h: torch.Tensor,
                        weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                        mask: torch.Tensor | None, seed: torch.Tensor | None, p: float, offset: int, rms: bool,
                        has_residual: bool, has_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_input(grad_out, "grad_out")
    _check_input(h, "h")
    _check_same_shape(h, grad_out, "h")
    acc = batch_norm_accumulate_dtype(grad_out.dtype)
    _check(h.dtype in (grad_out.dtype, acc), "regops layer_norm: h must be ", _checks.scalar_type(grad_out.dtype),
           " or ", _checks.scalar_type(acc), ", got ", _checks.scalar_type(h.dtype))
    if grad_h is not None:
        _check_same_shape(grad_h, grad_out, "grad_h")
        _check(grad_h.dtype == h.dtype, "regops layer_norm: grad_h must be ", _checks.scalar_type(h.dtype),
               " like h, got ", _checks.scalar_type(grad_h.dtype))
    rows, hidden = grad_out.shape
    if weight is not None:
        _check_row(weight, grad_out, "weight", acc, hidden)
    _check_row(mean, grad_out, "mean", acc, 0 if rms else rows)
    _check_row(rstd, grad_out, "rstd", acc, rows)
    if mask is not None:
        expected = mask_bytes(grad_out.numel())
        _check(mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == expected,
               "regops layer_norm: mask must be a flat uint8 tensor of ", expected, " bytes for ", grad_out.numel(),
               " elements, got ", _checks.scalar_type(mask.dtype), " of shape ", _checks.sizes(mask))
        _check(mask.device == grad_out.device, "regops layer_norm: mask is on ", mask.device, " but grad_out is on ",
               grad_out.device)
    _check_common(p, offset)
    _check_seed(seed, grad_out)
    dy, h_work = grad_out.contiguous(), h.contiguous()
    dx = torch.empty_like(dy)
    dres = torch.empty((rows, hidden) if has_residual else (0,), dtype=h.dtype, device=dy.device)
    grad_weight = torch.zeros((hidden if weight is not None else 0,), dtype=acc, device=dy.device)
    grad_bias = torch.zeros((hidden if has_bias else 0,), dtype=acc, device=dy.device)
    if dy.numel() == 0:
        return dx, dres, grad_weight, grad_bias
    if mask is not None:
        keep = mask.contiguous()
    elif seed is not None:
        keep = _make_mask(dy.numel(), p, seed, offset, dy.device)
    else:
        keep = None
    programs = min(rows, BACKWARD_PROGRAMS)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    dw = torch.empty((programs, hidden) if weight is not None else (0,), dtype=acc, device=dy.device)
    db = torch.empty((programs, hidden) if has_bias else (0,), dtype=acc, device=dy.device)
    dummy = rstd
    launch(_ln_backward_kernel, (programs,), dy.device, dy, dummy if grad_h is None else grad_h.contiguous(), h_work,
           dummy if weight is None else weight.contiguous(), dummy if rms else mean, rstd,
           dummy if keep is None else keep, dx, dres if has_residual else dummy, dw if weight is not None else dummy,
           db if has_bias else dummy, _params(dy.dtype, p, 0.0, dy.device), rows, hidden, rows_per_program,
           HAS_DH=grad_h is not None, HAS_W=weight is not None, RMS=rms, DROPOUT=keep is not None,
           HAS_RES=has_residual, HAS_B=has_bias, BLOCK=_block(hidden))
    if weight is not None:
        grad_weight = dw.sum(0)
    if has_bias:
        grad_bias = db.sum(0)
    return dx, dres, grad_weight, grad_bias


# --- what the offline compile gate compiles (benchmarks/static_triton.py) ---------------

def compile_cases() -> None:
    """Calls whose recorded launches cover every kernel, each bool constexpr
    both ways and the int arguments at 1 and at multiples of 16: every dtype,
    with and without dropout, residual, weight, bias, a stored h, a grad_h,
    LayerNorm and RMSNorm."""
    seed = torch.zeros(1, dtype=torch.int64)
    for dtype in _INPUT_DTYPES:
        acc = batch_norm_accumulate_dtype(dtype)
        for rows, hidden in ((16, 32), (5, 17), (1, 1), (1024, 16)):
            x = torch.empty(rows, hidden, dtype=dtype)
            w, b = torch.empty(hidden, dtype=acc), torch.empty(hidden, dtype=acc)
            full = rows % 2 == 0  # every flag on, else every flag off
            layer_norm_forward(x, x if full else None, w if full else None, b if full else None, 0.5,
                               seed if full or rows == 1 else None, 3, 1e-5, not full, full, full, False)
            mean = torch.empty(0 if not full else rows, dtype=acc)
            rstd = torch.empty(rows, dtype=acc)
            mask = torch.empty(mask_bytes(x.numel()), dtype=torch.uint8)
            layer_norm_backward(x, x if full else None, x, w if full else None, mean, rstd, mask if full else None,
                                seed if rows == 1 else None, 0.5, 0, not full, full, full)


# Int arguments that never take the value 1, and why.
NEVER_ONE = {"total_bytes": "a multiple of 16 by construction (mask_bytes)"}
