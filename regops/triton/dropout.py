"""Dropout in Triton, following the dropout random rule bit for bit.

The Philox rounds are written out on uint32 words (tl.rand's mapping from
(seed, offset) to numbers is not the regops spec and has changed between
Triton versions). A program owns BLOCK_BYTES mask bytes; each byte covers
two Philox counters of four words, so the tile is [BLOCK_BYTES, 8] elements,
eight consecutive ones per byte. Every program but the last covers only
existing elements and runs without masks, so its loads and stores are
128-bit vectors whenever the tensors are 16-byte aligned, whatever the
element count. Bytes per element: read e, write e, and 1/8 of mask
(written by the forward, read by the backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from regops import _spec
from regops._spec import dropout_scale, dropout_threshold, mask_bytes, memory_order
from regops.triton import _checks
from regops.triton._launch import launch

BLOCK_BYTES = 128  # 1024 elements a program: 4 KiB of float32 in, 4 KiB out, 128 mask bytes
PHILOX_BLOCK = 128  # counters a program of the raw Philox op computes


_M0: tl.constexpr = tl.constexpr(_spec.PHILOX_M0)
_M1: tl.constexpr = tl.constexpr(_spec.PHILOX_M1)
_W0: tl.constexpr = tl.constexpr(_spec.PHILOX_W0)
_W1: tl.constexpr = tl.constexpr(_spec.PHILOX_W1)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _keep_bits(seed_ptr, offset, threshold, byte, BLOCK: tl.constexpr):
    """Keep flags [BLOCK, 8] of the elements of mask bytes ``byte``: element
    8 * byte + 4 * half + word takes word ``word`` of Philox at counter
    offset + 2 * byte + half. The four words of each counter are joined into
    the minor dimension, so each thread owns whole bytes' worth of flags and
    no flag moves between threads."""
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    counter = offset + byte[:, None] * 2 + tl.arange(0, 2)[None, :]  # int64: [BLOCK, 2]
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, zero, zero, k0, k1)
    # join(join(r0, r2), join(r1, r3))[b, h, i, j] is word 2 * i + j.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK, 8))
    return words.to(tl.int64) >= threshold


@triton.jit
def _scale_kept(x, keep, scale_ptr):
    """x * (keep ? scale : 0) in the compute dtype of scale_ptr (float32, or
    float64 for float64 inputs); a dropped element is multiplied by zero, so
    NaN and inf propagate as in torch."""
    scale = tl.load(scale_ptr)
    factor = keep.to(scale.dtype) * scale
    return x.to(scale.dtype) * factor


@triton.jit
def _scale_block(in_ptr, out_ptr, element, valid, keep, scale_ptr):
    x = tl.load(in_ptr + element, mask=valid, other=0.0)
    tl.store(out_ptr + element, _scale_kept(x, keep, scale_ptr).to(x.dtype), mask=valid)


@triton.jit
def _elements(BLOCK: tl.constexpr):
    """This program's mask bytes [BLOCK] and their elements [BLOCK, 8]."""
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    element = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    return byte, element


# offset and threshold are values, not sizes: specializing them (1, or
# multiples of 16) would only compile more variants.
@triton.jit(do_not_specialize=["offset", "threshold"])
def _dropout_forward_kernel(x_ptr, y_ptr, mask_ptr, seed_ptr, offset, threshold, scale_ptr, numel, total_bytes,
                            STORE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    byte, element = _elements(BLOCK)
    keep = _keep_bits(seed_ptr, offset, threshold, byte, BLOCK)
    if (tl.program_id(0).to(tl.int64) + 1) * BLOCK * 8 <= numel:
        _scale_block(x_ptr, y_ptr, element, tl.full((BLOCK, 8), True, tl.int1), keep, scale_ptr)
    else:
        keep = keep & (element < numel)
        _scale_block(x_ptr, y_ptr, element, element < numel, keep, scale_ptr)
    if STORE_MASK:
        bits = tl.sum(keep.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
        tl.store(mask_ptr + byte, bits.to(tl.uint8), mask=byte < total_bytes)


@triton.jit
def _dropout_backward_kernel(grad_ptr, mask_ptr, out_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    byte, element = _elements(BLOCK)
    if (tl.program_id(0).to(tl.int64) + 1) * BLOCK * 8 <= numel:
        bits = tl.load(mask_ptr + byte).to(tl.int32)
        keep = ((bits[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        _scale_block(grad_ptr, out_ptr, element, tl.full((BLOCK, 8), True, tl.int1), keep, scale_ptr)
    else:
        bits = tl.load(mask_ptr + byte, mask=byte * 8 < numel, other=0).to(tl.int32)
        keep = ((bits[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        _scale_block(grad_ptr, out_ptr, element, element < numel, keep, scale_ptr)


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
        launch(_dropout_forward_kernel, (triton.cdiv(total_bytes, BLOCK_BYTES),), x.device,
               x, y, mask, seed.to(x.device), offset, dropout_threshold(p), _scale_tensor(x, p), numel, total_bytes,
               STORE_MASK=store_mask, BLOCK=BLOCK_BYTES)
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
    _checks.check_dropout_forward(input, p, seed)
    x = _work_tensor(input)
    y = torch.empty_like(x)  # a dense tensor's strides
    mask = _launch_forward(x, y, p, seed, offset, store_mask)
    return y, mask


@triton_op("regops::triton_dropout_forward_", mutates_args={"input"})
def dropout_forward_(input: torch.Tensor, p: float, seed: torch.Tensor, offset: int, store_mask: bool) -> torch.Tensor:
    _checks.check_dropout_forward(input, p, seed)
    work = _work_tensor(input)
    mask = _launch_forward(work, work, p, seed, offset, store_mask)
    if work is not input:
        input.copy_(work)
    return mask


@triton_op("regops::triton_dropout_backward", mutates_args=())
def dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    _checks.check_dropout_backward(grad, mask, p)
    g = _work_tensor(grad)  # the mask bits follow its memory order
    out = torch.empty_like(g)
    numel = g.numel()
    if numel > 0:
        launch(_dropout_backward_kernel, (triton.cdiv(triton.cdiv(numel, 8), BLOCK_BYTES),), g.device,
               g, mask.contiguous(), out, _scale_tensor(g, p), numel, BLOCK=BLOCK_BYTES)
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
    _checks.check_philox_args(counter, key)
    counter, key = counter.contiguous(), key.contiguous()
    out = torch.empty_like(counter)
    n = counter.shape[0]
    if n > 0:
        launch(_philox_kernel, (triton.cdiv(n, PHILOX_BLOCK),), counter.device, counter, key, out, n, BLOCK=PHILOX_BLOCK)
    return out


# --- what the offline compile gate compiles (benchmarks/static_triton.py) ---------------

def compile_cases() -> None:
    """Calls of the ops above whose launches (recorded, not run) are every
    variant the gate compiles: each dtype, with and without a stored mask,
    element counts of 1, of a multiple of 16 and of neither, and offset
    (not 16-byte aligned) views. A kernel, constexpr value or int value (1, a
    multiple of 16) that no call here reaches fails the gate."""
    seed = torch.zeros(1, dtype=torch.int64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        storage = torch.empty(1 << 14, dtype=dtype)
        dropout_forward(storage[:1001], 0.5, seed, 3, True)
        dropout_forward(storage[1:1002], 0.5, seed, 3, False)
        mask = torch.empty(mask_bytes(1001) + 1, dtype=torch.uint8)
        dropout_backward(storage[:1001], mask[:-1], 0.5)
    storage = torch.empty(1 << 14)
    dropout_forward(storage[:1], 0.5, seed, 0, True)
    dropout_forward(storage[:4096], 0.5, seed, 16, True)
    for numel in (1, 4096):
        dropout_backward(storage[:numel], torch.empty(mask_bytes(numel), dtype=torch.uint8), 0.5)
    dropout_backward(storage[1:1002], mask[1:], 0.5)  # both unaligned
    for rows in (1, 16, 5):
        words = torch.zeros(rows, 6, dtype=torch.int64)
        philox4x32_10(words[:, :4], words[:, 4:])


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _elementwise(aligned: bool) -> set[str]:
    return {"ld", "st"} if aligned else set()


# The global accesses ("ld", "st") that must be 128-bit in the compiled code
# of a kernel, given the launch's arguments by name: every full block runs
# unmasked, so only an unaligned pointer (or a single element) leaves them
# scalar.
VECTOR_ACCESS = {
    "_dropout_forward_kernel": lambda a: _elementwise(_aligned(a["x_ptr"], a["y_ptr"]) and a["numel"] > 1),
    "_dropout_backward_kernel": lambda a: _elementwise(_aligned(a["grad_ptr"], a["out_ptr"]) and a["numel"] > 1),
}
# Elements per program (the gate's instructions per element): a byte of mask
# covers eight.
ELEMENTS_PER_ITERATION = {
    "_dropout_forward_kernel": lambda a: 8 * a["BLOCK"],
    "_dropout_backward_kernel": lambda a: 8 * a["BLOCK"],
}
# Int arguments that never take the value 1 (the gate asks every other one
# to be compiled with 1 and with a multiple of 16), and why.
NEVER_ONE = {"total_bytes": "a multiple of 16 by construction (mask_bytes)"}
