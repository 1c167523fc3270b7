"""Dropout that returns its mask: one bit per element, or none at all when
the backward regenerates it from (seed, offset).

Semantics of ``torch.nn.functional.dropout``: y = x * keep / (1 - p). Which
elements are kept follows the regops random rule (csrc/include/regops/philox.h,
README.md), identical on every backend. A dense input (contiguous,
channels_last, any permutation of dims) is processed in memory order without
a copy and its output has the same layout; the rule numbers its elements in
that order. Any other input is copied to contiguous first.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from regops import reference
from regops._backend import _TRITON_IMPORTABLE, backend_for, cuda_simulated, native_namespaces, native_ops
from regops.ops._common import check_probability, check_tensor

_OFFSET_LIMIT = 1 << 62  # keeps offset + i // 4 inside int64 in every backend
_UINT64 = 1 << 64

if _TRITON_IMPORTABLE:
    from regops.triton import dropout as _triton_dropout  # noqa: F401  (registers the triton ops)

_native = torch.ops.regops


def _ops(backend: str, device_type: str):
    """(forward, in-place forward, backward) operators of a compiled backend
    for tensors of ``device_type``."""
    if backend == "triton":
        return (_native.triton_dropout_forward.default, _native.triton_dropout_forward_.default,
                _native.triton_dropout_backward.default)
    ops = native_ops(backend, device_type)
    return ops.dropout_forward.default, ops.dropout_forward_.default, ops.dropout_backward.default


def _check_seed_offset(seed, offset) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -(1 << 63) <= seed < _UINT64):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or not 0 <= offset < _OFFSET_LIMIT:
        raise ValueError(f"offset must be an integer in [0, 2**62), got {offset!r}")


def _check_same_device(tensor: torch.Tensor, name: str, other: torch.Tensor, other_name: str) -> None:
    # Not only a nicer message: a meta tensor next to CPU tensors would
    # dispatch to the fake kernel, which returns uninitialized memory.
    if tensor.device != other.device:
        raise ValueError(f"{name} must be on {other_name}'s device ({other.device}), got {tensor.device}")


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a one-element int64 tensor on ``device``. A None seed is
    drawn from torch's default generator for that device, on the device, so a
    CUDA call needs no host synchronization and torch.manual_seed reproduces it."""
    if seed is None:
        return torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)
    signed = int(seed) - _UINT64 if seed >= (1 << 63) else int(seed)
    return torch.full((1,), signed, dtype=torch.int64, device=device)


def _reference_seed(seed) -> int:
    if seed is None:
        return int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64).item()) % _UINT64
    return int(seed) % _UINT64


def dropout_with_mask(input: torch.Tensor, p: float, *, seed: int | None = None,
                      offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout that also returns its packed keep-mask.

    Returns ``(output, mask)``; ``mask`` is a flat uint8 tensor where element i
    (in the memory order of a dense ``input``, else row-major) is bit i % 8,
    least significant first, of byte i // 8, padded with zero bits to a
    multiple of 16 bytes; ``unpack_mask(mask, like=input)`` reads it back.
    The output is differentiable (its backward uses the mask).
    """
    check_tensor(input, "input")
    p = check_probability(p, "p")
    _check_seed_offset(seed, offset)
    backend = backend_for(input)
    if backend == "reference":
        return reference.dropout_with_mask(input, p, _reference_seed(seed), offset)
    forward, _, _ = _ops(backend, input.device.type)
    return forward(input, p, _seed_tensor(seed, input.device), offset, True)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: int | None = None, offset: int = 0, recompute_mask: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout`` that saves a 1-bit mask for
    the backward, or (``recompute_mask=True``) no mask at all: the backward
    then regenerates it from (seed, offset)."""
    check_tensor(input, "input")
    p = check_probability(p, "p")
    _check_seed_offset(seed, offset)
    if not training:
        return input
    backend = backend_for(input)
    if backend == "reference":
        output, _ = reference.dropout_with_mask(input, p, _reference_seed(seed), offset)
        return input.copy_(output) if inplace else output
    forward, forward_, _ = _ops(backend, input.device.type)
    seed_tensor = _seed_tensor(seed, input.device)
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if inplace and not needs_grad:
        forward_(input, p, seed_tensor, offset, False)
        return input
    output, _ = forward(input, p, seed_tensor, offset, not recompute_mask)
    return input.copy_(output) if inplace else output


def dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float, *,
                     like: torch.Tensor | None = None) -> torch.Tensor:
    """grad * keep / (1 - p), with keep read from a packed mask whose bits
    follow the memory order of ``like`` (the input of the dropout that made
    the mask; by default ``grad`` itself): a gradient in another layout is
    first copied into that one."""
    check_tensor(grad, "grad")
    check_tensor(mask, "mask", floating=False)
    p = check_probability(p, "p")
    if like is not None:
        check_tensor(like, "like", floating=False)
        if like.shape != grad.shape:
            raise ValueError(f"like must have grad's shape {tuple(grad.shape)}, got {tuple(like.shape)}")
        grad = _in_layout(grad, _kernel_stride(like))
    expected = reference.mask_bytes(grad.numel())
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != expected:
        raise ValueError(f"mask must be a flat uint8 tensor of {expected} bytes for a grad of {grad.numel()} "
                         f"elements, got dtype {mask.dtype} and shape {tuple(mask.shape)}")
    _check_same_device(mask, "mask", grad, "grad")
    backend = backend_for(grad)
    if backend == "reference":
        return reference.dropout_backward(grad, mask, p)
    return _ops(backend, grad.device.type)[2](grad, mask, p)


def unpack_mask(mask: torch.Tensor, shape: Sequence[int] | None = None, *,
                like: torch.Tensor | None = None) -> torch.Tensor:
    """The bool keep-mask stored in a packed dropout mask: for the tensor
    ``like`` that was dropped out (its shape, and its memory order when it is
    dense), or for a row-major tensor of ``shape``."""
    check_tensor(mask, "mask", floating=False)
    if like is not None:
        check_tensor(like, "like", floating=False)
        if shape is not None and torch.Size(shape) != like.shape:
            raise ValueError(f"shape {tuple(shape)} contradicts like's shape {tuple(like.shape)}; give one of them")
        shape = like.shape
    if shape is None:
        raise ValueError("unpack_mask needs the shape of the dropped-out tensor, or the tensor itself as like=")
    shape = torch.Size(shape)
    expected = reference.mask_bytes(shape.numel())
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != expected:
        raise ValueError(f"mask must be a flat uint8 tensor of {expected} bytes for shape {tuple(shape)}, "
                         f"got dtype {mask.dtype} and shape {tuple(mask.shape)}")
    return reference.unpack_mask(mask, shape if like is None else like)


def _kernel_stride(like: torch.Tensor) -> tuple[int, ...]:
    """The strides of the layout the kernels run ``like`` in: its own when
    dense, else contiguous."""
    if reference.memory_order(like) is not None:
        return like.stride()
    stride, step = [], 1
    for size in reversed(like.shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _in_layout(tensor: torch.Tensor, stride) -> torch.Tensor:
    """``tensor`` with ``stride`` (a dense layout of its shape): as it is when
    already so (the strides of size-1 dims do not matter), else copied once."""
    if all(a == b for a, b, size in zip(tensor.stride(), stride, tensor.shape) if size > 1):
        return tensor
    return torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10 on the current backend: ``counter`` (N, 4) and ``key``
    (N, 2) are int64 tensors of uint32 words; returns the (N, 4) output words.
    Exposed so that every backend can be checked against Random123's
    known-answer vectors."""
    check_tensor(counter, "counter", floating=False)
    check_tensor(key, "key", floating=False)
    if counter.dtype != torch.int64 or counter.dim() != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must be an int64 tensor of shape (N, 4), got {counter.dtype} {tuple(counter.shape)}")
    if key.dtype != torch.int64 or key.shape != (counter.shape[0], 2):
        raise ValueError(f"key must be an int64 tensor of shape ({counter.shape[0]}, 2), got {key.dtype} {tuple(key.shape)}")
    _check_same_device(key, "key", counter, "counter")
    backend = backend_for(counter)
    if backend == "reference":
        return torch.stack(reference.philox4x32_10(list(counter.unbind(1)), (key[:, 0], key[:, 1])), dim=1)
    if backend == "triton":
        return _native.triton_philox4x32_10(counter, key)
    return native_ops(backend, counter.device.type).philox4x32_10(counter, key)


# --- fake kernels and autograd -------------------------------------------------

# These also serve as the Meta kernels, which the dispatcher picks whenever any
# argument is a meta tensor: the device checks below turn a meta tensor mixed
# with real ones into an error instead of an uninitialized real output.
def _check_seed_device(seed, input):
    torch._check(seed.device == input.device or seed.device.type == "cpu",
                 lambda: f"seed must be on the input's device ({input.device}) or the CPU, got {seed.device}")


def _philox_fake(counter, key):
    torch._check(key.device == counter.device, lambda: "counter and key must be on one device")
    return torch.empty_like(counter)


def _output_like(input):
    """The kernels' output layout: a dense input's own, else contiguous."""
    if reference.memory_order(input) is not None:
        return torch.empty_like(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _dropout_forward_fake(input, p, seed, offset, store_mask):
    torch._check(seed.numel() == 1, lambda: "seed must be a one-element int64 tensor")
    _check_seed_device(seed, input)
    output = _output_like(input)
    mask = input.new_empty((reference.mask_bytes(input.numel()) if store_mask else 0,), dtype=torch.uint8)
    return output, mask


def _dropout_forward_inplace_fake(input, p, seed, offset, store_mask):
    _check_seed_device(seed, input)
    return input.new_empty((reference.mask_bytes(input.numel()) if store_mask else 0,), dtype=torch.uint8)


def _dropout_backward_fake(grad, mask, p):
    torch._check(mask.dtype == torch.uint8, lambda: "mask must be uint8")
    torch._check(mask.device == grad.device, lambda: f"mask is on {mask.device} but grad is on {grad.device}")
    return _output_like(grad)


for _namespace in native_namespaces():
    torch.library.register_fake(f"{_namespace}::philox4x32_10", _philox_fake)
    torch.library.register_fake(f"{_namespace}::dropout_forward", _dropout_forward_fake)
    torch.library.register_fake(f"{_namespace}::dropout_forward_", _dropout_forward_inplace_fake)
    torch.library.register_fake(f"{_namespace}::dropout_backward", _dropout_backward_fake)


def _register_autograd(backend: str, device_type: str) -> None:
    forward, _, backward = _ops(backend, device_type)

    def setup_forward(ctx, inputs, output):
        _, p, seed, offset, store_mask = inputs
        ctx.p, ctx.offset, ctx.store_mask = p, offset, store_mask
        # The output's layout is the memory order the bits were drawn in.
        ctx.stride = output[0].stride()
        # Either the 1-bit mask or, with recompute, only the 8-byte seed.
        ctx.save_for_backward(output[1] if store_mask else seed)

    def backward_forward(ctx, grad_output, _grad_mask):
        (saved,) = ctx.saved_tensors
        grad_output = _in_layout(grad_output, ctx.stride)
        if ctx.store_mask:
            grad_input = backward(grad_output, saved, ctx.p)
        else:
            grad_input, _ = forward(grad_output, ctx.p, saved, ctx.offset, False)
        return grad_input, None, None, None, None

    def setup_backward(ctx, inputs, output):
        ctx.p = inputs[2]
        ctx.stride = output.stride()
        ctx.save_for_backward(inputs[1])

    def backward_backward(ctx, grad_grad_input):
        (mask,) = ctx.saved_tensors
        return backward(_in_layout(grad_grad_input, ctx.stride), mask, ctx.p), None, None

    torch.library.register_autograd(forward, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(backward, backward_backward, setup_context=setup_backward)


_register_autograd("cpu", "cpu")  # regops::*, which also holds the CUDA kernels
if cuda_simulated():
    _register_autograd("cuda", "cpu")
if _TRITON_IMPORTABLE:
    _register_autograd("triton", "cuda")
