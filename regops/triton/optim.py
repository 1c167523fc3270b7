"""Penalized SGD and AdamW in Triton: one kernel launch per (device, dtype)
group, following the element rules of csrc/include/regops/optim.h.

The tensors of a group reach the kernel as pointer tables (an int64 tensor
of data_ptr()s per list) plus a chunk table (tensor index and first element
of every CHUNK-element program). These ops are plain torch.library.custom_op
rather than triton_op: a pointer table hides the tensors from triton_op's
tracing of the kernel arguments, so torch.compile could not see what the
kernel mutates; custom_op declares the mutated lists explicitly and is
opaque to the compiler, which is what a list-of-tensors update needs.

Bytes per element: SGD 3e (5e with momentum), AdamW 7e (9e with AMSGrad),
the norm e. A chunk that lies wholly inside its tensor runs unmasked, and
when every pointer of the table is 16-byte aligned the kernel is told so
(ALIGNED), so that its loads and stores are 128-bit; otherwise they are
scalar, which any view's alignment allows.

Per-tensor factors that depend on device-resident values (the step counts,
a tensor lr, GradScaler's scale, the clip coefficient) are computed with a
few torch ops on the device before the launch, in float64 where torch
computes them on the host, so nothing waits for the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from regops.triton import _checks
from regops.triton._launch import launch
from regops.triton.dropout import _philox4x32_10

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
def _rounding_bits(rounding, t, block_start, slot, BLOCK: tl.constexpr):
    """The 16 random bits (uint32) of elements block_start + [0, BLOCK) of
    tensor t for value ``slot`` (csrc/include/regops/stochastic_rounding.h):
    one Philox call per eight elements, at counter (lo32(i // 8), lo32(step),
    tensor index, slot + 8 * group) under key (lo32(seed), hi32(seed)), where
    ``rounding`` holds [seed, group, step, tensor indices]; element 8 * b + k
    takes 16-bit half k % 2 of word k // 2. block_start is a multiple of 8."""
    seed = tl.load(rounding)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    group = tl.load(rounding + 1)
    step = (tl.load(rounding + 2) & 0xFFFFFFFF).to(tl.uint32)
    tensor = (tl.load(rounding + 3 + t) & 0xFFFFFFFF).to(tl.uint32)
    counter = block_start // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + step
    c2 = zero + tensor
    c3 = zero + ((slot + 8 * group) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    # join(join(lo0, lo2), join(lo1, lo3))[b, i, j] is the low half of word
    # 2 * i + j; joined with the high halves as the minor dimension, the flat
    # index of half h of word w is 2 * w + h.
    low = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
    high = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
    return tl.reshape(tl.join(low, high), (BLOCK,))


@triton.jit
def _stochastic_round(x, bits, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (bfloat16 or float16) with 16 random bits
    per element, as a float32 value DTYPE holds exactly (see
    stochastic_rounding.h); NaN stays NaN."""
    raw = x.to(tl.uint32, bitcast=True)
    magnitude = raw & 0x7FFFFFFF
    if DTYPE == tl.bfloat16:
        rounded = ((raw + bits) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        normal = ((raw + (bits >> 3)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        scaled = magnitude.to(tl.float32, bitcast=True) * 16777216.0
        whole = tl.floor(scaled)
        fraction = ((scaled - whole) * 65536.0).to(tl.uint32)
        up = ((bits + fraction) >= 65536).to(tl.float32)
        subnormal = ((whole + up) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True) | (raw & 0x80000000)
        rounded = tl.where(magnitude >= 0x38800000, normal, subnormal.to(tl.float32, bitcast=True))
    return tl.where(magnitude > 0x7F800000, x, rounded)


@triton.jit
def _store_value(ptr, index, mask, value, rounding, t, block_start, slot, DTYPE: tl.constexpr,
                 STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """Stores float32 ``value`` as DTYPE: rounded stochastically (random
    ``slot``) under STOCHASTIC when DTYPE is 16-bit, else to nearest even.
    Returns the stored value in float32."""
    if STOCHASTIC:
        if DTYPE != tl.float32:
            value = _stochastic_round(value, _rounding_bits(rounding, t, block_start, slot, BLOCK), DTYPE)
    stored = value.to(DTYPE)
    tl.store(ptr + index, stored, mask=mask)
    return stored.to(tl.float32)


@triton.jit
def _pointer(table, num_tensors, t, list_index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``t`` of list ``list_index`` in the pointer table.
    ALIGNED: the launcher found every pointer of the table 16-byte aligned;
    saying so lets the compiler use 128-bit accesses, which a pointer read
    from memory would otherwise never get."""
    pointer = tl.load(table + list_index * num_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _chunk(numels, chunk_tensor, chunk_start, CHUNK: tl.constexpr):
    """This program's tensor index and the elements [start, end) of it that
    the program covers; start is a multiple of CHUNK."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    return t, start, tl.minimum(tl.load(numels + t), start + CHUNK)


@triton.jit
def _step_chunk(table, numels, chunk_tensor, chunk_start, num_tensors, scalars,
                DTYPE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """What both step kernels start from. ``scalars`` is laid out by
    _step_scalars: the kernel's own factor (read by the kernel), grad_factor,
    skip, l1_threshold. Lists 0 and 1 of the table are the parameters and the
    gradients. Returns this program's tensor, its elements [start, end), empty
    when skip is set (found_inf: nothing is written), whether the chunk is
    whole (CHUNK elements: its blocks then run unmasked), the parameter and
    gradient pointers, grad_factor and l1_threshold."""
    grad_factor = tl.load(scalars + 1)
    run = (tl.load(scalars + 2) == 0).to(tl.int64)
    l1_threshold = tl.load(scalars + 3)
    t, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    end = end * run
    p_ptr = _pointer(table, num_tensors, t, 0, DTYPE, ALIGNED)
    g_ptr = _pointer(table, num_tensors, t, 1, DTYPE, ALIGNED)
    return t, start, end, end - start == CHUNK, p_ptr, g_ptr, grad_factor, l1_threshold


@triton.jit
def _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient,
                                 MAXIMIZE: tl.constexpr):
    """The parameter and its transformed gradient, in float32."""
    p = tl.load(p_ptr + index, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return p, _transformed_gradient(g, p, grad_factor, coupled_l2, l1_subgradient, MAXIMIZE)


@triton.jit
def _store_parameter(p_ptr, a_ptr, weights, index, mask, p, l1_threshold, rounding, t, block_start,
                     DTYPE: tl.constexpr, PROXIMAL: tl.constexpr, STOCHASTIC: tl.constexpr, AVERAGE: tl.constexpr,
                     AVG_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Applies the proximal L1 step, if any, after the update and stores;
    then, under AVERAGE, the weight average of tensor t moves towards the
    stored parameter: lerp(average, p, weights[t]) as torch.lerp computes it."""
    if PROXIMAL:
        p = _soft_threshold(p, l1_threshold)
    stored = _store_value(p_ptr, index, mask, p, rounding, t, block_start, 0, DTYPE, STOCHASTIC, BLOCK)
    if AVERAGE:
        weight = tl.load(weights + t)
        small = tl.abs(weight) < 0.5
        average = tl.load(a_ptr + index, mask=mask, other=0.0).to(tl.float32)
        base = tl.where(small, average, stored)
        average = base + tl.where(small, weight, weight - 1.0) * (stored - average)
        _store_value(a_ptr, index, mask, average, rounding, t, block_start, 4, AVG_DTYPE, STOCHASTIC, BLOCK)


@triton.jit
def _all(index):
    """The mask of a block of a whole chunk: a constant, so the compiler sees
    that the accesses need no mask and vectorizes them."""
    return tl.full(index.shape, True, tl.int1)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, a_ptr, weights, index, mask, lr, grad_factor, l1_threshold, momentum,
               one_minus_dampening, coupled_l2, l1_subgradient, rounding, t, block_start, DTYPE: tl.constexpr,
               MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               PROXIMAL: tl.constexpr, STOCHASTIC: tl.constexpr, AVERAGE: tl.constexpr, AVG_DTYPE: tl.constexpr,
               BLOCK: tl.constexpr):
    p, g = _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient, MAXIMIZE)
    if MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = tl.load(b_ptr + index, mask=mask, other=0.0).to(tl.float32) * momentum + one_minus_dampening * g
        _store_value(b_ptr, index, mask, buf, rounding, t, block_start, 1, DTYPE, STOCHASTIC, BLOCK)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    _store_parameter(p_ptr, a_ptr, weights, index, mask, p - lr * g, l1_threshold, rounding, t, block_start, DTYPE,
                     PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)


# num_tensors is a count, not a size the code can use: a group of one tensor
# (or of 16) would otherwise compile a variant of its own.
@triton.jit(do_not_specialize=["num_tensors"])
def _sgd_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, scalars,
                momentum, one_minus_dampening, coupled_l2, l1_subgradient, rounding, weights,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, PROXIMAL: tl.constexpr, STOCHASTIC: tl.constexpr, AVERAGE: tl.constexpr,
                AVG_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    lr = tl.load(scalars)
    t, start, end, whole, p_ptr, g_ptr, grad_factor, l1_threshold = _step_chunk(
        table, numels, chunk_tensor, chunk_start, num_tensors, scalars, DTYPE, CHUNK, ALIGNED)
    b_ptr = _pointer(table, num_tensors, t, 2, DTYPE, ALIGNED)
    a_ptr = _pointer(table, num_tensors, t, 3, AVG_DTYPE, ALIGNED)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        if whole:
            _sgd_block(p_ptr, g_ptr, b_ptr, a_ptr, weights, index, _all(index), lr, grad_factor, l1_threshold,
                       momentum, one_minus_dampening, coupled_l2, l1_subgradient, rounding, t, start + offset, DTYPE,
                       MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)
        else:
            _sgd_block(p_ptr, g_ptr, b_ptr, a_ptr, weights, index, index < end, lr, grad_factor, l1_threshold,
                       momentum, one_minus_dampening, coupled_l2, l1_subgradient, rounding, t, start + offset, DTYPE,
                       MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, weights, index, mask, decay_factor, step_size,
                 bias_correction2_sqrt, grad_factor, l1_threshold, one_minus_beta1, beta2, one_minus_beta2, eps,
                 coupled_l2, l1_subgradient, rounding, t, block_start, DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, PROXIMAL: tl.constexpr, STOCHASTIC: tl.constexpr, AVERAGE: tl.constexpr,
                 AVG_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    p, g = _load_parameter_and_gradient(p_ptr, g_ptr, index, mask, grad_factor, coupled_l2, l1_subgradient, MAXIMIZE)
    m = tl.load(m_ptr + index, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + index, mask=mask, other=0.0).to(tl.float32)
    p = p * decay_factor
    if one_minus_beta1 < 0.5:  # torch.lerp's two formulas
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    _store_value(m_ptr, index, mask, m, rounding, t, block_start, 1, DTYPE, STOCHASTIC, BLOCK)
    _store_value(v_ptr, index, mask, v, rounding, t, block_start, 2, DTYPE, STOCHASTIC, BLOCK)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + index, mask=mask, other=0.0).to(tl.float32), v)
        _store_value(vmax_ptr, index, mask, v, rounding, t, block_start, 3, DTYPE, STOCHASTIC, BLOCK)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    _store_parameter(p_ptr, a_ptr, weights, index, mask, p - step_size * (m / denom), l1_threshold, rounding, t,
                     block_start, DTYPE, PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)


@triton.jit(do_not_specialize=["num_tensors"])
def _adamw_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, scalars, per_tensor,
                  one_minus_beta1, beta2, one_minus_beta2, eps, coupled_l2, l1_subgradient, rounding, weights,
                  DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, PROXIMAL: tl.constexpr,
                  STOCHASTIC: tl.constexpr, AVERAGE: tl.constexpr, AVG_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # per_tensor: step_size[T], bias_correction2_sqrt[T]
    decay_factor = tl.load(scalars)
    t, start, end, whole, p_ptr, g_ptr, grad_factor, l1_threshold = _step_chunk(
        table, numels, chunk_tensor, chunk_start, num_tensors, scalars, DTYPE, CHUNK, ALIGNED)
    m_ptr = _pointer(table, num_tensors, t, 2, DTYPE, ALIGNED)
    v_ptr = _pointer(table, num_tensors, t, 3, DTYPE, ALIGNED)
    vmax_ptr = _pointer(table, num_tensors, t, 4, DTYPE, ALIGNED)
    a_ptr = _pointer(table, num_tensors, t, 5, AVG_DTYPE, ALIGNED)
    step_size = tl.load(per_tensor + t)
    bias_correction2_sqrt = tl.load(per_tensor + num_tensors + t)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        if whole:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, weights, index, _all(index), decay_factor,
                         step_size, bias_correction2_sqrt, grad_factor, l1_threshold, one_minus_beta1, beta2,
                         one_minus_beta2, eps, coupled_l2, l1_subgradient, rounding, t, start + offset, DTYPE, AMSGRAD,
                         MAXIMIZE, PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, weights, index, index < end, decay_factor,
                         step_size, bias_correction2_sqrt, grad_factor, l1_threshold, one_minus_beta1, beta2,
                         one_minus_beta2, eps, coupled_l2, l1_subgradient, rounding, t, start + offset, DTYPE, AMSGRAD,
                         MAXIMIZE, PROXIMAL, STOCHASTIC, AVERAGE, AVG_DTYPE, BLOCK)


@triton.jit
def _squares(x_ptr, index, mask):
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return x * x


@triton.jit(do_not_specialize=["num_tensors"])
def _sum_of_squares_kernel(table, numels, chunk_tensor, chunk_start, num_tensors, partials,
                           DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    x_ptr = _pointer(table, num_tensors, t, 0, DTYPE, ALIGNED)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK).to(tl.int64)
        if end - start == CHUNK:
            acc += _squares(x_ptr, index, _all(index))
        else:
            acc += _squares(x_ptr, index, index < end)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


# --- host side ---------------------------------------------------------------------

def _tables(lists: list[list[torch.Tensor]], device: torch.device):
    """(pointer table, numels, chunk tensor index, chunk first element) on
    ``device``, built on the host and sent in one copy, and whether every
    pointer is 16-byte aligned."""
    addresses = [t.data_ptr() for tensors in lists for t in tensors]
    numels = [t.numel() for t in lists[0]]
    chunks = [(index, start) for index, numel in enumerate(numels) for start in range(0, numel, CHUNK)]
    chunk_tensor = [index for index, _ in chunks]
    chunk_start = [start for _, start in chunks]
    sizes = [len(addresses), len(numels), len(chunks), len(chunks)]
    # Python ints to one host tensor: no value is read back from a tensor.
    packed = torch.tensor(addresses + numels + chunk_tensor + chunk_start, dtype=torch.int64)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    table, numels, chunk_tensor, chunk_start = torch.split(packed, sizes)
    return table, numels, chunk_tensor, chunk_start, all(address % 16 == 0 for address in addresses)


def _scalar(value, device) -> torch.Tensor:
    """lr as a float64 scalar on the device. A Python number is filled in by
    a kernel, not copied from the host, so nothing waits."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


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
    device = lists[0][0].device
    table, numels, chunk_tensor, chunk_start, aligned = _tables(lists, device)
    if chunk_tensor.numel() == 0:
        return
    # enable_fp_fusion=False: no multiply-add contraction (Triton's default
    # fuses a * b + c into an FMA), so every product and sum is rounded on
    # its own, as in regops/reference.py and the C++ and CUDA kernels, and
    # stochastic rounding sees the same float32 bits on every backend.
    launch(kernel, (chunk_tensor.numel(),), device, table, numels, chunk_tensor, chunk_start, len(lists[0]),
           *arguments, DTYPE=_TRITON_DTYPES[lists[0][0].dtype], ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK,
           enable_fp_fusion=False, **constexprs)


def _average_arguments(params, averages, average_weights):
    """The averages list of the pointer table, the weights pointer and the
    AVERAGE and AVG_DTYPE constexprs (the parameters stand in when there is
    no average)."""
    if not averages:
        return params, params[0], False, _TRITON_DTYPES[params[0].dtype]
    return averages, average_weights, True, _TRITON_DTYPES[averages[0].dtype]


def _rounding_arguments(params, rounding):
    """The rounding pointer and the STOCHASTIC flag: 16-bit parameters with a
    rounding tensor round stochastically; otherwise the pointer is unused (the
    parameters stand in for it)."""
    stochastic = rounding is not None and params[0].dtype != torch.float32
    return (rounding if stochastic else params[0]), stochastic



class _StepArguments(NamedTuple):
    """What both step ops pass their kernel besides the per-optimizer lists
    and scalars: the stochastic-rounding key, the averaging lists and flags,
    and the gradient factor and skip flag on the device."""
    rounding: torch.Tensor
    stochastic: bool
    averages: list
    weights: torch.Tensor
    average: bool
    average_dtype: object
    factor: torch.Tensor
    skip: torch.Tensor

    @classmethod
    def of(cls, op, params, rounding, averages, average_weights, grad_scale, found_inf, clip_coef):
        """The rounding and averaging checks of ``op`` (after its own), then the
        arguments; None for a call without parameters."""
        _checks.check_rounding(op, rounding, params)
        _checks.check_averages(op, averages, average_weights, params)
        if not params:
            return None
        rounding, stochastic = _rounding_arguments(params, rounding)
        averages, weights, average, average_dtype = _average_arguments(params, averages, average_weights)
        factor, skip = _gradient_factor_and_skip(params[0].device, grad_scale, found_inf, clip_coef)
        return cls(rounding, stochastic, averages, weights, average, average_dtype, factor, skip)

    def launch(self, kernel, lists, own_factor, lr64, l1, *arguments, **constexprs) -> None:
        """_launch_step of ``kernel`` over ``lists`` and the averages: the
        step scalars (_step_scalars), ``arguments``, then the rounding and
        averaging arguments and flags."""
        _launch_step(kernel, [*lists, self.averages], _step_scalars(own_factor, lr64, l1, self.factor, self.skip),
                     *arguments, self.rounding, self.weights, STOCHASTIC=self.stochastic, AVERAGE=self.average,
                     AVG_DTYPE=self.average_dtype, **constexprs)


def _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
         first_step, grad_scale=None, found_inf=None, clip_coef=None, rounding=None, averages=None,
         average_weights=None) -> None:
    _checks.check_sgd_arguments(params, grads, momentum_buffers, lr, momentum, weight_decay, l1, grad_scale, found_inf,
                                clip_coef)
    step = _StepArguments.of("sgd_step_", params, rounding, averages, average_weights, grad_scale, found_inf,
                             clip_coef)
    if step is None:
        return
    lr64 = _scalar(lr, params[0].device)
    step.launch(_sgd_kernel, [params, grads, momentum_buffers if momentum != 0 else params], lr64, lr64, l1,
                float(momentum), float(1.0 - dampening), float(weight_decay), 0.0 if proximal else float(l1),
                MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov, MAXIMIZE=maximize,
                PROXIMAL=proximal)


def _native_schema(name: str, overload: str = "default") -> str:
    """The argument list of the native op regops::<name> (csrc/include/regops/
    schemas.h), so that a Triton twin takes the same calls: the same
    defaults and an optional averages list."""
    schema = str(getattr(getattr(torch.ops.regops, name), overload)._schema)
    return schema[schema.index("("):]


# One Python body per optimizer serves both overloads: the native schema
# (float or tensor lr) is the signature.
_SGD_MUTATES = {"params", "momentum_buffers", "averages"}
sgd_step_ = torch.library.custom_op("regops::triton_sgd_step_", _sgd, mutates_args=_SGD_MUTATES,
                                    schema=_native_schema("sgd_step_"))
sgd_step_tensor_lr_ = torch.library.custom_op("regops::triton_sgd_step_tensor_lr_", _sgd, mutates_args=_SGD_MUTATES,
                                              schema=_native_schema("sgd_step_", "tensor_lr"))


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
           l2, l1, proximal, amsgrad, maximize, grad_scale=None, found_inf=None, clip_coef=None, rounding=None,
           averages=None, average_weights=None) -> None:
    _checks.check_adamw_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                                  eps, weight_decay, l2, l1, amsgrad, grad_scale, found_inf, clip_coef)
    step = _StepArguments.of("adamw_step_", params, rounding, averages, average_weights, grad_scale, found_inf,
                             clip_coef)
    if step is None:
        return
    # The steps are counted first (unless skipped), as torch does; the bias
    # corrections use the new count, in float64 as torch does on the host.
    torch._foreach_add_(state_steps, 1.0 - step.skip)
    steps = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float64)
    lr64 = _scalar(lr, params[0].device)
    per_tensor = torch.cat([lr64 / (1 - beta1 ** steps), torch.sqrt(1 - beta2 ** steps)]).float()
    step.launch(_adamw_kernel, [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else params],
                1 - lr64 * weight_decay, lr64, l1, per_tensor, float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                float(eps), float(l2), 0.0 if proximal else float(l1), AMSGRAD=amsgrad, MAXIMIZE=maximize,
                PROXIMAL=proximal)


_ADAMW_MUTATES = {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "averages"}
adamw_step_ = torch.library.custom_op("regops::triton_adamw_step_", _adamw, mutates_args=_ADAMW_MUTATES,
                                      schema=_native_schema("adamw_step_"))
adamw_step_tensor_lr_ = torch.library.custom_op("regops::triton_adamw_step_tensor_lr_", _adamw,
                                                mutates_args=_ADAMW_MUTATES,
                                                schema=_native_schema("adamw_step_", "tensor_lr"))


@torch.library.custom_op("regops::triton_multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[torch.Tensor], squared: bool = False) -> torch.Tensor:
    _checks.check_norm_inputs(tensors)
    device = tensors[0].device
    dense = [t if t.numel() <= 1 or _checks.is_dense(t) else t.contiguous() for t in tensors]
    table, numels, chunk_tensor, chunk_start, aligned = _tables([dense], device)
    partials = torch.zeros(max(chunk_tensor.numel(), 1), dtype=torch.float32, device=device)
    if chunk_tensor.numel() > 0:
        launch(_sum_of_squares_kernel, (chunk_tensor.numel(),), device, table, numels, chunk_tensor, chunk_start,
               len(dense), partials, DTYPE=_TRITON_DTYPES[tensors[0].dtype], ALIGNED=aligned, CHUNK=CHUNK,
               BLOCK=BLOCK)
    total = partials.sum()
    return total if squared else total.sqrt()


@multi_tensor_norm.register_fake
def _(tensors, squared=False):
    return tensors[0].new_empty((), dtype=torch.float32)


# --- what the offline compile gate compiles (benchmarks/static_triton.py) ---------------

def compile_cases() -> None:
    """Calls of the ops above whose launches (recorded, not run) are every
    variant the gate compiles: each dtype, every update flag, aligned and
    offset (not 16-byte aligned) tensors, one tensor and sixteen."""
    def tensors(dtype, count=2, offset=0):
        storage = torch.empty(count * 5000 + offset, dtype=dtype)
        return [storage[offset + i * 5000:offset + (i + 1) * 5000 - 1000 * (i % 2)] for i in range(count)]

    def rounding(count, stochastic):
        return torch.arange(count + 3, dtype=torch.int64) if stochastic else None

    def averages(count, average_dtype, offset):
        if average_dtype is None:
            return [], None
        return tensors(average_dtype, count, offset), torch.full((count,), 0.1)

    def sgd(dtype, offset=0, count=2, momentum=0.9, first_step=False, nesterov=False, flag=False, stochastic=False,
            average_dtype=None):
        params = tensors(dtype, count, offset)
        sgd_step_(params, tensors(dtype, count, offset), tensors(dtype, count, offset), 0.1, momentum, 0.0, 0.0,
                  nesterov, flag, 0.1, flag, first_step, None, None, None, rounding(count, stochastic),
                  *averages(count, average_dtype, offset))

    def adamw(dtype, offset=0, amsgrad=False, flag=False, lr=0.1, stochastic=False, average_dtype=None):
        params = tensors(dtype, 2, offset)
        steps = [torch.zeros(()) for _ in params]
        adamw_step_(params, tensors(dtype, 2, offset), tensors(dtype, 2, offset), tensors(dtype, 2, offset),
                    tensors(dtype, 2, offset) if amsgrad else [], steps, lr, 0.9, 0.999, 1e-8, 0.01, 0.0, 0.1, flag,
                    amsgrad, flag, None, None, None, rounding(2, stochastic), *averages(2, average_dtype, offset))

    for dtype in _TRITON_DTYPES:
        sgd(dtype)
        adamw(dtype)
        multi_tensor_norm(tensors(dtype))
    sgd(torch.float32, first_step=True, nesterov=True, count=1)
    sgd(torch.float32, momentum=0.0, flag=True, count=16)
    sgd(torch.float32, offset=1)
    adamw(torch.float32, amsgrad=True, flag=True)
    adamw(torch.float32, offset=1, lr=torch.tensor(0.1))
    for dtype in (torch.bfloat16, torch.float16):
        sgd(dtype, stochastic=True, average_dtype=dtype)
        adamw(dtype, amsgrad=True, stochastic=True, average_dtype=torch.float32)
    sgd(torch.float32, momentum=0.0, average_dtype=torch.float32)
    adamw(torch.bfloat16, average_dtype=torch.bfloat16)
    multi_tensor_norm(tensors(torch.float32, offset=1))


# With every pointer of the table 16-byte aligned (ALIGNED) the whole chunks
# must use 128-bit global accesses (see dropout.VECTOR_ACCESS).
VECTOR_ACCESS = {
    "_sgd_kernel": lambda a: {"ld", "st"} if a["ALIGNED"] else set(),
    "_adamw_kernel": lambda a: {"ld", "st"} if a["ALIGNED"] else set(),
    "_sum_of_squares_kernel": lambda a: {"ld"} if a["ALIGNED"] else set(),
}
NEVER_ONE: dict[str, str] = {}
