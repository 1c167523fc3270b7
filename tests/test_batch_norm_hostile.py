"""Batch norm under hostile inputs: NaN and inf as in torch, bad arguments
rejected before any kernel runs, and the same bits for any number of CPU
threads (and across runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

import regops
from conftest import NAN, INF, same_bits_for_thread_counts, CUDA_DEVICE, HAS_CUDA, reschedule, triton_interpreted


# --- batch norm ------------------------------------------------------------------------

HAS_BATCH_NORM = hasattr(regops, "batch_norm")
needs_batch_norm = pytest.mark.skipif(not HAS_BATCH_NORM, reason="regops.batch_norm is not in this build")


def _bn_input_with_specials(shape, layout, seed):
    """Channel 0 clean, channel 1 with one NaN, channel 2 with +inf, channel 3
    with +inf and -inf, channel 4 with one value of 1e4. (Not near the largest
    float32: torch's CPU statistics accumulate in float64 where regops, like
    torch on a GPU, uses float32, in which the square of 1e30 overflows.)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[0, 1].view(-1)[3] = NAN
    x[-1, 2].view(-1)[0] = INF
    x[0, 3].view(-1)[1], x[-1, 3].view(-1)[2] = INF, -INF
    x[0, 4].view(-1)[0] = 1e4
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@needs_batch_norm
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_nan_inf_like_torch(backend_device, training, layout):
    """Where torch's output, running statistics and gradients are NaN or inf,
    regops' are too, and the finite values agree."""
    backend, device = backend_device
    shape = (2, 6, 3, 3) if triton_interpreted(backend, device) else (4, 6, 5, 7)
    x = _bn_input_with_specials(shape, layout, seed=1)
    weight, bias = torch.randn(6), torch.randn(6)
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    running_mean[5], running_var[5] = NAN, INF  # hostile buffers too (they only matter in eval)
    results = []
    for which in ("torch", "regops"):
        xs = x.to(device).detach().clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
        rm, rv = running_mean.clone().to(device), running_var.clone().to(device)
        if which == "torch":
            y = torch.nn.functional.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5)
        else:
            y = regops.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5)
        grads = torch.autograd.grad(y, (xs, w, b), torch.ones_like(y))
        results.append([y, rm, rv, *grads])
    names = ["output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias"]
    for name, got, want in zip(names, results[1], results[0]):
        got, want = got.detach().cpu(), want.detach().cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), name
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), name
        finite = torch.isfinite(want)
        atol = 1e-4
        if name == "grad_weight" and training:
            # sum(dy * x_hat) cancels to ~0 (dy is ones); channel 4's 1e4
            # outlier makes its float32 terms large, and either summation
            # order may lose up to n * eps * sum|dy * x_hat| (plus the same
            # through the mean): the float32 bound per channel, not 1e-4.
            x64 = x.double()
            dims = [0] + list(range(2, x.dim()))
            x_hat = (x64 - x64.mean(dims, keepdim=True)) / (x64.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
            n = x.numel() // x.shape[1]
            bound = 2 * n * torch.finfo(torch.float32).eps * x_hat.abs().sum(dims)
            atol = torch.maximum(bound.float(), torch.full_like(bound.float(), 1e-4))[finite]
            assert ((got[finite] - want[finite]).abs() <= atol + 1e-4 * want[finite].abs()).all(), (name, got, want)
            continue
        torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=1e-4, msg=name)


@needs_batch_norm
def test_batch_norm_bad_arguments_raise_before_any_kernel():
    x = torch.randn(4, 3, 5)
    cases = [
        (dict(input=torch.randn(3)), ValueError, "at least 2 dimensions"),
        (dict(input=torch.ones(4, 3, dtype=torch.int32)), TypeError, "input must be a floating-point tensor"),
        (dict(input=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "floating-point"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(bias=torch.ones(3, 1)), ValueError, r"bias must have shape \(3,\)"),
        (dict(running_mean=torch.zeros(2)), ValueError, r"running_mean must have shape \(3,\)"),
        (dict(running_var=torch.ones(3, dtype=torch.int64)), (TypeError, ValueError), "running_var must be"),
        (dict(running_var=torch.ones(3, dtype=torch.float64)), ValueError, "running_var must be torch.float32"),
        (dict(weight=torch.ones(3, device="meta")), ValueError, "weight is on meta but input is on cpu"),
        (dict(running_mean=torch.zeros(3, device="meta")), ValueError, "running_mean is on meta"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(eps="1e-5"), ValueError, "eps must be a real number"),
        (dict(momentum=None), ValueError, "momentum must be"),
        (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
        (dict(input=torch.randn(1, 3)), ValueError, "Expected more than 1 value per channel when training"),
        (dict(training=False, running_mean=None, running_var=None), ValueError,
         "running_mean and running_var must be given"),
        (dict(running_mean=None), ValueError, "running_mean and running_var must either both be None or neither"),
        (dict(running_var=None), ValueError, "running_mean and running_var must either both be None or neither"),
        (dict(training=False, running_var=None), ValueError, "must either both be None or neither be None"),
    ]
    for overrides, error, message in cases:
        args = dict(input=x, running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3),
                    bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5)
        args.update(overrides)
        activation = args.pop("activation", None)
        before = [t.clone() for t in (args["running_mean"], args["running_var"]) if isinstance(t, torch.Tensor)
                  and t.device.type == "cpu"]
        with pytest.raises(error, match=message):
            regops.batch_norm(**args, activation=activation)
        after = [t for t in (args["running_mean"], args["running_var"]) if isinstance(t, torch.Tensor)
                 and t.device.type == "cpu"]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), overrides
    with pytest.raises(ValueError, match="expected 4D input"):
        regops.nn.BatchNorm2d(3)(x)


@needs_batch_norm
def test_batch_norm_raw_ops_reject_a_meta_tensor_mixed_with_real_ones():
    """The fake kernels double as Meta kernels (see the dropout test above)."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError):
        torch.ops.regops.batch_norm_forward(x, torch.ones(3, device="meta"), None, None, None, True, 1e-5, False)
    with pytest.raises(RuntimeError):
        torch.ops.regops.batch_norm_elementwise(x, torch.zeros(3, device="meta"), torch.ones(3), None, None, False)


@needs_batch_norm
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_same_bits_for_any_thread_count(layout, dtype, training):
    """The per-channel reductions (statistics and gradient sums) must not
    depend on how the work is split between threads."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 8, 33, 35, generator=gen) * 3 + 1).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def run():
        xs = x.clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        rm, rv = torch.zeros(8), torch.ones(8)
        y = regops.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5, activation="relu")
        return (y, rm, rv, *torch.autograd.grad(y, (xs, w, b), grad))

    same_bits_for_thread_counts(run)


@needs_batch_norm
@pytest.mark.skipif(CUDA_DEVICE is None, reason="needs a CUDA device or REGOPS_CUDA_SIM=1")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_same_bits_across_gpu_runs(layout):
    """Also under the CUDA simulation, each run with another thread schedule.
    The reductions split each channel over several blocks either way (25,088
    values per channel on a GPU, 12,544 on the simulation, whose 8 channels
    keep it to seconds)."""
    x = torch.randn(*((32, 64, 28, 28) if HAS_CUDA else (16, 8, 28, 28)), device=CUDA_DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    results = []
    for run in range(3):
        reschedule(run + 1)
        xs = x.clone().requires_grad_()
        with regops.use_backend("cuda"):
            y = regops.batch_norm(xs, None, None, None, None, True)
        results.append((y, *torch.autograd.grad(y, xs, grad)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
