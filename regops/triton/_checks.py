"""The argument checks of the Triton ops, with the words of the native ops.

Each function mirrors one check of csrc/include/regops/dropout.h,
batch_norm_host.h or optim_host.h and raises RuntimeError (what TORCH_CHECK
raises) with the same message, so a caller of ``torch.ops.regops.triton_*``
sees the same errors as a caller of the native op, and no kernel runs on
arguments it would read out of bounds.
"""

from __future__ import annotations

import math

import torch

from regops._spec import batch_norm_accumulate_dtype, mask_bytes

# c10's names of the scalar types, as TORCH_CHECK prints them.
_SCALAR_TYPE_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.float16: "Half", torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
    torch.bool: "Bool", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_LAYOUT_NAMES = {torch.strided: "Strided", torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr"}


def scalar_type(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def sizes(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(size) for size in tensor.shape) + "]"


def _double(value: float) -> str:
    """A double as C++ streams print it (six significant digits)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = f"{value:.6g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{exponent[0]}{int(exponent[1:]):02d}"
    return text


def check(condition: bool, *message) -> None:
    """TORCH_CHECK: raises RuntimeError with the concatenated message."""
    if not condition:
        raise RuntimeError("".join(_double(part) if isinstance(part, float) else str(part) for part in message))


# --- dropout (csrc/include/regops/dropout.h) -----------------------------------------

def check_dropout_p(p: float) -> None:
    check(p >= 0.0 and p <= 1.0, "regops dropout: p must be in [0, 1], got ", float(p))


def check_dropout_seed(seed: torch.Tensor) -> None:
    check(seed.numel() == 1 and seed.dtype == torch.int64, "regops dropout: seed must be a one-element int64 tensor, "
          "got ", scalar_type(seed.dtype), " with ", seed.numel(), " elements")


def check_dropout_input(input: torch.Tensor, name: str) -> None:
    check(input.is_floating_point(), "regops dropout: ", name, " must be a floating-point tensor, got ",
          scalar_type(input.dtype))


def check_dropout_forward(input: torch.Tensor, p: float, seed: torch.Tensor) -> None:
    check_dropout_input(input, "input")
    check_dropout_p(p)
    check_dropout_seed(seed)


def check_dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> None:
    check_dropout_input(grad, "grad")
    check_dropout_p(p)
    check(mask.dtype == torch.uint8, "regops dropout: mask must be a uint8 tensor, got ", scalar_type(mask.dtype))
    expected = mask_bytes(grad.numel())
    check(mask.dim() == 1 and mask.numel() == expected, "regops dropout: mask must be a flat uint8 tensor of ",
          expected, " bytes for ", grad.numel(), " elements, got shape ", sizes(mask))
    check(mask.device == grad.device, "regops dropout: mask is on ", mask.device, " but grad is on ", grad.device)


def check_philox_args(counter: torch.Tensor, key: torch.Tensor) -> None:
    check(counter.dtype == torch.int64 and key.dtype == torch.int64,
          "regops philox4x32_10: counter and key must be int64 tensors")
    check(counter.dim() == 2 and counter.shape[1] == 4, "regops philox4x32_10: counter must have shape (N, 4), got ",
          sizes(counter))
    check(key.dim() == 2 and key.shape[1] == 2 and key.shape[0] == counter.shape[0],
          "regops philox4x32_10: key must have shape (N, 2) with N = ", counter.shape[0], ", got ", sizes(key))
    check(counter.device == key.device, "regops philox4x32_10: counter and key must be on one device")


# --- batch norm (csrc/include/regops/batch_norm_host.h) ---------------------------------

_BN_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_batch_norm_input(input: torch.Tensor, op: str) -> None:
    check(input.dim() >= 2, "regops ", op, ": input must have at least 2 dimensions (N, C, ...), got shape ",
          sizes(input))
    check(input.dtype in _BN_INPUT_DTYPES, "regops ", op, ": input must be float32, float16, bfloat16 or float64, "
          "got ", scalar_type(input.dtype))


def check_channel_tensor(tensor: torch.Tensor | None, input: torch.Tensor, name: str, op: str) -> None:
    """A per-channel tensor (mean, invstd, weight, ...): C elements of the
    accumulate dtype on the input's device; None passes (an optional one)."""
    if tensor is None:
        return
    channels = input.shape[1]
    check(tensor.dim() == 1 and tensor.numel() == channels, "regops ", op, ": ", name, " must be a 1-D tensor of ",
          channels, " elements (one per channel), got shape ", sizes(tensor))
    wanted = batch_norm_accumulate_dtype(input.dtype)
    check(tensor.dtype == wanted, "regops ", op, ": ", name, " must be ", scalar_type(wanted), " for a ",
          scalar_type(input.dtype), " input, got ", scalar_type(tensor.dtype))
    check(tensor.device == input.device, "regops ", op, ": ", name, " is on ", tensor.device, " but input is on ",
          input.device)


def check_like_input(tensor: torch.Tensor, input: torch.Tensor, name: str, op: str) -> None:
    """A tensor that must have the input's shape, dtype and device."""
    check(tensor.shape == input.shape, "regops ", op, ": ", name, " must have the input's shape ", sizes(input),
          ", got ", sizes(tensor))
    check(tensor.dtype == input.dtype, "regops ", op, ": ", name, " must be ", scalar_type(input.dtype),
          " like input, got ", scalar_type(tensor.dtype))
    check(tensor.device == input.device, "regops ", op, ": ", name, " is on ", tensor.device, " but input is on ",
          input.device)


def check_grad_output(grad_out: torch.Tensor, input: torch.Tensor, op: str) -> None:
    check_like_input(grad_out, input, "grad_out", op)


def check_batch_norm_arguments(op: str, input: torch.Tensor, grad_out: torch.Tensor | None = None,
                               **channel_tensors: torch.Tensor | None) -> None:
    """The input, grad_out when given, then each per-channel tensor in the
    order given (None: an optional one left out), as the native entry points
    check them."""
    check_batch_norm_input(input, op)
    if grad_out is not None:
        check_grad_output(grad_out, input, op)
    for name, tensor in channel_tensors.items():
        check_channel_tensor(tensor, input, name, op)


def check_residual(residual: torch.Tensor | None, input: torch.Tensor, op: str) -> None:
    """The residual added before the activation: the input's shape, dtype and device."""
    if residual is not None:
        check_like_input(residual, input, "residual", op)


def check_batch_norm_count(count: int, op: str) -> None:
    check(count > 0, "regops ", op, ": count must be positive, got ", count)


def check_batch_norm_forward(input, weight, bias, running_mean, running_var, training: bool, op: str) -> None:
    check_batch_norm_arguments(op, input, weight=weight, bias=bias, running_mean=running_mean,
                               running_var=running_var)
    check(training or (running_mean is not None and running_var is not None), "regops ", op,
          ": running_mean and running_var must be given in eval mode (training=False)")
    values = input.shape[0]
    for size in input.shape[2:]:
        values *= size
    check(not training or values != 1, "regops ", op, ": expected more than 1 value per channel when training, got "
          "input size ", sizes(input))


# --- optimizers (csrc/include/regops/optim_host.h) -------------------------------------

_OPTIMIZER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: numel() elements at data_ptr() in some order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_tensor_list(op: str, name: str, tensors, params, may_be_empty: bool) -> None:
    if may_be_empty and len(tensors) == 0:
        return
    check(len(tensors) == len(params), "regops ", op, ": ", name, " must have one tensor per parameter (",
          len(params), "), got ", len(tensors))
    for i, (t, p) in enumerate(zip(tensors, params)):
        check(t.device == params[0].device, "regops ", op, ": ", name, "[", i, "] is on ", t.device,
              " but params[0] is on ", params[0].device)
        check(t.dtype == params[0].dtype, "regops ", op, ": ", name, "[", i, "] has dtype ", scalar_type(t.dtype),
              " but params[0] has ", scalar_type(params[0].dtype), " (one call per dtype)")
        check(t.is_floating_point(), "regops ", op, ": ", name, "[", i, "] must be floating point, got ",
              scalar_type(t.dtype))
        check(t.layout == torch.strided, "regops ", op, ": ", name, "[", i, "] must be a dense tensor, got layout ",
              _LAYOUT_NAMES.get(t.layout, str(t.layout)), " (sparse gradients are not supported)")
        check(t.shape == p.shape, "regops ", op, ": ", name, "[", i, "] has shape ", sizes(t), " but params[", i,
              "] has ", sizes(p))
        check(t.numel() <= 1 or (is_dense(t) and t.stride() == p.stride()), "regops ", op, ": ", name, "[", i,
              "] must be dense with the strides of params[", i, "]")


def check_params(op: str, params) -> None:
    for i, p in enumerate(params):
        check(p.layout == torch.strided, "regops ", op, ": params[", i, "] must be a dense tensor")
        check(p.numel() <= 1 or is_dense(p), "regops ", op, ": params[", i, "] must be non-overlapping and dense")
    check_tensor_list(op, "params", params, params, True)


def check_scalar_tensor(op: str, name: str, tensor: torch.Tensor | None, device: torch.device) -> None:
    if tensor is None:
        return
    check(tensor.numel() == 1, "regops ", op, ": ", name, " must have one element, got ", tensor.numel())
    check(tensor.dtype == torch.float32, "regops ", op, ": ", name, " must be float32, got ",
          scalar_type(tensor.dtype))
    check(tensor.device == device, "regops ", op, ": ", name, " is on ", tensor.device,
          " but the parameters are on ", device)


def check_amp_and_clip(op: str, grad_scale, found_inf, clip_coef, device: torch.device) -> None:
    check_scalar_tensor(op, "grad_scale", grad_scale, device)
    check_scalar_tensor(op, "found_inf", found_inf, device)
    check_scalar_tensor(op, "clip_coef", clip_coef, device)


def check_state_steps(op: str, steps, params) -> None:
    check(len(steps) == len(params), "regops ", op, ": state_steps must have one tensor per parameter (",
          len(params), "), got ", len(steps))
    for i, step in enumerate(steps):
        check(step.numel() == 1 and step.dtype == torch.float32, "regops ", op, ": state_steps[", i,
              "] must be a one-element float32 tensor, got ", scalar_type(step.dtype), " with ", step.numel(),
              " elements")
        check(step.device == params[0].device, "regops ", op, ": state_steps[", i, "] is on ", step.device,
              " but the parameters are on ", params[0].device)


def check_hyperparameters(op: str, lr: float, weight_decay: float, l2: float, l1: float) -> None:
    check(lr >= 0.0, "regops ", op, ": lr must be >= 0, got ", float(lr))
    check(weight_decay >= 0.0, "regops ", op, ": weight_decay must be >= 0, got ", float(weight_decay))
    check(l2 >= 0.0, "regops ", op, ": l2 must be >= 0, got ", float(l2))
    check(l1 >= 0.0, "regops ", op, ": l1 must be >= 0, got ", float(l1))


def check_optimizer_dtype(op: str, dtype: torch.dtype) -> None:
    check(dtype in _OPTIMIZER_DTYPES, "regops ", op, ": parameters must be float32, float16 or bfloat16, got ",
          scalar_type(dtype))


def check_sgd_arguments(params, grads, momentum_buffers, lr, momentum, weight_decay, l1, grad_scale, found_inf,
                        clip_coef) -> None:
    """check_sgd_arguments of optim_host.h, then the lr tensor, the amp and
    clip scalars and the dtype, as the CUDA entry checks them."""
    op = "sgd_step_"
    check_params(op, params)
    check_tensor_list(op, "grads", grads, params, False)
    check_tensor_list(op, "momentum_buffers", momentum_buffers, params, momentum == 0.0)
    check(momentum == 0.0 or len(momentum_buffers) > 0, "regops sgd_step_: momentum ", float(momentum),
          " needs momentum_buffers")
    _check_lr_and_the_rest(op, params, lr, weight_decay, 0.0, l1, grad_scale, found_inf, clip_coef)


def check_adamw_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                          weight_decay, l2, l1, amsgrad, grad_scale, found_inf, clip_coef) -> None:
    op = "adamw_step_"
    check_params(op, params)
    check_tensor_list(op, "grads", grads, params, False)
    check_tensor_list(op, "exp_avgs", exp_avgs, params, False)
    check_tensor_list(op, "exp_avg_sqs", exp_avg_sqs, params, False)
    check_tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, not amsgrad)
    check(not amsgrad or len(max_exp_avg_sqs) > 0, "regops adamw_step_: amsgrad needs max_exp_avg_sqs")
    check_state_steps(op, state_steps, params)
    _check_lr_and_the_rest(op, params, lr, weight_decay, l2, l1, grad_scale, found_inf, clip_coef)
    check(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, "regops adamw_step_: betas must be in [0, 1), got (",
          float(beta1), ", ", float(beta2), ")")
    check(eps >= 0.0, "regops adamw_step_: eps must be >= 0, got ", float(eps))


def _check_lr_and_the_rest(op, params, lr, weight_decay, l2, l1, grad_scale, found_inf, clip_coef) -> None:
    check_hyperparameters(op, 0.0 if isinstance(lr, torch.Tensor) else lr, weight_decay, l2, l1)
    if params:
        device = params[0].device
        if isinstance(lr, torch.Tensor):  # checked for its size and place: reading it would wait for the device
            check_scalar_tensor(op, "lr", lr, device)
        check_amp_and_clip(op, grad_scale, found_inf, clip_coef, device)
        check_optimizer_dtype(op, params[0].dtype)


def check_rounding(op, rounding, params) -> None:
    """check_rounding of optim_host.h."""
    if rounding is None:
        return
    check(rounding.dtype == torch.int64 and rounding.dim() == 1 and rounding.is_contiguous(), "regops ", op,
          ": rounding must be a contiguous 1-D int64 tensor, got ", scalar_type(rounding.dtype), " of shape ",
          sizes(rounding))
    check(rounding.numel() == len(params) + 3, "regops ", op,
          ": rounding must hold [seed, group, step] and one tensor index per parameter (", len(params) + 3,
          " elements), got ", rounding.numel())
    if not params:
        return
    check(rounding.device == params[0].device, "regops ", op, ": rounding is on ", rounding.device,
          " but the parameters are on ", params[0].device)
    for i, p in enumerate(params):
        check(p.numel() < 1 << 35, "regops ", op, ": stochastic rounding supports tensors of fewer than 2^35 "
              "elements, params[", i, "] has ", p.numel())


def check_averages(op, averages, average_weights, params) -> None:
    """check_averages of optim_host.h."""
    if not averages:
        return
    check(len(averages) == len(params), "regops ", op, ": averages must have one tensor per parameter (",
          len(params), "), got ", len(averages))
    check(average_weights is not None and average_weights.dtype == torch.float32 and average_weights.dim() == 1
          and average_weights.numel() == len(params) and average_weights.is_contiguous(), "regops ", op,
          ": average_weights must be a contiguous float32 tensor of one weight per parameter")
    for i, (a, p) in enumerate(zip(averages, params)):
        check(a.dtype in (p.dtype, torch.float32) and a.dtype == averages[0].dtype, "regops ", op, ": averages[", i,
              "] has dtype ", scalar_type(a.dtype), " but must be float32 or the parameters' dtype, one for all")
        check(a.device == p.device and average_weights.device == p.device, "regops ", op, ": averages[", i,
              "] and average_weights must be on the parameters' device ", p.device)
        check(a.shape == p.shape, "regops ", op, ": averages[", i, "] has shape ", sizes(a), " but params[", i,
              "] has ", sizes(p))
        check(a.numel() <= 1 or a.stride() == p.stride(), "regops ", op, ": averages[", i,
              "] must be dense with the strides of params[", i, "]")


def check_norm_inputs(tensors) -> None:
    check(len(tensors) > 0, "regops multi_tensor_norm: tensors must not be empty")
    for i, t in enumerate(tensors):
        check(t.device == tensors[0].device, "regops multi_tensor_norm: tensors[", i, "] is on ", t.device,
              " but tensors[0] is on ", tensors[0].device)
        check(t.dtype == tensors[0].dtype, "regops multi_tensor_norm: all tensors must have one dtype (one call per "
              "dtype), got ", scalar_type(tensors[0].dtype), " and ", scalar_type(t.dtype), " at ", i)
        check(t.layout == torch.strided, "regops multi_tensor_norm: tensors[", i, "] must be dense")
    check_optimizer_dtype("multi_tensor_norm", tensors[0].dtype)
