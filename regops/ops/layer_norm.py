"""Layer normalization and RMSNorm, optionally fused with dropout and a
residual add: ``h = dropout(x, p) + residual``, ``out = norm(h) * weight + bias``.

Semantics of ``torch.nn.functional.layer_norm`` / ``rms_norm`` over the
trailing ``normalized_shape`` (the fused ops: the last dimension); the
formulas are written once in csrc/include/regops/layer_norm.h. Statistics are
float32 (float64 for float64 inputs). Dropout follows the regops random rule
over x's row-major flat index, so its mask is
``regops.dropout_with_mask(x.contiguous(), p, seed=seed, offset=offset)``'s;
the backward reads a 1-bit saved mask or, with ``recompute_mask=True``,
regenerates it from (seed, offset). The forward saves h (or x when nothing
is added or dropped) and 8 bytes of statistics per row.
"""

from __future__ import annotations

import numbers

import torch

from regops import reference
from regops._backend import _TRITON_IMPORTABLE, backend_for, cuda_simulated, native_namespaces, native_ops
from regops.ops._common import check_probability, check_tensor
from regops.ops.dropout import _check_same_device, _check_seed_offset, _reference_seed, _seed_tensor


if _TRITON_IMPORTABLE:
    from regops.triton import layer_norm as _triton_layer_norm  # noqa: F401  (registers the triton ops)

_native = torch.ops.regops
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OPS: dict[tuple[str, str, str], torch._ops.OpOverload] = {}


def _op(backend: str, name: str, device_type: str):
    key = (backend, name, device_type)
    if key not in _OPS:
        _OPS[key] = (getattr(_native, f"triton_{name}") if backend == "triton"
                     else getattr(native_ops(backend, device_type), name)).default
    return _OPS[key]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.batch_norm_accumulate_dtype(dtype)


def _check_input(input) -> torch.Tensor:
    check_tensor(input, "input")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    return input


def _normalized_size(input: torch.Tensor, normalized_shape) -> int:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        shape = tuple(int(size) for size in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must be the trailing sizes of input (shape {tuple(input.shape)})")
    hidden = 1
    for size in shape:
        hidden *= size
    if hidden == 0:
        raise ValueError(f"normalized_shape must have a positive number of elements, got {shape}")
    return hidden


def _row_tensor(tensor, name: str, input: torch.Tensor, hidden: int):
    """weight or bias as a (hidden,) tensor in the accumulate dtype (a tensor
    of the input's dtype is converted differentiably)."""
    if tensor is None:
        return None
    check_tensor(tensor, name)
    if tensor.numel() != hidden:
        raise ValueError(f"{name} must have {hidden} elements (normalized_shape), got shape {tuple(tensor.shape)}")
    _check_same_device(tensor, name, input, "input")
    wanted = accumulate_dtype(input.dtype)
    if tensor.dtype != wanted and tensor.dtype != input.dtype:
        raise ValueError(f"{name} must be {wanted} or {input.dtype} like input, got {tensor.dtype}")
    return tensor.reshape(hidden).to(wanted)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative real number, got {eps!r}")
    return float(eps)


def _norm(input, residual, hidden, weight, bias, p, eps, *, rms, prenorm=False, residual_in_fp32=False,
          return_dropout_mask=False, recompute_mask=False, seed=None, offset=0, dropout=False):
    """The fused op on ``input`` seen as (rows, hidden): returns out, then h
    (prenorm), then the mask (return_dropout_mask)."""
    rows_shape = input.shape
    x = input.reshape(-1, hidden)
    res = None
    if residual is not None:
        check_tensor(residual, "residual")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        _check_same_device(residual, "residual", input, "input")
        if residual.dtype not in (input.dtype, accumulate_dtype(input.dtype)):
            raise ValueError(f"residual must be {input.dtype} or {accumulate_dtype(input.dtype)}, got {residual.dtype}")
        res = residual.reshape(-1, hidden)
    w = _row_tensor(weight, "weight", input, hidden)
    b = _row_tensor(bias, "bias", input, hidden)
    use_seed = dropout and (p > 0 or return_dropout_mask)
    backend = backend_for(input)
    if backend == "reference":
        out, h, mask = reference.dropout_add_norm(x, res, w, b, p, _reference_seed(seed) if use_seed else None,
                                                  offset, eps, rms, residual_in_fp32)
    else:
        store_mask = use_seed and (return_dropout_mask or not recompute_mask)
        store_h = prenorm or res is not None or use_seed
        forward = _op(backend, "layer_norm_forward", input.device.type)
        out, h, _, _, mask = forward(x, res, w, b, p, _seed_tensor(seed, input.device) if use_seed else None, offset,
                                     eps, rms, store_mask, store_h, residual_in_fp32)
        if not store_h:
            h = x
    results = [out.reshape(rows_shape)]
    if prenorm:
        results.append(h.reshape(rows_shape))
    if return_dropout_mask:
        results.append(mask)
    return results[0] if len(results) == 1 else tuple(results)


def layer_norm(input: torch.Tensor, normalized_shape: int | list[int] | torch.Size, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``."""
    _check_input(input)
    hidden = _normalized_size(input, normalized_shape)
    return _norm(input, None, hidden, weight, bias, 0.0, _check_eps(eps), rms=False)


def rms_norm(input: torch.Tensor, normalized_shape: int | list[int] | torch.Size, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm`` (eps=None: the input dtype's epsilon)."""
    _check_input(input)
    hidden = _normalized_size(input, normalized_shape)
    eps = torch.finfo(input.dtype).eps if eps is None else _check_eps(eps)
    return _norm(input, None, hidden, weight, None, 0.0, eps, rms=True)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def _dropout_add_norm(input, residual, weight, bias, p, eps, rms, prenorm, residual_in_fp32, return_dropout_mask,
                      recompute_mask, seed, offset):
    _check_input(input)
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the hidden size is the last)")
    p = check_probability(p, "p")
    _check_seed_offset(seed, offset)
    _check_flags(prenorm=prenorm, residual_in_fp32=residual_in_fp32, return_dropout_mask=return_dropout_mask,
                 recompute_mask=recompute_mask)
    hidden = input.shape[-1]
    if hidden == 0:
        raise ValueError(f"input must have a positive hidden size (last dimension), got shape {tuple(input.shape)}")
    return _norm(input, residual, hidden, weight, bias, p, eps, rms=rms, prenorm=prenorm,
                 residual_in_fp32=residual_in_fp32, return_dropout_mask=return_dropout_mask,
                 recompute_mask=recompute_mask, seed=seed, offset=offset, dropout=True)


def dropout_add_layer_norm(input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, p: float, eps: float = 1e-5, *, prenorm: bool = False,
                           residual_in_fp32: bool = False, return_dropout_mask: bool = False,
                           recompute_mask: bool = False, seed: int | None = None,
                           offset: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``layer_norm(dropout(input, p) + residual)`` over the last dimension in
    one pass. Returns ``out``; with ``prenorm=True`` ``(out, h)`` (h the
    residual stream, float32 with ``residual_in_fp32`` for 16-bit inputs);
    ``return_dropout_mask=True`` appends the packed 1-bit mask."""
    return _dropout_add_norm(input, residual, weight, bias, p, _check_eps(eps), False, prenorm, residual_in_fp32,
                             return_dropout_mask, recompute_mask, seed, offset)


def dropout_add_rms_norm(input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, p: float,
                         eps: float | None = None, *, prenorm: bool = False, residual_in_fp32: bool = False,
                         return_dropout_mask: bool = False, recompute_mask: bool = False, seed: int | None = None,
                         offset: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``rms_norm(dropout(input, p) + residual)``, as ``dropout_add_layer_norm``."""
    _check_input(input)
    eps = torch.finfo(input.dtype).eps if eps is None else _check_eps(eps)
    return _dropout_add_norm(input, residual, weight, None, p, eps, True, prenorm, residual_in_fp32,
                             return_dropout_mask, recompute_mask, seed, offset)


# --- fake kernels and autograd -------------------------------------------------------

def _check_fake_device(input, *tensors) -> None:
    # These fakes are also the Meta kernels: a meta tensor mixed with real
    # ones would otherwise return uninitialized real memory.
    for tensor in tensors:
        if tensor is not None:
            torch._check(tensor.device == input.device,
                         lambda: f"tensors must be on the input's device ({input.device}), got {tensor.device}")


def _forward_fake(input, residual, weight, bias, p, seed, offset, eps, rms, store_mask, store_h, residual_in_fp32):
    torch._check(input.dim() == 2, lambda: "input must be (rows, hidden)")
    _check_fake_device(input, residual, weight, bias)
    if seed is not None:
        torch._check(seed.device == input.device or seed.device.type == "cpu",
                     lambda: f"seed must be on the input's device ({input.device}) or the CPU, got {seed.device}")
    rows = input.shape[0]
    acc = accumulate_dtype(input.dtype)
    h_dtype = reference.layer_norm_h_dtype(input.dtype, None if residual is None else residual.dtype,
                                           residual_in_fp32)
    output = input.new_empty(input.shape)
    h = input.new_empty(input.shape if store_h else (0,), dtype=h_dtype)
    mean = input.new_empty((0 if rms else rows,), dtype=acc)
    rstd = input.new_empty((rows,), dtype=acc)
    mask = input.new_empty((reference.mask_bytes(input.numel()) if store_mask else 0,), dtype=torch.uint8)
    return output, h, mean, rstd, mask


def _backward_fake(grad_out, grad_h, h, weight, mean, rstd, mask, seed, p, offset, rms, has_residual, has_bias):
    _check_fake_device(grad_out, grad_h, h, weight, mean, rstd, mask)
    acc = accumulate_dtype(grad_out.dtype)
    hidden = grad_out.shape[1]
    return (grad_out.new_empty(grad_out.shape), h.new_empty(grad_out.shape if has_residual else (0,)),
            grad_out.new_empty((hidden if weight is not None else 0,), dtype=acc),
            grad_out.new_empty((hidden if has_bias else 0,), dtype=acc))


for _namespace in native_namespaces():
    torch.library.register_fake(f"{_namespace}::layer_norm_forward", _forward_fake)
    torch.library.register_fake(f"{_namespace}::layer_norm_backward", _backward_fake)


def register_autograd(forward, backward) -> None:
    """Autograd of a backend's layer_norm_forward through its layer_norm_backward."""

    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, p, seed, offset, eps, rms, store_mask, store_h, residual_in_fp32 = inputs
        _, h, mean, rstd, mask = output
        ctx.p, ctx.offset, ctx.rms, ctx.input_dtype, ctx.store_h = p, offset, rms, input.dtype, store_h
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h if store_h else input, weight, mean, rstd, mask if store_mask else None,
                              seed if seed is not None and not store_mask else None)

    def backward_fn(ctx, grad_out, grad_h, _grad_mean, _grad_rstd, _grad_mask):
        h, weight, mean, rstd, mask, seed = ctx.saved_tensors
        nones = (None,) * 8
        if not ctx.store_h:
            grad_h = None  # the h output is empty
        if grad_out is None and grad_h is None:
            return (None, None, None, None) + nones
        if grad_out is None:
            grad_out = h.new_zeros(h.shape, dtype=ctx.input_dtype)
        if grad_h is not None and grad_h.dtype != h.dtype:
            grad_h = grad_h.to(h.dtype)
        grad_input, grad_residual, grad_weight, grad_bias = backward(
            grad_out, grad_h, h, weight, mean, rstd, mask, seed, ctx.p, ctx.offset, ctx.rms,
            ctx.residual_dtype is not None, ctx.has_bias)
        needs = ctx.needs_input_grad
        if ctx.residual_dtype is not None and needs[1]:
            grad_residual = grad_residual.to(ctx.residual_dtype)
        else:
            grad_residual = None
        return (grad_input if needs[0] else None, grad_residual,
                grad_weight if ctx.has_weight and needs[2] else None,
                grad_bias if ctx.has_bias and needs[3] else None) + nones

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


register_autograd(_op("cpu", "layer_norm_forward", "cpu"), _op("cpu", "layer_norm_backward", "cpu"))
if cuda_simulated():
    register_autograd(_op("cuda", "layer_norm_forward", "cpu"), _op("cuda", "layer_norm_backward", "cpu"))
if _TRITON_IMPORTABLE:
    register_autograd(_op("triton", "layer_norm_forward", "cuda"), _op("triton", "layer_norm_backward", "cuda"))
