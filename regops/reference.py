"""Pure-torch reference implementations: the oracle the tests compare every
backend against, and the ``"reference"`` backend itself.

They follow the same written specs as the kernels (the dropout random rule in
README.md and csrc/include/regops/dropout.h), using only torch operations on
int64 tensors, so they run on any device and share no code with the kernels.
"""

from __future__ import annotations

import torch

# The spec values every backend shares (re-exported: the tests and the ops
# read them from here too).
from regops._spec import (  # noqa: F401
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_W0,
    PHILOX_W1,
    batch_norm_accumulate_dtype,
    batch_norm_memory_format,
    dropout_scale,
    dropout_threshold,
    layer_norm_h_dtype,
    mask_bytes,
    memory_order,
)

_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a < 2^32 held in int64, split
    into 16-bit halves so that no product overflows int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low_product = a * b_lo  # < 2^48
    high_product = a * b_hi  # < 2^48, weighs 2^16
    partial = low_product + ((high_product & 0xFFFF) << 16)  # < 2^49
    lo = partial & _MASK32
    hi = (high_product >> 16) + (partial >> 32)
    return hi & _MASK32, lo


def philox4x32_10(counter: list[torch.Tensor], key) -> list[torch.Tensor]:
    """Philox4x32-10 of Random123 on int64 tensors holding uint32 words; the
    two key words are ints or int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index > 0:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def dropout_keep(numel: int, p: float, seed: int, offset: int, device=None) -> torch.Tensor:
    """The flat bool keep-mask of the dropout random rule: element i takes word
    i % 4 of Philox at counter (lo32(offset + i // 4), hi32(offset + i // 4), 0, 0)
    under key (lo32(seed), hi32(seed)) and is kept iff the word >= floor(p * 2^32)."""
    seed &= (1 << 64) - 1
    # The public API keeps offset below 2^62, so offset + i // 4 fits int64.
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device) + offset
    zeros = torch.zeros_like(counters)
    words = philox4x32_10([counters & _MASK32, counters >> 32, zeros, zeros], (seed & _MASK32, seed >> 32))
    flat = torch.stack(words, dim=1).reshape(-1)[:numel]
    return flat >= dropout_threshold(p)


def in_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (numel values in ``like``'s memory order, or row-major when
    ``like`` is not dense) as a tensor of ``like``'s shape and layout."""
    order = memory_order(like)
    if order is None:
        return flat.reshape(like.shape)
    inverse = sorted(range(like.dim()), key=lambda d: order[d])
    return flat.reshape([like.shape[d] for d in order]).permute(inverse)


def flat_in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """The elements of ``x`` in its memory order (row-major when not dense)."""
    order = memory_order(x)
    return (x if order is None else x.permute(order)).reshape(-1)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask into the regops mask layout: bit i % 8 of byte i // 8
    holds element i of ``keep`` in its memory order."""
    flat = flat_in_memory_order(keep).to(torch.uint8)
    numel = flat.numel()
    padded = torch.zeros(mask_bytes(numel) * 8, dtype=torch.uint8, device=keep.device)
    padded[:numel] = flat
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, like) -> torch.Tensor:
    """The bool keep-mask stored in a packed mask, for a tensor ``like`` (its
    shape and memory order) or a shape (row-major)."""
    shape = like.shape if isinstance(like, torch.Tensor) else like
    numel = 1
    for size in shape:
        numel *= size
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = ((mask.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()
    return in_memory_order(bits, like) if isinstance(like, torch.Tensor) else bits.reshape(shape)


def dropout_apply(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x * keep * scale computed in float32 (float64 for float64), cast once."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    factor = keep.to(compute) * dropout_scale(p)  # the scale rounded once to the compute dtype
    return (x.to(compute) * factor).to(x.dtype)


def _work_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: itself when dense, else a contiguous copy."""
    return x if memory_order(x) is not None else x.contiguous()


def dropout_with_mask(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The output keeps a dense input's layout (a non-dense one comes out contiguous)."""
    x = _work_layout(x)
    keep = in_memory_order(dropout_keep(x.numel(), p, seed, offset, device=x.device), x)
    return dropout_apply(x, keep, p), pack_mask(keep)


def dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Bits in the memory order of ``grad`` (row-major when not dense)."""
    grad = _work_layout(grad)
    return dropout_apply(grad, unpack_mask(mask, grad), p)


# --- optimizers -------------------------------------------------------------------
# Penalized SGD and AdamW, one tensor at a time in float32 (float64 for
# float64 tensors; the rules of csrc/include/regops/optim.h, README
# "Optimizers"): gradient penalties use the parameter before the step;
# proximal L1 soft-thresholds after it; the parameter and its states are
# rounded once to their dtype at the end.


def optimizer_math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- stochastic rounding (csrc/include/regops/stochastic_rounding.h, README
# "Stochastic rounding") ---------------------------------------------------------

ROUNDING_SLOTS = {"param": 0, "momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3, "average": 4}


def rounding_bits(like: torch.Tensor, seed: int, group: int, step: int, tensor: int, slot: int) -> torch.Tensor:
    """The 16 random bits (int64) of every element of ``like``, in its shape:
    element i (in memory order) takes 16-bit half (i % 8) % 2 of word
    (i % 8) // 2 of Philox at counter (lo32(i // 8), lo32(step), tensor,
    slot + 8 * group) under key (lo32(seed), hi32(seed))."""
    numel = like.numel()
    seed &= (1 << 64) - 1
    blocks = torch.arange((numel + 7) // 8, dtype=torch.int64, device=like.device)

    def full(value):
        return torch.full_like(blocks, value & _MASK32)

    words = philox4x32_10([blocks & _MASK32, full(step), full(tensor), full(slot + 8 * group)],
                          (seed & _MASK32, seed >> 32))
    halves = torch.stack([half for word in words for half in (word & 0xFFFF, word >> 16)], dim=1)
    return in_memory_order(halves.reshape(-1)[:numel], like)


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the float32 values with those bits."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def stochastic_round(value: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``value`` rounded to bfloat16 or float16 with 16 random bits
    per element: away from zero iff the bits plus the dropped fraction (its
    top 16 bits) carry; NaN, inf and representable values stay as they are."""
    value = value.float()
    raw = value.view(torch.int32).to(torch.int64) & _MASK32
    magnitude = raw & 0x7FFFFFFF
    if dtype == torch.bfloat16:
        rounded = _bits_to_float((raw + bits) & 0xFFFF0000)
    elif dtype == torch.float16:
        normal = _bits_to_float((raw + (bits >> 3)) & 0xFFFFE000)
        scaled = value.abs() * 16777216.0  # 2^24: float16's subnormals are the multiples of 2^-24
        whole = scaled.floor()
        fraction = ((scaled - whole) * 65536.0).to(torch.int64)
        up = (bits + fraction >= 65536).float()
        subnormal = torch.copysign((whole + up) * 2.0 ** -24, value)
        rounded = torch.where(magnitude >= 0x38800000, normal, subnormal)
    else:
        raise ValueError(f"stochastic rounding is to bfloat16 or float16, got {dtype}")
    return torch.where(magnitude > 0x7F800000, value, rounded).to(dtype)


def _store(target: torch.Tensor, value: torch.Tensor, rounding, index: int, slot: str) -> torch.Tensor:
    """Writes float32 ``value`` into ``target``: stochastically rounded when
    ``rounding`` ([seed, group, step, tensor indices] as ints) is given and
    ``target`` is 16-bit, else rounded to nearest even."""
    if rounding is not None and target.dtype in (torch.bfloat16, torch.float16):
        bits = rounding_bits(target, rounding[0], rounding[1], rounding[2], rounding[3 + index], ROUNDING_SLOTS[slot])
        value = stochastic_round(value, bits, target.dtype)
    return target.copy_(value)


def store_average(average: torch.Tensor, param: torch.Tensor, weight: float, rounding, index: int) -> None:
    """average = lerp(average, param, weight) in float32 (float64 for float64
    parameters) from the stored (rounded) parameter, written as ``_store``
    writes (random slot 4)."""
    math_dtype = optimizer_math_dtype(param.dtype)
    _store(average, lerp_like_torch(average.to(math_dtype), param.to(math_dtype), weight), rounding, index, "average")


def _averages(averages, average_weights):
    """(average, weight) per tensor, or Nones without averaging."""
    if not averages:
        return None
    return list(zip(averages, average_weights.tolist()))


def _rounding_list(rounding):
    return None if rounding is None else [int(v) for v in rounding.tolist()]


def _transformed_gradient(grad, param, grad_factor, maximize, coupled_l2, l1_subgradient):
    g = grad.to(optimizer_math_dtype(grad.dtype))
    if grad_factor is not None:
        g = g * grad_factor.to(g.device)
    if maximize:
        g = -g
    # A zero coefficient skips its term (torch skips weight_decay == 0), so an
    # inf parameter does not turn into NaN through 0 * inf.
    if coupled_l2 != 0:
        g = g + coupled_l2 * param
    if l1_subgradient != 0:
        g = g + l1_subgradient * torch.sign(param)
    return g


def lerp_like_torch(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp's formula (start + weight * (end - start) for |weight| < 0.5,
    else end - (end - start) * (1 - weight)) with each operation rounded on
    its own, as the kernels compute it; torch's CPU lerp fuses a multiply-add,
    which would round differently."""
    if start.dtype != torch.float64:
        weight = float(torch.tensor(float(weight), dtype=torch.float32))  # the kernels' float32 weight
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end + (weight - 1.0) * (end - start)  # weight - 1 is exact in float32 and in double


def soft_threshold(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """sign(p) * max(|p| - threshold, 0): the proximal step of threshold * |p|."""
    return torch.sign(p) * torch.clamp(p.abs() - threshold, min=0)


def sgd_step(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, l1=0.0, l1_mode="subgradient", grad_factor=None, rounding=None,
             averages=(), average_weights=None):
    """One penalized SGD step in place. momentum_buffers[i] is None before the
    first step (it then takes the gradient as torch does); returns the buffers.
    ``rounding``: the ops' stochastic rounding tensor, or None; ``averages``
    (with ``average_weights``): weight averages updated from the new parameters."""
    lr = float(lr)
    rounding = _rounding_list(rounding)
    averaged = _averages(averages, average_weights)
    proximal = l1_mode == "proximal"
    new_buffers = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        p = param.to(optimizer_math_dtype(param.dtype))
        g = _transformed_gradient(grad, p, grad_factor, maximize, weight_decay, 0.0 if proximal else l1)
        buf = momentum_buffers[i] if momentum_buffers else None
        if momentum != 0:
            new = g.clone() if buf is None else buf.to(p.dtype) * momentum + (1 - dampening) * g
            g = g + momentum * new if nesterov else new
            if buf is None:
                buf = torch.empty_like(param)
            _store(buf, new, rounding, i, "momentum_buffer")
        p = p - lr * g
        if proximal:
            p = soft_threshold(p, lr * l1)
        _store(param, p, rounding, i, "param")
        if averaged:
            store_average(averaged[i][0], param, averaged[i][1], rounding, i)
        new_buffers.append(buf)
    return new_buffers


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=1e-2, amsgrad=False, maximize=False, l2=0.0, l1=0.0, l1_mode="subgradient",
               grad_factor=None, rounding=None, averages=(), average_weights=None):
    """One penalized AdamW step in place; steps (float32 tensors) are incremented.
    ``rounding``, ``averages`` and ``average_weights`` as for sgd_step."""
    lr = float(lr)
    rounding = _rounding_list(rounding)
    averaged = _averages(averages, average_weights)
    beta1, beta2 = betas
    proximal = l1_mode == "proximal"
    for i, (param, grad) in enumerate(zip(params, grads)):
        steps[i] += 1
        step = float(steps[i])
        p = param.to(optimizer_math_dtype(param.dtype))
        g = _transformed_gradient(grad, p, grad_factor, maximize, l2, 0.0 if proximal else l1)
        p = p * (1 - lr * weight_decay)
        m = lerp_like_torch(exp_avgs[i].to(p.dtype), g, 1 - beta1)
        v = exp_avg_sqs[i].to(p.dtype) * beta2 + (1 - beta2) * g * g
        _store(exp_avgs[i], m, rounding, i, "exp_avg")
        _store(exp_avg_sqs[i], v, rounding, i, "exp_avg_sq")
        if amsgrad:
            v = torch.maximum(max_exp_avg_sqs[i].to(p.dtype), v)
            _store(max_exp_avg_sqs[i], v, rounding, i, "max_exp_avg_sq")
        denom = v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
        p = p - lr / (1 - beta1 ** step) * (m / denom)
        if proximal:
            p = soft_threshold(p, lr * l1)
        _store(param, p, rounding, i, "param")
        if averaged:
            store_average(averaged[i][0], param, averaged[i][1], rounding, i)


def multi_tensor_norm(tensors, squared: bool = False) -> torch.Tensor:
    """The L2 norm (or its square) of all tensors together, float32."""
    total = sum((t.to(optimizer_math_dtype(t.dtype)).square().sum(dtype=torch.float64) for t in tensors),
                torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None))
    return (total if squared else total.sqrt()).float()


# --- batch normalization ---------------------------------------------------------
# The formulas of csrc/include/regops/batch_norm.h in plain torch, computed in
# the accumulate dtype (float32, float64 for float64) and cast once.


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against (N, C, ...) x."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance."""
    xf = x.to(batch_norm_accumulate_dtype(x.dtype))
    dims = _reduce_dims(x)
    mean = xf.mean(dims)
    return mean, (xf - _per_channel(mean, x)).square().mean(dims)


def _affine(x, mean, invstd, weight, bias):
    """(x - mean) * invstd * weight + bias in the accumulate dtype, before the activation."""
    y = (x.to(batch_norm_accumulate_dtype(x.dtype)) - _per_channel(mean, x)) * _per_channel(invstd, x)
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), x)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), x)
    return y


def batch_norm_elementwise(x, mean, invstd, weight=None, bias=None, relu: bool = False) -> torch.Tensor:
    y = _affine(x, mean, invstd, weight, bias)
    return (torch.relu(y) if relu else y).to(x.dtype).contiguous(memory_format=batch_norm_memory_format(x))


def _masked_grad(grad_out, x, mean, invstd, weight, bias, relu: bool) -> torch.Tensor:
    """dy in the accumulate dtype, zero where the fused ReLU blocked the forward
    value (torch's ReLU backward passes the gradient where y > 0, and NaN)."""
    g = grad_out.to(batch_norm_accumulate_dtype(x.dtype))
    if relu:
        g = torch.where(_affine(x, mean, invstd, weight, bias) <= 0, torch.zeros_like(g), g)
    return g


def batch_norm_backward_reduce(grad_out, x, mean, invstd, weight=None, bias=None, relu: bool = False):
    """Per-channel (sum(dy), sum(dy * (x - mean)))."""
    g = _masked_grad(grad_out, x, mean, invstd, weight, bias, relu)
    xmu = x.to(g.dtype) - _per_channel(mean, x)
    dims = _reduce_dims(x)
    return g.sum(dims), (g * xmu).sum(dims)


def batch_norm_backward_elementwise(grad_out, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count: int,
                                    relu: bool = False) -> torch.Tensor:
    """(dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * weight."""
    g = _masked_grad(grad_out, x, mean, invstd, weight, bias, relu)
    xmu = x.to(g.dtype) - _per_channel(mean, x)
    invstd_c = _per_channel(invstd, x)
    scale = invstd_c if weight is None else invstd_c * _per_channel(weight.to(g.dtype), x)
    dx = (g - _per_channel(sum_dy, x) / count - xmu * invstd_c * invstd_c * _per_channel(sum_dy_xmu, x) / count) * scale
    return dx.to(x.dtype).contiguous(memory_format=batch_norm_memory_format(x))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.batch_norm (plus the optional residual, added
    before the optional ReLU) from torch primitives; differentiable by
    autograd. Updates the running buffers in place."""
    acc = batch_norm_accumulate_dtype(x.dtype)
    if training:
        mean, var = batch_norm_stats(x)
        count = x.numel() // max(1, x.shape[1])
        if count > 0:
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.copy_((1 - momentum) * running_mean.to(acc) + momentum * mean.detach())
                if running_var is not None:
                    unbiased = var.detach() * (count / max(1, count - 1))
                    running_var.copy_((1 - momentum) * running_var.to(acc) + momentum * unbiased)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = _affine(x, mean, torch.rsqrt(var + eps), weight, bias)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if activation == "relu":
        y = torch.relu(y)
    return y.to(x.dtype)


# --- layer normalization -----------------------------------------------------------
# The formulas of csrc/include/regops/layer_norm.h in plain torch on (rows,
# hidden) tensors, in the accumulate dtype and cast once; differentiable by
# autograd. Dropout follows the random rule over the row-major flat index.


def dropout_add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, p: float, seed: int | None, offset: int, eps: float, rms: bool,
                     residual_in_fp32: bool = False):
    """(output, h, packed mask or None) for x (rows, hidden): h =
    round_h(round_x(x * keep * scale) + residual), output = norm(h) * weight
    + bias rounded to x's dtype; the statistics are those of h as stored."""
    acc = batch_norm_accumulate_dtype(x.dtype)
    mask = None
    d = x
    if seed is not None:
        keep = dropout_keep(x.numel(), p, seed, offset, device=x.device).reshape(x.shape)
        d = dropout_apply(x, keep, p)
        mask = pack_mask(keep)
    h_dtype = layer_norm_h_dtype(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    h = d.to(h_dtype) if residual is None else (d.to(acc) + residual.to(acc)).to(h_dtype)
    hf = h.to(acc)
    if rms:
        rstd = 1.0 / torch.sqrt(hf.square().mean(-1, keepdim=True) + eps)
        xhat = hf * rstd
    else:
        mean = hf.mean(-1, keepdim=True)
        rstd = 1.0 / torch.sqrt((hf - mean).square().mean(-1, keepdim=True) + eps)
        xhat = (hf - mean) * rstd
    y = xhat
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), h, mask
