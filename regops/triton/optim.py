"""Penalized SGD and AdamW in Triton: one kernel launch per (device, dtype)
group, following the element rules of csrc/include/regops/optim.h.

The tensors of a group reach the kernel as pointer tables (an int64 tensor
of data_ptr()s per list) plus a chunk table (tensor index and first element
of every CHUNK-element program). These ops are plain torch.library.custom_op
rather than triton_op: a pointer table hides the tensors from triton_op's
tracing of the kernel arguments, so torch.compile could not see what the
kernel mutates; custom_op declares the mutated lists explicitly and is
opaque to the compiler, which is what a list-of-tensors update needs.

Per-tensor factors that depend on device-resident values (the step counts,
a tensor lr, GradScaler's scale, the clip coefficient) are computed with a
few torch ops on the device before the launch, in float64 where torch
computes them on the host, so nothing waits for the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # elements a program updates
BLOCK = 1024  # elements a program holds at once: four 4 KiB float32 tiles for AdamW

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _soft_threshold(p, threshold):
    shrunk = tl.maximum(tl.abs(p) - threshold, 0.0)
    return tl.where(p < 0, -shrunk, shrunk)


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _transformed_gradient(g, p, grad_factor, coupled_l2, l1_subgradient, MAXIMIZE: tl.constexpr):
    g = g * grad_factor
    if MAXIMIZE:
        g = -g
    # A zero coefficient skips its term (torch skips weight_decay == 0), so an
    # inf parameter does not turn into NaN through 0 * inf.
    g = tl.where(coupled_l2 != 0, g + coupled_l2 * p, g)
    return tl.where(l1_subgradient != 0, g + l1_subgradient * _sign(p), g)


@triton.jit
def _pointer(table, num_tensors, t, list_index, DTYPE: tl.constexpr):
    """Pointer to tensor ``t`` of list ``list_index`` in the pointer table."""
    return tl.load(table + list_index * num_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _chunk(numels, chunk_tensor, chunk_start, CHUNK: tl.constexpr):
    """This program's tensor index and the elements [start, end) of it that
    the program covers."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    return t, start, tl.minimum(tl.load(numels + t), start + CHUNK)


@triton.jit
def _step_chunk(table, numels, chunk_tensor, chunk_start, num_tensors, scalars,
                DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    """What both step kernels start from. ``scalars`` is laid out by
    _step_scalars: the kernel's own factor (read by the kernel), grad_factor,
    skip, l1_threshold. Lists 0 and 1 of the table are the parameters and the
    gradients. Returns this program's tensor, its elements [start, end), empty
    when skip is set (found_inf: nothing is written), the parameter and
    gradient pointers, grad_factor and l1_threshold."""
    grad_factor = tl.load(scalars + 1)
    run = (tl.load(scalars + 2) == 0).to(tl.int64)
    l1_threshold = tl.load(scalars + 3)
    t, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    p_ptr = _pointer(table, num_tensors, t, 0, DTYPE)
    g_ptr = _pointer(table, num_tensors, t, 1, DTYPE)
    return t, start, end * run, p_ptr, g_ptr, grad_factor, l1_threshold


@triton.jit
def _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient,
                                 MAXIMIZE: tl.constexpr):
    """The parameter and its transformed gradient, in float32."""
    p = tl.load(p_ptr + index, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return p, _transformed_gradient(g, p, grad_factor, coupled_l2, l1_subgradient, MAXIMIZE)


@triton.jit
def _store_parameter(p_ptr, index, mask, p, l1_threshold, DTYPE: tl.constexpr, PROXIMAL: tl.constexpr):
    """Applies the proximal L1 step, if any, after the update and stores."""
    if PROXIMAL:
        p = _soft_threshold(p, l1_threshold)
    tl.store(p_ptr + index, p.to(DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, scalars,
                momentum, one_minus_dampening, coupled_l2, l1_subgradient,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, PROXIMAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    lr = tl.load(scalars)
    t, start, end, p_ptr, g_ptr, grad_factor, l1_threshold = _step_chunk(
        table, numels, chunk_tensor, chunk_start, num_tensors, scalars, DTYPE, CHUNK)
    b_ptr = _pointer(table, num_tensors, t, 2, DTYPE)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        mask = index < end
        p, g = _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient,
                                            MAXIMIZE)
        if MOMENTUM:
            if FIRST_STEP:
                buf = g
            else:
                buf = tl.load(b_ptr + index, mask=mask, other=0.0).to(tl.float32) * momentum + one_minus_dampening * g
            tl.store(b_ptr + index, buf.to(DTYPE), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        _store_parameter(p_ptr, index, mask, p - lr * g, l1_threshold, DTYPE, PROXIMAL)


@triton.jit
def _adamw_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, scalars, per_tensor,
                  one_minus_beta1, beta2, one_minus_beta2, eps, coupled_l2, l1_subgradient,
                  DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, PROXIMAL: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # per_tensor: step_size[T], bias_correction2_sqrt[T]
    decay_factor = tl.load(scalars)
    t, start, end, p_ptr, g_ptr, grad_factor, l1_threshold = _step_chunk(
        table, numels, chunk_tensor, chunk_start, num_tensors, scalars, DTYPE, CHUNK)
    m_ptr = _pointer(table, num_tensors, t, 2, DTYPE)
    v_ptr = _pointer(table, num_tensors, t, 3, DTYPE)
    vmax_ptr = _pointer(table, num_tensors, t, 4, DTYPE)
    step_size = tl.load(per_tensor + t)
    bias_correction2_sqrt = tl.load(per_tensor + num_tensors + t)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        mask = index < end
        p, g = _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient,
                                            MAXIMIZE)
        m = tl.load(m_ptr + index, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + index, mask=mask, other=0.0).to(tl.float32)
        p = p * decay_factor
        if one_minus_beta1 < 0.5:  # torch.lerp's two formulas
            m = m + one_minus_beta1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - one_minus_beta1)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + index, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + index, v.to(DTYPE), mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + index, mask=mask, other=0.0).to(tl.float32), v)
            tl.store(vmax_ptr + index, v.to(DTYPE), mask=mask)
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        _store_parameter(p_ptr, index, mask, p - step_size * (m / denom), l1_threshold, DTYPE, PROXIMAL)


@triton.jit
def _sum_of_squares_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, partials,
                           DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    x_ptr = _pointer(table, num_tensors, t, 0, DTYPE)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + index, mask=index < end, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


# --- host side ---------------------------------------------------------------------

def _tables(lists: list[list[torch.Tensor]], device: torch.device):
    """(pointer table, numels, chunk tensor index, chunk first element) on
    ``device``, built on the host and sent in one copy."""
    num_tensors = len(lists[0])
    pointers = torch.tensor([[t.data_ptr() for t in tensors] for tensors in lists], dtype=torch.int64).reshape(-1)
    numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
    counts = (numels + CHUNK - 1) // CHUNK
    chunk_tensor = torch.repeat_interleave(torch.arange(num_tensors), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(int(counts.sum())) - first_chunk[chunk_tensor]) * CHUNK
    sizes = [pointers.numel(), num_tensors, chunk_tensor.numel(), chunk_start.numel()]
    packed = torch.cat([pointers, numels, chunk_tensor, chunk_start])
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    table, numels, chunk_tensor, chunk_start = torch.split(packed, sizes)
    return table, numels, chunk_tensor, chunk_start


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: numel() elements at data_ptr() in some order."""
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _check(params, grads, *states):
    if not params:
        return False
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"regops triton optimizer: parameters must be float32, float16 or bfloat16, got {dtype}")
    for name, tensors in (("grads", grads),) + tuple(states):
        if len(tensors) != len(params):
            raise ValueError(f"regops triton optimizer: {name} must have one tensor per parameter")
        for p, t in zip(params, tensors):
            if t.dtype != dtype or t.device != device or t.shape != p.shape or (t.numel() > 1 and t.stride() != p.stride()):
                raise ValueError(f"regops triton optimizer: every tensor of {name} must match its parameter's "
                                 "dtype, device, shape and strides")
    for p in params:
        if p.numel() > 1 and not _is_dense(p):
            raise ValueError("regops triton optimizer: parameters must be dense")
    return True


def _scalar(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _gradient_factor_and_skip(device, grad_scale, found_inf, clip_coef) -> tuple[torch.Tensor, torch.Tensor]:
    factor = torch.ones((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        factor = factor / grad_scale.to(device).reshape(())
    if clip_coef is not None:
        factor = factor * clip_coef.to(device).reshape(())
    skip = torch.zeros((), dtype=torch.float32, device=device) if found_inf is None else \
        (found_inf.to(device).reshape(()) != 0).float()
    return factor, skip


def _step_scalars(own_factor, lr64, l1, factor, skip) -> torch.Tensor:
    """The float32 scalars a step kernel reads, in _step_chunk's order: the
    kernel's own factor, the gradient factor, skip and the proximal L1
    threshold lr * l1."""
    return torch.stack([own_factor.float(), factor, skip, (lr64 * l1).float()])


def _launch_step(kernel, lists, *arguments, **constexprs) -> None:
    """One launch of a step kernel over ``lists`` (the parameters first), a
    program per CHUNK elements of a tensor; none when the lists hold no
    element."""
    table, numels, chunk_tensor, chunk_start = _tables(lists, lists[0][0].device)
    if chunk_tensor.numel() == 0:
        return
    kernel[(chunk_tensor.numel(),)](table, numels, chunk_tensor, chunk_start, len(lists[0]), *arguments,
                                    DTYPE=_TRITON_DTYPES[lists[0][0].dtype], CHUNK=CHUNK, BLOCK=BLOCK, **constexprs)


def _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
         first_step, grad_scale, found_inf, clip_coef):
    if not _check(params, grads, *((("momentum_buffers", momentum_buffers),) if momentum != 0 else ())):
        return
    device = params[0].device
    factor, skip = _gradient_factor_and_skip(device, grad_scale, found_inf, clip_coef)
    lr64 = _scalar(lr, device)
    _launch_step(
        _sgd_kernel, [params, grads, momentum_buffers if momentum != 0 else params],
        _step_scalars(lr64, lr64, l1, factor, skip),
        float(momentum), float(1.0 - dampening), float(weight_decay), 0.0 if proximal else float(l1),
        MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov, MAXIMIZE=maximize, PROXIMAL=proximal)


@torch.library.custom_op("regops::triton_sgd_step_", mutates_args={"params", "momentum_buffers"})
def sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
              lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
              l1: float, proximal: bool, first_step: bool, grad_scale: torch.Tensor | None = None,
              found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None) -> None:
    _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
         first_step, grad_scale, found_inf, clip_coef)


@torch.library.custom_op("regops::triton_sgd_step_tensor_lr_", mutates_args={"params", "momentum_buffers"})
def sgd_step_tensor_lr_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                        lr: torch.Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                        maximize: bool, l1: float, proximal: bool, first_step: bool,
                        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                        clip_coef: torch.Tensor | None = None) -> None:
    _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
         first_step, grad_scale, found_inf, clip_coef)


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
           l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef):
    states = (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))
    if amsgrad:
        states += (("max_exp_avg_sqs", max_exp_avg_sqs),)
    if not _check(params, grads, *states):
        return
    device = params[0].device
    factor, skip = _gradient_factor_and_skip(device, grad_scale, found_inf, clip_coef)
    # The steps are counted first (unless skipped), as torch does; the bias
    # corrections use the new count, in float64 as torch does on the host.
    torch._foreach_add_(state_steps, 1.0 - skip)
    steps = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float64)
    lr64 = _scalar(lr, device)
    per_tensor = torch.cat([lr64 / (1 - beta1 ** steps), torch.sqrt(1 - beta2 ** steps)]).float()
    _launch_step(
        _adamw_kernel, [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else params],
        _step_scalars(1 - lr64 * weight_decay, lr64, l1, factor, skip), per_tensor,
        float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps), float(l2), 0.0 if proximal else float(l1),
        AMSGRAD=amsgrad, MAXIMIZE=maximize, PROXIMAL=proximal)


_ADAMW_MUTATES = {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"}


@torch.library.custom_op("regops::triton_adamw_step_", mutates_args=_ADAMW_MUTATES)
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                state_steps: list[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, l2: float, l1: float, proximal: bool, amsgrad: bool, maximize: bool,
                grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                clip_coef: torch.Tensor | None = None) -> None:
    _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
           l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef)


@torch.library.custom_op("regops::triton_adamw_step_tensor_lr_", mutates_args=_ADAMW_MUTATES)
def adamw_step_tensor_lr_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                          exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                          state_steps: list[torch.Tensor], lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                          weight_decay: float, l2: float, l1: float, proximal: bool, amsgrad: bool, maximize: bool,
                          grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                          clip_coef: torch.Tensor | None = None) -> None:
    _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
           l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef)


@torch.library.custom_op("regops::triton_multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[torch.Tensor], squared: bool = False) -> torch.Tensor:
    device = tensors[0].device
    if tensors[0].dtype not in _TRITON_DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
        raise TypeError("regops triton multi_tensor_norm: tensors must share one dtype among float32, float16, "
                        "bfloat16")
    dense = [t if _is_dense(t) else t.contiguous() for t in tensors]
    table, numels, chunk_tensor, chunk_start = _tables([dense], device)
    partials = torch.zeros(max(chunk_tensor.numel(), 1), dtype=torch.float32, device=device)
    if chunk_tensor.numel() > 0:
        _sum_of_squares_kernel[(chunk_tensor.numel(),)](
            table, numels, chunk_tensor, chunk_start, len(dense), partials,
            DTYPE=_TRITON_DTYPES[tensors[0].dtype], CHUNK=CHUNK, BLOCK=BLOCK)
    total = partials.sum()
    return total if squared else total.sqrt()


@multi_tensor_norm.register_fake
def _(tensors, squared=False):
    return tensors[0].new_empty((), dtype=torch.float32)
