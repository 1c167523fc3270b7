"""Dropout in Triton, following the dropout random rule bit for bit.

The Philox rounds are written out on uint32 words (tl.rand's mapping from
(seed, offset) to numbers is not the regops spec and has changed between
Triton versions). A program owns BLOCK_BYTES mask bytes; each byte covers
two Philox counters of four words, so the tile is [BLOCK_BYTES, 2, 4].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from regops.reference import dropout_scale, dropout_threshold, mask_bytes, memory_order

BLOCK_BYTES = 256  # 2048 elements a program: 8 KiB of float32 in, 8 KiB out


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _keep_tile(seed_ptr, offset, threshold, byte, numel):
    """Keep flags of the [BLOCK, 2, 4] elements of mask bytes ``byte``."""
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    half = tl.arange(0, 2)[None, :, None]
    word = tl.arange(0, 4)[None, None, :]
    counter = offset + byte[:, None, None] * 2 + half  # int64: [BLOCK, 2, 1]
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, zero, zero, k0, k1)
    random = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    element = byte[:, None, None] * 8 + half * 4 + word
    in_range = element < numel
    keep = (random.to(tl.int64) >= threshold) & in_range
    return keep, element, in_range, half * 4 + word


@triton.jit
def _scale_kept(x, keep, scale_ptr):
    """x * (keep ? scale : 0) in the compute dtype of scale_ptr (float32, or
    float64 for float64 inputs); a dropped element is multiplied by zero, so
    NaN and inf propagate as in torch."""
    scale = tl.load(scale_ptr)
    factor = keep.to(scale.dtype) * scale
    return x.to(scale.dtype) * factor


@triton.jit
def _dropout_forward_kernel(x_ptr, y_ptr, mask_ptr, seed_ptr, offset, threshold, scale_ptr, numel, total_bytes,
                            STORE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep, element, in_range, bit = _keep_tile(seed_ptr, offset, threshold, byte, numel)
    x = tl.load(x_ptr + element, mask=in_range, other=0.0)
    y = _scale_kept(x, keep, scale_ptr)
    tl.store(y_ptr + element, y.to(x.dtype), mask=in_range)
    if STORE_MASK:
        bits = tl.sum(tl.sum(keep.to(tl.int32) << bit, axis=2), axis=1)
        tl.store(mask_ptr + byte, bits.to(tl.uint8), mask=byte < total_bytes)


@triton.jit
def _dropout_backward_kernel(grad_ptr, mask_ptr, out_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)[None, :]
    element = byte[:, None] * 8 + bit
    in_range = element < numel
    bits = tl.load(mask_ptr + byte, mask=byte * 8 < numel, other=0).to(tl.int32)
    keep = ((bits[:, None] >> bit) & 1) != 0
    g = tl.load(grad_ptr + element, mask=in_range, other=0.0)
    out = _scale_kept(g, keep, scale_ptr)
    tl.store(out_ptr + element, out.to(g.dtype), mask=in_range)


def _scale_tensor(x: torch.Tensor, p: float) -> torch.Tensor:
    """1 / (1 - p) in the compute dtype, passed by pointer because Triton
    takes float scalars as float32."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((1,), dropout_scale(p), dtype=compute, device=x.device)


def _launch_forward(x: torch.Tensor, y: torch.Tensor, p: float, seed: torch.Tensor, offset: int, store_mask: bool):
    numel = x.numel()
    total_bytes = mask_bytes(numel)
    mask = x.new_empty((total_bytes if store_mask else 0,), dtype=torch.uint8)
    if numel > 0:
        grid = (triton.cdiv(total_bytes, BLOCK_BYTES),)
        wrap_triton(_dropout_forward_kernel)[grid](
            x, y, mask, seed.to(x.device), offset, dropout_threshold(p), _scale_tensor(x, p), numel, total_bytes,
            STORE_MASK=store_mask, BLOCK=BLOCK_BYTES,
        )
    elif store_mask:
        mask.zero_()
    return mask


def _work_tensor(x: torch.Tensor) -> torch.Tensor:
    """A dense tensor as it is (the kernels walk its elements in memory order
    from its data pointer), anything else as a contiguous copy."""
    return x if memory_order(x) is not None else x.contiguous()


@triton_op("regops::triton_dropout_forward", mutates_args=())
def dropout_forward(input: torch.Tensor, p: float, seed: torch.Tensor, offset: int,
                    store_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = _work_tensor(input)
    y = torch.empty_like(x)  # a dense tensor's strides
    mask = _launch_forward(x, y, p, seed, offset, store_mask)
    return y, mask


@triton_op("regops::triton_dropout_forward_", mutates_args={"input"})
def dropout_forward_(input: torch.Tensor, p: float, seed: torch.Tensor, offset: int, store_mask: bool) -> torch.Tensor:
    work = _work_tensor(input)
    mask = _launch_forward(work, work, p, seed, offset, store_mask)
    if work is not input:
        input.copy_(work)
    return mask


@triton_op("regops::triton_dropout_backward", mutates_args=())
def dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    g = _work_tensor(grad)  # the mask bits follow its memory order
    out = torch.empty_like(g)
    numel = g.numel()
    if numel > 0:
        grid = (triton.cdiv(triton.cdiv(numel, 8), BLOCK_BYTES),)
        wrap_triton(_dropout_backward_kernel)[grid](g, mask, out, _scale_tensor(g, p), numel, BLOCK=BLOCK_BYTES)
    return out


@triton.jit
def _philox_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = row < n
    c0 = tl.load(counter_ptr + row * 4 + 0, mask=valid, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + row * 4 + 1, mask=valid, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + row * 4 + 2, mask=valid, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + row * 4 + 3, mask=valid, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + row * 2 + 0, mask=valid, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + row * 2 + 1, mask=valid, other=0).to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + row * 4 + 0, r0.to(tl.int64), mask=valid)
    tl.store(out_ptr + row * 4 + 1, r1.to(tl.int64), mask=valid)
    tl.store(out_ptr + row * 4 + 2, r2.to(tl.int64), mask=valid)
    tl.store(out_ptr + row * 4 + 3, r3.to(tl.int64), mask=valid)


@triton_op("regops::triton_philox4x32_10", mutates_args=())
def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    counter, key = counter.contiguous(), key.contiguous()
    out = torch.empty_like(counter)
    n = counter.shape[0]
    if n > 0:
        wrap_triton(_philox_kernel)[(triton.cdiv(n, 128),)](counter, key, out, n, BLOCK=128)
    return out
