"""The fused optimizer updates as functions: backend choice and fake kernels
for ``regops::sgd_step_``, ``regops::adamw_step_`` and
``regops::multi_tensor_norm``. The optimizers (regops/optim/) call these once
per (device, dtype) group; the argument checks users see live there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from regops import reference
from regops._backend import _TRITON_IMPORTABLE, backend_for, native_namespaces, resolve_op

if _TRITON_IMPORTABLE:
    from regops.triton import optim as _triton_optim  # noqa: F401  (registers the triton ops)

def _lr_overload(lr) -> str:
    """The overload of the step ops for this lr: a tensor lr has its own."""
    return "tensor_lr" if isinstance(lr, torch.Tensor) else "default"


def _grad_factor(grad_scale, clip_coef):
    factor = None
    if grad_scale is not None:
        factor = grad_scale.reciprocal()
    if clip_coef is not None:
        factor = clip_coef if factor is None else factor * clip_coef
    return factor


def _average_arguments(backend, averages, average_weights) -> tuple:
    """The ops' trailing averaging arguments: the Triton op takes a list
    (empty without averaging), the native ops None."""
    if backend == "triton":
        return list(averages), average_weights
    if not averages:
        return None, None
    return list(averages), average_weights


def _for_dtype(backend: str, dtype: torch.dtype) -> str:
    """The CUDA and Triton kernels compute in float32: float64 tensors take
    the reference implementation there (torch ops in float64 on the tensors'
    device, one tensor at a time, and a host read of found_inf); the C++ CPU
    kernels compute float64 in float64."""
    if dtype == torch.float64 and backend in ("cuda", "triton"):
        return "reference"
    return backend


def _step_backend(params, found_inf) -> str | None:
    """The backend that runs a step on ``params``, or None when the step has
    nothing to do: no parameters, or the reference backend and a nonzero
    ``found_inf`` (the other backends skip on the device)."""
    if not params:
        return None
    backend = _for_dtype(backend_for(params[0]), params[0].dtype)
    # The reference backend is the readable oracle: it may synchronize.
    if backend == "reference" and found_inf is not None and bool(found_inf.item() != 0):
        return None
    return backend


def sgd_step_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
              l1, proximal, first_step, grad_scale=None, found_inf=None, clip_coef=None, rounding=None, averages=(),
              average_weights=None) -> None:
    """Penalized SGD on tensors of one device and dtype, in place (see
    regops.optim.SGD for the rule). ``lr`` is a float or a one-element tensor;
    ``rounding`` (int64 [seed, group, step, tensor indices] on the device)
    rounds 16-bit values stochastically; ``averages`` (float32 or the
    parameters' dtype) become lerp(average, new parameter, weight) with the
    float32 ``average_weights`` (one per tensor, on the device)."""
    backend = _step_backend(params, found_inf)
    if backend is None:
        return
    if backend == "reference":
        buffers = reference.sgd_step(params, grads, None if first_step else momentum_buffers, lr=lr,
                                     momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                     nesterov=nesterov, maximize=maximize, l1=l1,
                                     l1_mode="proximal" if proximal else "subgradient",
                                     grad_factor=_grad_factor(grad_scale, clip_coef), rounding=rounding,
                                     averages=averages, average_weights=average_weights)
        if momentum != 0:
            for target, value in zip(momentum_buffers, buffers):
                target.copy_(value)
        return
    op = resolve_op(backend, "sgd_step_", params[0].device.type, _lr_overload(lr))
    op(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
       first_step, grad_scale, found_inf, clip_coef, rounding, *_average_arguments(backend, averages, average_weights))


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                weight_decay, l2, l1, proximal, amsgrad, maximize, grad_scale=None, found_inf=None,
                clip_coef=None, rounding=None, averages=(), average_weights=None) -> None:
    """Penalized AdamW on tensors of one device and dtype, in place (see
    regops.optim.AdamW for the rule); increments ``state_steps``. ``rounding``,
    ``averages`` and ``average_weights`` as for sgd_step_."""
    backend = _step_backend(params, found_inf)
    if backend is None:
        return
    if backend == "reference":
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr,
                             betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                             maximize=maximize, l2=l2, l1=l1, l1_mode="proximal" if proximal else "subgradient",
                             grad_factor=_grad_factor(grad_scale, clip_coef), rounding=rounding,
                             averages=averages, average_weights=average_weights)
        return
    op = resolve_op(backend, "adamw_step_", params[0].device.type, _lr_overload(lr))
    op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, l2,
       l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef, rounding,
       *_average_arguments(backend, averages, average_weights))


def multi_tensor_norm(tensors: Sequence[torch.Tensor], squared: bool = False) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together (one device and dtype), or its
    square, as a float32 scalar on their device, in one pass without a host
    synchronization."""
    if not tensors:
        raise ValueError("tensors must not be empty")
    backend = _for_dtype(backend_for(tensors[0]), tensors[0].dtype)
    if backend == "reference":
        return reference.multi_tensor_norm(tensors, squared)
    return resolve_op(backend, "multi_tensor_norm", tensors[0].device.type)(tensors, squared)


# --- fake kernels ------------------------------------------------------------------
# The steps only mutate their inputs; the norm is a fresh float32 scalar.

def _no_output(*args, **kwargs):
    return None


def _multi_tensor_norm_fake(tensors, squared=False):
    torch._check(len(tensors) > 0, lambda: "multi_tensor_norm needs at least one tensor")
    return tensors[0].new_empty((), dtype=torch.float32)


for _namespace in native_namespaces():
    for _name in ("sgd_step_", "sgd_step_.tensor_lr", "adamw_step_", "adamw_step_.tensor_lr"):
        torch.library.register_fake(f"{_namespace}::{_name}", _no_output)
    torch.library.register_fake(f"{_namespace}::multi_tensor_norm", _multi_tensor_norm_fake)
