"""Batch normalization, optionally fused with ReLU, and the building blocks of
a synchronized batch norm.

Semantics of ``torch.nn.functional.batch_norm``: training normalizes with the
biased batch variance and updates the running statistics in place
(running = (1 - momentum) * running + momentum * batch, the unbiased variance
going into ``running_var``); eval normalizes with the running statistics. The
formulas are written once in csrc/include/regops/batch_norm.h.

Inputs are (N, C, ...) float32, float16 or bfloat16 (float64 too), contiguous
or channels_last / channels_last_3d, handled without a transposing copy; the
output keeps the input's memory format. Statistics, weight and bias are
float32 (float64 for float64 inputs); parameters and buffers of the input's
own dtype (a model moved with ``.to(torch.bfloat16)``) are accepted too.
"""

from __future__ import annotations

import numbers

import torch

from regops import reference
from regops._backend import _TRITON_IMPORTABLE, backend_for, cuda_simulated, native_namespaces, native_ops
from regops.ops._common import check_tensor

if _TRITON_IMPORTABLE:
    from regops.triton import batch_norm as _triton_batch_norm  # noqa: F401  (registers the triton ops)

_native = torch.ops.regops
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = (None, "relu")


_OPS: dict[tuple[str, str, str], torch._ops.OpOverload] = {}


def _op(backend: str, name: str, device_type: str):
    """The registered operator `name` of a compiled backend for tensors of
    `device_type` (cached: looking up torch.ops costs more than the checks of
    a small call)."""
    key = (backend, name, device_type)
    if key not in _OPS:
        _OPS[key] = (getattr(_native, f"triton_{name}") if backend == "triton"
                     else getattr(native_ops(backend, device_type), name)).default
    return _OPS[key]


def accumulate_dtype(input: torch.Tensor) -> torch.dtype:
    return reference.batch_norm_accumulate_dtype(input.dtype)


def memory_format(input: torch.Tensor) -> torch.memory_format:
    """The layout the kernels work in and return: the input's own when it is
    contiguous or channels_last(_3d), else contiguous."""
    return reference.batch_norm_memory_format(input)


def check_activation(activation) -> str | None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def _check_input(input) -> torch.Tensor:
    check_tensor(input, "input")
    if input.dim() < 2 and input.numel() > 0:
        # torch takes the channels from dim 1 and so accepts only an empty 1-D input.
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...) or be empty, got shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    return input


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_momentum(value):
    """A real number, or a one-element tensor (a module with momentum=None
    passes 1 / num_batches_tracked as a tensor, so that torch.compile traces it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"momentum must be a real number or a one-element floating-point tensor, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        return value
    return _check_real(value, "momentum")


def _channel_tensor(tensor, name: str, input: torch.Tensor, *, optional: bool = True):
    """A (C,) tensor on the input's device, in the accumulate dtype: a tensor
    of the input's own dtype is converted (differentiably), anything else is
    an error naming the argument."""
    if tensor is None:
        if optional:
            return None
        raise ValueError(f"{name} must be a tensor, got None")
    check_tensor(tensor, name)
    channels = input.shape[1]
    if tuple(tensor.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), one value per channel of input "
                         f"(input shape {tuple(input.shape)}), got {tuple(tensor.shape)}")
    if tensor.device != input.device:
        raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}")
    wanted = accumulate_dtype(input)
    if tensor.dtype == wanted:
        return tensor
    if tensor.dtype == input.dtype:
        return tensor.to(wanted)
    raise ValueError(f"{name} must be {wanted} (or {input.dtype} like input), got {tensor.dtype}")


def _check_residual(residual, input: torch.Tensor):
    """The tensor added before the activation: the input's shape, dtype and device, any strides."""
    if residual is None:
        return None
    check_tensor(residual, "residual")
    if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
        raise ValueError(f"residual must match input (shape {tuple(input.shape)}, {input.dtype}, {input.device}), "
                         f"got shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    return residual


def _check_count(input: torch.Tensor) -> None:
    """torch's rule: training needs more than one value per channel."""
    values = input.shape[0]
    for size in input.shape[2:]:
        values *= size
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm``; ``activation="relu"``
    fuses a ReLU into the forward and the backward (whose mask is recomputed,
    not stored). ``residual`` (the input's shape and dtype) is added before
    the activation, ``act(bn(input) + residual)`` in the same pass, with its
    gradient from the backward's reduction pass. In training the running
    buffers are updated in place."""
    _check_input(input)
    relu = check_activation(activation) == "relu"
    residual = _check_residual(residual, input)
    momentum = _check_momentum(momentum)
    eps = _check_real(eps, "eps")
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, got {eps}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if input.dim() < 2:
        # An empty 1-D input (N = C = 0) has nothing to normalize; torch returns a copy.
        return input.clone()
    w = _channel_tensor(weight, "weight", input)
    b = _channel_tensor(bias, "bias", input)
    rm = _channel_tensor(running_mean, "running_mean", input)
    rv = _channel_tensor(running_var, "running_var", input)
    if (running_mean is None) != (running_var is None):
        # torch's rule, in its words: otherwise training would update one buffer and not the other.
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    if training:
        _check_count(input)
    backend = backend_for(input)
    if backend == "reference":
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation=activation, residual=residual)
    forward = _op(backend, "batch_norm_forward", input.device.type)
    if not training:
        return forward(input, w, b, rm, rv, False, eps, relu, residual)[0]
    if _parameters_alias_buffers((weight, bias), (running_mean, running_var)):
        # torch updates the running buffers before it normalizes, so a weight
        # or bias that is also a running buffer takes part with its updated
        # value: statistics first, then the update, then the fused op.
        with torch.no_grad():
            batch_mean, batch_var = _run("batch_norm_stats", input, input)
        _update_running_stats(input, running_mean, running_var, batch_mean, batch_var, momentum)
        w, b = _channel_tensor(weight, "weight", input), _channel_tensor(bias, "bias", input)
        return forward(input, w, b, None, None, True, eps, relu, residual)[0]
    output, batch_mean, _, batch_var = forward(input, w, b, None, None, True, eps, relu, residual)
    _update_running_stats(input, running_mean, running_var, batch_mean, batch_var, momentum)
    return output


def _parameters_alias_buffers(parameters, buffers) -> bool:
    """Whether a weight or bias shares memory with a running buffer. Under
    torch.compile only the same tensor object counts (storages are not
    traceable)."""
    for parameter in parameters:
        for buffer in buffers:
            if parameter is None or buffer is None:
                continue
            if parameter is buffer or (not torch.compiler.is_compiling() and torch._C._is_alias_of(parameter, buffer)):
                return True
    return False


def _update_running_stats(input, running_mean, running_var, batch_mean, batch_var, momentum) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, with
    the unbiased variance; an empty batch changes nothing (as in torch).
    Written as torch writes it rather than as a lerp, whose
    running + momentum * (batch - running) turns an infinite buffer NaN."""
    count = input.numel() // max(1, input.shape[1])
    if count == 0:
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype) * momentum)
        if running_var is not None:
            unbiased = (batch_var * (count / max(1, count - 1))).to(running_var.dtype)
            running_var.mul_(1 - momentum).add_(unbiased * momentum)


# --- the building blocks of a synchronized batch norm ------------------------------

def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, ...) ``input`` (Welford,
    float32; float64 for float64 input)."""
    _check_input(input)
    return _run("batch_norm_stats", input, input)


def batch_norm_elementwise(input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                           weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                           activation: str | None = None) -> torch.Tensor:
    """act((input - mean) * invstd * weight + bias) per channel, in the input's memory format."""
    _check_input(input)
    relu = check_activation(activation) == "relu"
    return _run("batch_norm_elementwise", input, input, *_normalization_tensors(input, mean, invstd, weight, bias),
                relu)


def batch_norm_backward_reduce(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                               activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum(dy), sum(dy * (x - mean)))``; with the ReLU, dy is
    masked where the recomputed forward output is not positive."""
    _check_input(input)
    _check_grad_out(grad_out, input)
    relu = check_activation(activation) == "relu"
    return _run("batch_norm_backward_reduce", input, grad_out, input,
                *_normalization_tensors(input, mean, invstd, weight, bias), relu)


def batch_norm_backward_elementwise(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                    invstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                    sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor, count: int, *,
                                    activation: str | None = None) -> torch.Tensor:
    """grad_input of training-mode batch norm from the per-channel sums;
    ``count`` is the number of elements per channel the sums cover (over all
    ranks, after an all-reduce)."""
    _check_input(input)
    _check_grad_out(grad_out, input)
    relu = check_activation(activation) == "relu"
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    return _run("batch_norm_backward_elementwise", input, grad_out, input,
                *_normalization_tensors(input, mean, invstd, weight, bias),
                _channel_tensor(sum_dy, "sum_dy", input, optional=False),
                _channel_tensor(sum_dy_xmu, "sum_dy_xmu", input, optional=False), int(count), relu)


def _normalization_tensors(input: torch.Tensor, mean, invstd, weight, bias) -> tuple:
    """The checked per-channel (mean, invstd, weight, bias) of an elementwise pass."""
    return (_channel_tensor(mean, "mean", input, optional=False),
            _channel_tensor(invstd, "invstd", input, optional=False),
            _channel_tensor(weight, "weight", input), _channel_tensor(bias, "bias", input))


def _run(name: str, input: torch.Tensor, *args):
    """Op `name` on `args`, run by the backend chosen for `input`: the
    function of the same name in regops.reference, or the registered operator."""
    backend = backend_for(input)
    if backend == "reference":
        return getattr(reference, name)(*args)
    return _op(backend, name, input.device.type)(*args)


def _check_grad_out(grad_out, input: torch.Tensor) -> None:
    check_tensor(grad_out, "grad_out")
    if grad_out.shape != input.shape or grad_out.dtype != input.dtype or grad_out.device != input.device:
        raise ValueError(f"grad_out must match input (shape {tuple(input.shape)}, {input.dtype}, {input.device}), "
                         f"got shape {tuple(grad_out.shape)}, {grad_out.dtype}, {grad_out.device}")


# --- fake kernels and autograd -------------------------------------------------------

def _channels_like(input: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    return input.new_empty((input.shape[1] if channels is None else channels,), dtype=accumulate_dtype(input))


def _output_like(input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(input, memory_format=memory_format(input))


def _check_fake_channels(input, *tensors) -> None:
    for tensor in tensors:
        if tensor is not None:
            torch._check(tensor.shape == (input.shape[1],), lambda: "per-channel tensors must have shape (C,)")
            # These fakes are also the Meta kernels: a meta tensor mixed with
            # real ones would otherwise return uninitialized real memory.
            torch._check(tensor.device == input.device,
                         lambda: f"per-channel tensors must be on the input's device ({input.device}), got {tensor.device}")


def _check_fake_residual(input, residual) -> None:
    if residual is not None:
        torch._check(residual.shape == input.shape, lambda: "residual must have the input's shape")
        torch._check(residual.dtype == input.dtype, lambda: "residual must have the input's dtype")
        torch._check(residual.device == input.device,
                     lambda: f"residual must be on the input's device ({input.device}), got {residual.device}")


def _register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::batch_norm_forward")
    def _forward_fake(input, weight, bias, running_mean, running_var, training, eps, relu, residual=None):
        _check_fake_channels(input, weight, bias, running_mean, running_var)
        _check_fake_residual(input, residual)
        batch_var = _channels_like(input, None if training else 0)
        return _output_like(input), _channels_like(input), _channels_like(input), batch_var

    @torch.library.register_fake(f"{namespace}::batch_norm_backward")
    def _backward_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, relu, residual=None):
        _check_fake_channels(input, weight, bias, save_mean, save_invstd)
        _check_fake_residual(input, residual)
        grad_residual = _output_like(input) if residual is not None else input.new_empty((0,))
        return _output_like(input), _channels_like(input), _channels_like(input), grad_residual

    @torch.library.register_fake(f"{namespace}::batch_norm_stats")
    def _stats_fake(input):
        return _channels_like(input), _channels_like(input)

    @torch.library.register_fake(f"{namespace}::batch_norm_elementwise")
    def _elementwise_fake(input, mean, invstd, weight, bias, relu):
        _check_fake_channels(input, mean, invstd, weight, bias)
        return _output_like(input)

    @torch.library.register_fake(f"{namespace}::batch_norm_backward_reduce")
    def _backward_reduce_fake(grad_out, input, mean, invstd, weight, bias, relu):
        _check_fake_channels(input, mean, invstd, weight, bias)
        return _channels_like(input), _channels_like(input)

    @torch.library.register_fake(f"{namespace}::batch_norm_backward_elementwise")
    def _backward_elementwise_fake(grad_out, input, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, relu):
        _check_fake_channels(input, mean, invstd, weight, bias, sum_dy, sum_dy_xmu)
        return _output_like(input)


def _per_channel(tensor: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against (N, C, ...) input."""
    return tensor.reshape((1, -1) + (1,) * (input.dim() - 2))


def _reduce_dims(input: torch.Tensor) -> list[int]:
    return [0] + list(range(2, input.dim()))


def _statistics_grad(input, save_mean, save_invstd, grad_mean, grad_invstd, grad_var):
    """The part of grad_input that flows through the batch statistics the
    forward returns: mean = sum(x) / n, var = sum((x - mean)^2) / n and
    invstd = (var + eps)^-1/2, so d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n
    and d invstd / dx = -invstd^3 (x - mean) / n. Plain torch ops, so that it
    is differentiable again. An ordinary backward needs none of it; a second
    derivative does (grad-of-grad reaches save_mean and save_invstd)."""
    count = input.numel() // input.shape[1]
    constant = save_mean.new_zeros(save_mean.shape) if grad_mean is None else grad_mean / count
    xmu_coefficient = save_mean.new_zeros(save_mean.shape)
    if grad_invstd is not None:
        xmu_coefficient = xmu_coefficient - grad_invstd * save_invstd.pow(3) / count
    if grad_var is not None:
        xmu_coefficient = xmu_coefficient + grad_var * (2.0 / count)
    xmu = input.to(save_mean.dtype) - _per_channel(save_mean, input)
    return (_per_channel(constant, input) + xmu * _per_channel(xmu_coefficient, input)).to(input.dtype)


def _backward_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias, grad_grad_residual):
    """Vector-Jacobian product of batch_norm_backward (csrc/include/regops/batch_norm.h)
    in plain torch ops, so that it is compilable and differentiable again.

    With g = dy masked by the ReLU (the mask is constant almost everywhere, so
    bias gets no gradient), A = sum(g), B = sum(g * (x - mean)) per channel,
    r = invstd, w = weight and n = count, the op returns grad_bias = A,
    grad_weight = r * B and, in training,
    grad_input = w * r * (g - A / n - (x - mean) * r^2 * B / n) (eval:
    w * r * g). mean and invstd are inputs here: their gradients go to
    save_mean and save_invstd, whose own backward (_statistics_grad) carries
    them on to x, so the sum is the derivative through the batch statistics.
    u, a, b below are the incoming gradients of grad_input, grad_weight and
    grad_bias; that of grad_residual (= g) adds to d L / d g. A residual z
    only moves the mask (x * scale + shift + z <= 0) and gets no gradient."""
    grad_out, input, weight, bias, save_mean, save_invstd, residual = ctx.saved_tensors
    training, relu = ctx.training, ctx.relu
    acc = save_mean.dtype
    dims = _reduce_dims(input)
    count = input.numel() // input.shape[1]
    x = input.to(acc)
    mean, r = _per_channel(save_mean, input), _per_channel(save_invstd, input)
    w = _per_channel(weight, input) if weight is not None else None
    w_r = r if w is None else w * r
    xmu = x - mean
    g = grad_out.to(acc)
    if relu:
        with torch.no_grad():  # the forward's mask, the same expression as the kernels'
            scale = w_r.detach()
            shift = (0 if bias is None else _per_channel(bias.detach(), input)) - mean.detach() * scale
            pre_activation = x.detach() * scale + shift
            if residual is not None:
                pre_activation = pre_activation + residual.detach().to(acc)
            blocked = pre_activation <= 0
        g = torch.where(blocked, torch.zeros_like(g), g)
    sum_g, sum_g_xmu = g.sum(dims, keepdim=True), (g * xmu).sum(dims, keepdim=True)

    # d L / d g, d L / d x (mean and r held), d L / d mean, d L / d r, d L / d w
    # for L = sum(u * grad_input) + sum(a * grad_weight) + sum(b * grad_bias).
    terms = {name: [] for name in ("g", "x", "mean", "r", "w")}
    if grad_grad_input is not None:
        u = grad_grad_input.to(acc)
        sum_u_g = (u * g).sum(dims, keepdim=True)
        if training:
            sum_u, sum_u_xmu = u.sum(dims, keepdim=True), (u * xmu).sum(dims, keepdim=True)
            r2 = r * r
            terms["g"].append(w_r * (u - sum_u / count - xmu * r2 * sum_u_xmu / count))
            terms["x"].append(-w_r * r2 * (g * sum_u_xmu + sum_g_xmu * u) / count)
            terms["mean"].append(w_r * r2 * (sum_g * sum_u_xmu + sum_g_xmu * sum_u) / count)
            inner = sum_u_g - sum_g * sum_u / count - r2 * sum_g_xmu * sum_u_xmu / count
            terms["r"].append((1 if w is None else w) * (inner - 2 * r2 * sum_g_xmu * sum_u_xmu / count))
            terms["w"].append(r * inner)
        else:
            terms["g"].append(w_r * u)
            terms["r"].append((1 if w is None else w) * sum_u_g)
            terms["w"].append(r * sum_u_g)
    if grad_grad_weight is not None:
        a = _per_channel(grad_grad_weight.to(acc), input)
        terms["g"].append(a * r * xmu)
        terms["x"].append(a * r * g)
        terms["mean"].append(-a * r * sum_g)
        terms["r"].append(a * sum_g_xmu)
    if grad_grad_bias is not None:
        terms["g"].append(_per_channel(grad_grad_bias.to(acc), input).expand_as(g))
    if grad_grad_residual is not None and ctx.has_residual:
        terms["g"].append(grad_grad_residual.to(acc))

    def total(name):
        return sum(terms[name][1:], terms[name][0]) if terms[name] else None

    def channels(value):
        return None if value is None else value.reshape(-1)

    grad_g = total("g")
    if grad_g is not None and relu:
        grad_g = torch.where(blocked, torch.zeros_like(grad_g), grad_g)
    grad_x = total("x")
    needs = ctx.needs_input_grad
    return (grad_g.to(grad_out.dtype) if grad_g is not None and needs[0] else None,
            grad_x.to(input.dtype) if grad_x is not None and needs[1] else None,
            channels(total("w")) if weight is not None and needs[2] else None,
            None,  # bias only places the ReLU mask
            channels(total("mean")) if needs[4] else None,
            channels(total("r")) if needs[5] else None,
            None, None, None)


def _register_autograd(backend: str, device_type: str) -> None:
    forward = _op(backend, "batch_norm_forward", device_type)
    backward = _op(backend, "batch_norm_backward", device_type)

    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, training, _, relu = inputs[:8]
        residual = inputs[8] if len(inputs) > 8 else None
        _, save_mean, save_invstd, _ = output
        ctx.training, ctx.relu = training, relu
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.has_residual = residual is not None
        # Gradients of unused outputs stay None: the batch statistics'
        # backward then costs nothing in an ordinary training step.
        ctx.set_materialize_grads(False)
        # The ReLU mask is recomputed from x (and the residual), so only the
        # relu case keeps bias and the residual.
        ctx.save_for_backward(input, weight, bias if relu else None, save_mean, save_invstd,
                              residual if relu else None)

    def backward_fn(ctx, grad_output, grad_mean, grad_invstd, grad_var):
        input, weight, bias, save_mean, save_invstd, residual = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = grad_residual = None
        if grad_output is not None:
            grad_input, grad_weight, grad_bias, grad_residual = backward(
                grad_output, input, weight, bias, save_mean, save_invstd, ctx.training, ctx.relu, residual)
            if residual is None:
                # Without the ReLU the residual's gradient is grad_output itself.
                grad_residual = grad_output if ctx.has_residual else None
        if ctx.training and input.numel() > 0 and ctx.needs_input_grad[0] and (
                grad_mean is not None or grad_invstd is not None or grad_var is not None):
            extra = _statistics_grad(input, save_mean, save_invstd, grad_mean, grad_invstd, grad_var)
            grad_input = extra if grad_input is None else grad_input + extra
        grads = (grad_input if ctx.needs_input_grad[0] else None,
                 grad_weight if ctx.has_weight and ctx.needs_input_grad[1] else None,
                 grad_bias if ctx.has_bias and ctx.needs_input_grad[2] else None,
                 None, None, None, None, None)
        return grads + (grad_residual if ctx.has_residual and ctx.needs_input_grad[8] else None,)

    def setup_backward(ctx, inputs, output):
        grad_out, input, weight, bias, save_mean, save_invstd, training, relu = inputs[:8]
        residual = inputs[8] if len(inputs) > 8 else None
        ctx.training, ctx.relu, ctx.has_residual = training, relu, residual is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_out, input, weight, bias if relu else None, save_mean, save_invstd,
                              residual if relu else None)

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    torch.library.register_autograd(backward, _backward_backward, setup_context=setup_backward)


for _namespace in native_namespaces():
    _register_fakes(_namespace)
_register_autograd("cpu", "cpu")  # regops::*, which also holds the CUDA kernels
if cuda_simulated():
    _register_autograd("cuda", "cpu")
if _TRITON_IMPORTABLE:
    _register_autograd("triton", "cuda")
