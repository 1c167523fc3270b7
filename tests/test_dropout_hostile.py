"""Dropout under hostile inputs: NaN and inf propagate exactly as in torch,
bad arguments raise clear errors before any kernel runs, and the bits are
the same for any number of CPU threads (and across runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

import regops
from conftest import (FLOAT_DTYPES, specials, assert_same_floats, same_bits_for_thread_counts, CUDA_DEVICE, HAS_CUDA,
                      reschedule, triton_interpreted)


# --- dropout: NaN and inf --------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_nan_inf_like_torch(backend_device, dtype, p):
    """torch's dropout multiplies by mask * scale, so a dropped NaN stays NaN
    and a dropped inf becomes NaN. With regops' own mask, torch's
    native_dropout_backward (grad * mask * scale, the same elementwise rule as
    torch's forward) is the oracle; p = 0 and p = 1 need no mask at all, so
    there torch.nn.functional.dropout itself is compared."""
    backend, device = backend_device
    if dtype == torch.float64 and device.type == "cuda" and backend == "triton":
        pytest.skip("float64 is a CPU/gradcheck dtype")
    n = 300 if triton_interpreted(backend, device) else 2000
    x = specials(n, dtype, device, seed=int(p * 10)).requires_grad_()
    y, mask = regops.dropout_with_mask(x, p, seed=11)
    keep = regops.unpack_mask(mask, like=x)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    loose = triton_interpreted(backend, device)
    assert_same_floats(y, torch.ops.aten.native_dropout_backward(x.detach(), keep, scale), loose)
    if p in (0.0, 1.0):
        assert_same_floats(y, torch.nn.functional.dropout(x.detach(), p, training=True), loose)
    grad = specials(n, dtype, device, seed=5)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert_same_floats(grad_x, torch.ops.aten.native_dropout_backward(grad, keep, scale), loose)
    assert_same_floats(regops.dropout(x.detach(), p, seed=11, recompute_mask=True), y)


def test_dropout_nan_seed_and_offset_extremes():
    """The largest seed and offset the API accepts, on a size whose counters
    cross the 2^62 offset limit's neighbourhood, still match the reference."""
    from regops import reference
    x = torch.randn(1001)
    for seed in (-(2**63), 2**64 - 1):
        y, mask = regops.dropout_with_mask(x, 0.5, seed=seed, offset=2**62 - 1)
        expected_y, expected_mask = reference.dropout_with_mask(x, 0.5, seed % 2**64, 2**62 - 1)
        assert torch.equal(mask, expected_mask) and torch.equal(y, expected_y)


# --- dropout: errors before any kernel runs -----------------------------------------

def _dropout_error_cases():
    x = torch.randn(100)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    meta_mask = mask.to("meta")
    return [
        (lambda t: regops.dropout(t, 1.5, inplace=True), ValueError, r"p must be in \[0, 1\], got 1.5"),
        (lambda t: regops.dropout(t, float("inf"), inplace=True), ValueError, "p must be in"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, seed=2**64), ValueError, "seed must be None or an integer"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, seed=1.5), ValueError, "seed must be"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, offset=2**62), ValueError, "offset must be"),
        (lambda t: regops.dropout(t.to(torch.int32), 0.5), TypeError, "input must be a floating-point tensor"),
        (lambda t: regops.dropout(t.to(torch.complex64), 0.5), TypeError, "input must be a floating-point tensor"),
        (lambda t: regops.dropout(t.numpy(), 0.5), TypeError, "input must be a torch.Tensor"),
        (lambda t: regops.dropout_backward(t, mask[:-1], 0.5), ValueError, "mask must be a flat uint8 tensor of 16"),
        (lambda t: regops.dropout_backward(t, mask.view(2, 8), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, mask.bool(), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, mask.float(), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, meta_mask, 0.5), ValueError, r"mask must be on grad's device \(cpu\)"),
        (lambda t: regops.dropout_backward(t, mask, -0.1), ValueError, "p must be in"),
        (lambda t: regops.unpack_mask(mask, (200,)), ValueError, "mask must be a flat uint8 tensor of 32 bytes"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64)),
         ValueError, "counter must be an int64 tensor"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)),
         ValueError, r"key must be an int64 tensor of shape \(3, 2\)"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64),
                                        torch.zeros(3, 2, dtype=torch.int64, device="meta")),
         ValueError, "key must be on counter's device"),
    ]


@pytest.mark.parametrize("case", range(len(_dropout_error_cases())))
def test_dropout_bad_arguments_raise_before_any_kernel(case):
    call, error, message = _dropout_error_cases()[case]
    x = torch.randn(100)
    before = x.clone()
    with pytest.raises(error, match=message):
        call(x)
    assert torch.equal(x, before)


def test_raw_ops_reject_a_meta_tensor_mixed_with_real_ones():
    """Bug found here: the fake kernels double as Meta kernels, and the
    dispatcher picks Meta as soon as one argument is a meta tensor, so a meta
    seed or mask next to real CPU tensors returned uninitialized memory."""
    x = torch.randn(100)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    with pytest.raises(RuntimeError, match="mask is on meta but grad is on cpu"):
        torch.ops.regops.dropout_backward(x, mask.to("meta"), 0.5)
    for op in (torch.ops.regops.dropout_forward, torch.ops.regops.dropout_forward_):
        with pytest.raises(RuntimeError, match="seed must be on the input's device"):
            op(x, 0.5, torch.tensor([1], device="meta"), 0, True)
    with pytest.raises(RuntimeError, match="counter and key must be on one device"):
        torch.ops.regops.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64),
                                       torch.zeros(1, 2, dtype=torch.int64, device="meta"))
    # All-meta calls are shape inference and stay allowed.
    out, meta_mask = torch.ops.regops.dropout_forward(x.to("meta"), 0.5, torch.tensor([1], device="meta"), 0, True)
    assert out.device.type == "meta" and meta_mask.shape == mask.shape


def test_forced_backend_rejects_the_wrong_device():
    x = torch.randn(10, device="meta")
    with regops.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' needs CPU tensors, got a tensor on meta"):
        regops.dropout(x, 0.5, seed=1)
    if not HAS_CUDA and "cuda" not in regops.available_backends():
        with pytest.raises(RuntimeError, match="not available"):
            regops.set_backend("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_mask_on_the_cpu_is_refused():
    x = torch.randn(100, device="cuda")
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    with pytest.raises(ValueError, match="mask must be on grad's device"):
        regops.dropout_backward(x, mask.cpu(), 0.5)
    with regops.use_backend("cpu"), pytest.raises(RuntimeError, match="needs CPU tensors"):
        regops.dropout(x, 0.5)


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dropout_same_bits_for_any_thread_count(dtype):
    # 5 parallel tasks of 16K elements on the CPU kernel, plus a partial block.
    x = specials(5 * 16384 + 77, dtype, "cpu", seed=3)
    grad = specials(x.numel(), dtype, "cpu", seed=4)

    def run():
        y, mask = regops.dropout_with_mask(x, 0.3, seed=10, offset=2**32 - 7)
        back = regops.dropout_backward(grad, mask, 0.3)
        inplace = regops.dropout(x.clone(), 0.3, inplace=True, seed=10, offset=2**32 - 7)
        words = regops.philox4x32_10(torch.arange(4000, dtype=torch.int64).view(1000, 4),
                                     torch.arange(2000, dtype=torch.int64).view(1000, 2))
        return y, mask, back, inplace, words

    same_bits_for_thread_counts(run)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_dropout_same_bits_across_gpu_runs(backend):
    """Also under the CUDA simulation, each run with another thread schedule."""
    device = CUDA_DEVICE if backend == "cuda" else ("cuda" if HAS_CUDA else None)
    if device is None or backend not in regops.available_backends():
        pytest.skip(f"{backend} backend not available on a GPU or simulated")
    x = specials((1 << 20) + 3, torch.float32, device)
    with regops.use_backend(backend):
        first = regops.dropout_with_mask(x, 0.4, seed=9)
        for run in range(3):
            reschedule(run + 1)
            again = regops.dropout_with_mask(x, 0.4, seed=9)
            assert_same_floats(again[0], first[0]) and torch.equal(again[1], first[1])
