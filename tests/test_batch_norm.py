"""Batch normalization: every backend against torch.nn.functional.batch_norm
(output, every gradient, the running statistics), the SyncBatchNorm building
blocks, the modules, autograd, torch.library checks, torch.compile and the
errors users see."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import regops
from regops import reference
from conftest import (HAS_CUDA, TRITON_OPCHECK_UTILS, assert_batch_norm_close, assert_batch_norm_results,
                      compile_backend_devices, cuda_simulated, native_op_targets, triton_interpreted)

# Odd shapes: C = 1, 3, 7; spatial 1, 7x7, 13x17; N = 2, 3.
SHAPES = [(2, 3), (3, 7, 1, 1), (2, 1, 7, 7), (3, 3, 13, 17), (2, 7, 7, 7), (3, 7, 13, 17), (2, 3, 11), (2, 3, 3, 5, 7)]
# The interpreter is slow: a few shapes, still covering both layouts and 1-D.
TRITON_SHAPES = [(2, 3), (2, 3, 5, 7), (3, 7, 1, 1)]


def _layouts(shape):
    """The memory formats to try: contiguous, and channels_last where it exists."""
    if len(shape) == 4:
        return [torch.contiguous_format, torch.channels_last]
    if len(shape) == 5:
        return [torch.contiguous_format, torch.channels_last_3d]
    return [torch.contiguous_format]


def _cases(backend, device):
    shapes = TRITON_SHAPES if triton_interpreted(backend, device) else SHAPES
    return [(shape, layout) for shape in shapes for layout in _layouts(shape)]


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shape, dtype, layout, device, gen):
    """Input with a channel-dependent offset and scale, and float32 params."""
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + torch.rand(view, generator=gen, dtype=torch.float64) * 3)
    x = x + torch.randn(view, generator=gen, dtype=torch.float64) * 4
    x = x.to(dtype).to(device).contiguous(memory_format=layout)
    pdtype = _param_dtype(dtype)
    weight = (torch.randn(channels, generator=gen, dtype=pdtype)).to(device)
    bias = torch.randn(channels, generator=gen, dtype=pdtype).to(device)
    running_mean = torch.randn(channels, generator=gen, dtype=pdtype).to(device)
    running_var = (torch.rand(channels, generator=gen, dtype=pdtype) + 0.5).to(device)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device).contiguous(memory_format=layout)
    return x, weight, bias, running_mean, running_var, grad


def _torch_float64(x, weight, bias, running_mean, running_var, grad, training, relu, momentum=0.1):
    """torch.nn.functional.batch_norm on float64 copies: output, grads, running stats."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    rm, rv = running_mean.double().clone(), running_var.double().clone()
    y = F.batch_norm(x64, rm, rv, w64, b64, training, momentum, 1e-5)
    if relu:
        y = torch.relu(y)
    gx, gw, gb = torch.autograd.grad(y, (x64, w64, b64), grad.double())
    return y, gx, gw, gb, rm, rv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch(backend_device, dtype, relu, training):
    backend, device = backend_device
    if triton_interpreted(backend, device) and (dtype in (torch.float16, torch.float64) or not training and relu):
        pytest.skip("the interpreter runs a few representative cases only")
    gen = torch.Generator().manual_seed(len(str(dtype)) * 4 + 2 * relu + training)
    for shape, layout in _cases(backend, device):
        x, weight, bias, running_mean, running_var, grad = _make(shape, dtype, layout, device, gen)
        expected = _torch_float64(x, weight, bias, running_mean, running_var, grad, training, relu)
        x.requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y = regops.batch_norm(x, running_mean, running_var, w, b, training, 0.1, 1e-5,
                              activation="relu" if relu else None)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad)
        case = f"{backend} {shape} {layout} {dtype} relu={relu} training={training}"
        assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == weight.dtype
        if len(shape) > 2 and layout != torch.contiguous_format:
            assert y.is_contiguous(memory_format=layout), case
        assert_batch_norm_results(("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"),
                                  (y, gx, gw, gb, running_mean, running_var), expected, dtype,
                                  x.numel() // shape[1], case)


def test_statistics_stable_far_from_zero(backend_device):
    """A large common offset: E[x^2] - E[x]^2 in float32 would lose the variance entirely."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 2, 9, 11)] if triton_interpreted(backend, device) else [(4, 3, 30, 31), (64, 5)]
    # Every kernel sums deviations from a shift near the mean (the CUDA one:
    # the channel's first element), so the variance keeps its digits at
    # |mean| / std = 3e5.
    var_rtol = 1e-3
    for shape in shapes:
        for layout in _layouts(shape):
            x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01 + 3000.0
            x = x64.float().to(device).contiguous(memory_format=layout)
            mean, var = regops.batch_norm_stats(x)
            dims = [0] + list(range(2, len(shape)))
            torch.testing.assert_close(var.cpu().double(), x.cpu().double().var(dims, unbiased=False), rtol=var_rtol,
                                       atol=0)
            torch.testing.assert_close(mean.cpu().double(), x.cpu().double().mean(dims), rtol=1e-6, atol=0)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_gradcheck_float64(backend_device, relu):
    backend, device = backend_device
    activation = "relu" if relu else None
    gen = torch.Generator().manual_seed(3)
    interpreted = triton_interpreted(backend, device)
    # Under the interpreter every kernel launch is slow: one small case.
    shape = (2, 2, 2, 2) if interpreted else (3, 2, 3, 2)
    for layout in (torch.channels_last,) if interpreted else (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).contiguous(memory_format=layout)
        w = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        b = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        rm, rv = torch.zeros(2, dtype=torch.float64, device=device), torch.ones(2, dtype=torch.float64, device=device)
        for training in (True,) if interpreted else (True, False):
            args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())
            assert torch.autograd.gradcheck(
                lambda t, w_, b_: regops.batch_norm(t, rm.clone(), rv.clone(), w_, b_, training, activation=activation),
                args)
        if not interpreted:  # without affine parameters
            assert torch.autograd.gradcheck(
                lambda t: regops.batch_norm(t, None, None, training=True, activation=activation),
                (x.clone().requires_grad_(),))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_gradgradcheck_float64(backend_device, relu):
    """Second derivatives (gradient penalties, Hessian-vector products) of
    every input, in training and eval, with and without the affine
    parameters. The fused ReLU's mask is constant almost everywhere, so its
    second derivative is that of the masked batch norm."""
    backend, device = backend_device
    activation = "relu" if relu else None
    gen = torch.Generator().manual_seed(13)
    interpreted = triton_interpreted(backend, device)
    # The double backward is plain torch ops; the kernels run in each of
    # gradgradcheck's many first-order evaluations, which the simulation and
    # the interpreter pay per launch: 4 elements per channel and only the
    # affine case there (gradcheck covers their kernels without the affine
    # parameters; the double backward without them is the same torch code,
    # checked here on the other backends).
    simulated = cuda_simulated(backend, device)
    shape = (2, 2, 2, 2) if interpreted else (2, 2, 2, 1) if simulated else (3, 2, 3, 2)
    layouts = (torch.channels_last,) if interpreted else (torch.contiguous_format, torch.channels_last)
    for layout in layouts:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).contiguous(memory_format=layout)
        w = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        b = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        rm = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)
        for training in (True, False):
            leaves = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())
            assert torch.autograd.gradgradcheck(
                lambda t, w_, b_: regops.batch_norm(t, rm.clone(), rv.clone(), w_, b_, training,
                                                    activation=activation), leaves)
            if interpreted or simulated:
                continue
            # Without weight, and without both affine parameters.
            assert torch.autograd.gradgradcheck(
                lambda t, b_: regops.batch_norm(t, rm.clone(), rv.clone(), None, b_, training,
                                                activation=activation), leaves[::2])
            assert torch.autograd.gradgradcheck(
                lambda t: regops.batch_norm(t, None if training else rm.clone(), None if training else rv.clone(),
                                            training=training, activation=activation), leaves[:1])


def test_second_derivative_matches_torch(backend_device):
    """A gradient penalty, the norm of d loss / d x, differentiated again:
    against torch.nn.functional.batch_norm on the same float32 input."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(14)
    x, w, b, _, _, grad = _make((3, 4, 3, 5), torch.float32, torch.channels_last, device, gen)
    results = []
    for fn in (lambda *args: torch.relu(F.batch_norm(*args)),
               lambda *args: regops.batch_norm(*args, activation="relu")):
        leaves = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())
        y = fn(leaves[0], None, None, leaves[1], leaves[2], True)
        (grad_x,) = torch.autograd.grad(y, leaves[0], grad, create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), leaves, allow_unused=True, materialize_grads=True))
    # The bias only moves the ReLU's mask: its second derivative is zero.
    assert results[0][0].abs().max() > 0 and results[0][1].abs().max() > 0
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_building_blocks_compose_to_the_fused_op(backend_device):
    """stats -> elementwise equals the fused forward; backward_reduce ->
    backward_elementwise equals the fused backward; and splitting the batch in
    two "ranks" whose statistics and gradient sums are combined gives the
    single-device result, as a SyncBatchNorm will do with all-reduces."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(11)
    shape = (4, 3, 5, 7) if triton_interpreted(backend, device) else (6, 5, 9, 11)
    for layout in (torch.contiguous_format, torch.channels_last):
        for activation in (None, "relu"):
            x, w, b, _, _, grad = _make(shape, torch.float32, layout, device, gen)
            x_leaf = x.clone().requires_grad_()
            w_leaf, b_leaf = w.clone().requires_grad_(), b.clone().requires_grad_()
            fused = regops.batch_norm(x_leaf, None, None, w_leaf, b_leaf, True, 0.1, 1e-5, activation=activation)
            fused_grads = torch.autograd.grad(fused, (x_leaf, w_leaf, b_leaf), grad)

            mean, var = regops.batch_norm_stats(x)
            invstd = torch.rsqrt(var + 1e-5)
            y = regops.batch_norm_elementwise(x, mean, invstd, w, b, activation=activation)
            assert y.is_contiguous(memory_format=layout)
            torch.testing.assert_close(y, fused, atol=1e-5, rtol=1e-5)
            sum_dy, sum_dy_xmu = regops.batch_norm_backward_reduce(grad, x, mean, invstd, w, b, activation=activation)
            count = x.numel() // shape[1]
            gx = regops.batch_norm_backward_elementwise(grad, x, mean, invstd, w, b, sum_dy, sum_dy_xmu, count,
                                                        activation=activation)
            torch.testing.assert_close(gx, fused_grads[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sum_dy_xmu * invstd, fused_grads[1], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(sum_dy, fused_grads[2], atol=1e-4, rtol=1e-5)

            # Two "ranks" of 2 and N - 2 samples: combine (mean, var, count) by
            # the parallel-variance formula and add the gradient sums.
            parts = [x[:2], x[2:]]
            grads = [grad[:2], grad[2:]]
            stats = [regops.batch_norm_stats(p) for p in parts]
            counts = [p.numel() // shape[1] for p in parts]
            total = sum(counts)
            global_mean = sum(m * c for (m, _), c in zip(stats, counts)) / total
            global_var = sum((v + (m - global_mean) ** 2) * c for (m, v), c in zip(stats, counts)) / total
            torch.testing.assert_close(global_mean, mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(global_var, var, atol=1e-5, rtol=1e-4)
            global_invstd = torch.rsqrt(global_var + 1e-5)
            sums = [regops.batch_norm_backward_reduce(g, p, global_mean, global_invstd, w, b, activation=activation)
                    for g, p in zip(grads, parts)]
            all_dy = sums[0][0] + sums[1][0]
            all_dy_xmu = sums[0][1] + sums[1][1]
            pieces = [regops.batch_norm_backward_elementwise(g, p, global_mean, global_invstd, w, b, all_dy, all_dy_xmu,
                                                             total, activation=activation) for g, p in zip(grads, parts)]
            torch.testing.assert_close(torch.cat(pieces), fused_grads[0], atol=1e-5, rtol=1e-4)


def test_building_blocks_match_reference(backend_device):
    """Each block against its pure-torch definition, 16-bit inputs included."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32] if triton_interpreted(backend, device) else [torch.float32, torch.bfloat16, torch.float16]
    for dtype in dtypes:
        x, w, b, _, _, grad = _make((3, 5, 4, 6), dtype, torch.channels_last, device, gen)
        mean, var = regops.batch_norm_stats(x)
        ref_mean, ref_var = reference.batch_norm_stats(x)
        assert_batch_norm_close(mean, ref_mean, torch.float32, "mean")
        assert_batch_norm_close(var, ref_var, torch.float32, "var", scale=10)
        invstd = torch.rsqrt(ref_var + 1e-5)
        for relu in (False, True):
            act = "relu" if relu else None
            assert_batch_norm_close(regops.batch_norm_elementwise(x, ref_mean, invstd, w, None, activation=act),
                                    reference.batch_norm_elementwise(x, ref_mean, invstd, w, None, relu), dtype,
                                    "elementwise")
            sums = regops.batch_norm_backward_reduce(grad, x, ref_mean, invstd, w, b, activation=act)
            ref_sums = reference.batch_norm_backward_reduce(grad, x, ref_mean, invstd, w, b, relu)
            for got, want in zip(sums, ref_sums):
                assert_batch_norm_close(got, want, torch.float32, "backward_reduce", scale=30)
            got = regops.batch_norm_backward_elementwise(grad, x, ref_mean, invstd, None, b, *ref_sums, 72,
                                                         activation=act)
            want = reference.batch_norm_backward_elementwise(grad, x, ref_mean, invstd, None, b, *ref_sums, 72, relu)
            assert_batch_norm_close(got, want, dtype, "backward_elementwise")


def test_grad_out_in_another_layout(backend_device):
    """A contiguous grad for a channels_last input (autograd may hand either)."""
    _, device = backend_device
    gen = torch.Generator().manual_seed(4)
    x, w, b, _, _, grad = _make((2, 3, 5, 4), torch.float32, torch.channels_last, device, gen)
    x.requires_grad_()
    y = regops.batch_norm(x, None, None, w, b, True)
    (gx,) = torch.autograd.grad(y, x, grad.contiguous())
    (gx_same,) = torch.autograd.grad(regops.batch_norm(x, None, None, w, b, True), x, grad)
    torch.testing.assert_close(gx, gx_same)


def test_non_dense_input_is_normalized_in_logical_order(backend_device):
    _, device = backend_device
    base = torch.randn(4, 6, 10, 9, device=device)
    x = base[:, ::2, 1:8].transpose(2, 3)
    y = regops.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)


def test_empty_batch_leaves_running_stats(backend_device):
    _, device = backend_device
    x = torch.empty(0, 3, 4, device=device, requires_grad=True)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 1
    rm0, rv0 = rm.clone(), rv.clone()
    y = regops.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_nan_propagates_like_torch(backend_device):
    """A NaN poisons its channel's statistics, and the fused ReLU keeps NaN (torch.relu does)."""
    _, device = backend_device
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=layout)
        x[1, 2, 3, 1] = float("nan")
        x = x.to(device)
        for activation in (None, "relu"):
            y = regops.batch_norm(x, None, None, training=True, activation=activation)
            expected = F.batch_norm(x, None, None, training=True)
            if activation:
                expected = torch.relu(expected)
            assert torch.equal(torch.isnan(y), torch.isnan(expected))
            assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, :2]).any()


INF = float("inf")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_infinite_values_give_torch_statistics(backend_device, layout):
    """The mean of a channel holding +inf is +inf (-inf: -inf, both: NaN) and
    its variance NaN, as torch's sum(x) / n and mean((x - mean)^2): in
    batch_norm_stats, in the running statistics and in the output. Channels
    of 25 x 25 x 2 values span more than one block of every reduction, with
    the infinity in the first."""
    _, device = backend_device
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 5, 25, 25, generator=gen)
    x[0, 1, 0, 0] = INF
    x[1, 2, 24, 3] = -INF
    x[0, 3, 0, 1], x[1, 3, 7, 7] = INF, -INF
    x[0, 4, 0, 0], x[1, 4, 0, 0] = INF, INF
    x = x.to(device).contiguous(memory_format=layout)
    mean, var = regops.batch_norm_stats(x)
    expected_mean, expected_var = x.mean((0, 2, 3)), (x - x.mean((0, 2, 3), keepdim=True)).square().mean((0, 2, 3))
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    y = regops.batch_norm(x, rm, rv, training=True)
    torch_rm, torch_rv = torch.zeros(5), torch.ones(5)
    expected_y = F.batch_norm(x.cpu(), torch_rm, torch_rv, training=True)
    for name, got, want in [("mean", mean, expected_mean), ("var", var, expected_var), ("running_mean", rm, torch_rm),
                            ("running_var", rv, torch_rv), ("output", y, expected_y)]:
        got, want = got.cpu(), want.cpu()
        for check in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(check(got), check(want)), f"{name}: {got} != {want}"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.isposinf(mean[1]) and torch.isneginf(mean[2]) and mean[3].isnan() and torch.isposinf(mean[4])
    assert var[1:].isnan().all() and torch.isfinite(mean[0]) and torch.isfinite(var[0])


@pytest.mark.parametrize("parameter,buffer", [("weight", "running_mean"), ("bias", "running_var"),
                                              ("weight", "running_var"), ("bias", "running_mean")])
def test_parameter_that_is_a_running_buffer_follows_torch(backend_device, parameter, buffer):
    """A weight or bias passed as a running buffer too (the same tensor, or a
    view of it): torch updates the buffer first and normalizes with the
    updated value; every backend does the same."""
    _, device = backend_device
    gen = torch.Generator().manual_seed(16)
    x, weight, bias, running_mean, running_var, grad = _make((3, 4, 5, 3), torch.float32, torch.channels_last, device,
                                                             gen)
    results = []
    for fn, view in ((F.batch_norm, False), (regops.batch_norm, False), (regops.batch_norm, True)):
        args = {"weight": weight.clone(), "bias": bias.clone(), "running_mean": running_mean.clone(),
                "running_var": running_var.clone()}
        args[parameter] = args[buffer][:] if view else args[buffer]
        leaf = x.clone().requires_grad_()
        y = fn(leaf, args["running_mean"], args["running_var"], args["weight"], args["bias"], True, 0.5)
        (grad_x,) = torch.autograd.grad(y, leaf, grad)
        results.append((y, grad_x, args["running_mean"], args["running_var"]))
    for got in results[1:]:
        for name, value, want in zip(("output", "grad_input", "running_mean", "running_var"), got, results[0]):
            assert_batch_norm_close(value, want, torch.float32, f"{name} with {parameter} = {buffer}", scale=4)


def test_thread_count_does_not_change_the_result():
    gen = torch.Generator().manual_seed(6)
    threads = torch.get_num_threads()
    for layout in (torch.contiguous_format, torch.channels_last):
        x, w, b, _, _, grad = _make((8, 16, 20, 20), torch.float32, layout, "cpu", gen)
        results = []
        try:
            for count in (1, max(2, threads)):
                torch.set_num_threads(count)
                out = torch.ops.regops.batch_norm_forward(x, w, b, None, None, True, 1e-5, True)
                results.append(out[:3] + torch.ops.regops.batch_norm_backward(grad, x, w, b, out[1], out[2], True, True))
        finally:
            torch.set_num_threads(threads)
        for one, many in zip(*results):
            assert torch.equal(one, many)


# --- modules -------------------------------------------------------------------------

MODULES = [(regops.nn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4, 5)), (regops.nn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
           (regops.nn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 5, 6)),
           (regops.nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 3, 5, 2))]


@pytest.mark.parametrize("ours,theirs,shape", MODULES, ids=["1d", "1d-2dim", "2d", "3d"])
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=["default", "cumulative", "untracked", "no-affine"])
def test_module_matches_torch(ours, theirs, shape, options):
    torch.manual_seed(0)
    reference_module = theirs(4, **options)
    module = ours(4, **options)
    if reference_module.affine:
        with torch.no_grad():
            reference_module.weight.normal_()
            reference_module.bias.normal_()
    module.load_state_dict(reference_module.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        x_ours = x.clone().requires_grad_()
        x_theirs = x.clone().requires_grad_()
        y, y_ref = module(x_ours), reference_module(x_theirs)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-4, rtol=1e-4)
    for (name, value), (ref_name, ref_value) in zip(module.state_dict().items(), reference_module.state_dict().items()):
        assert name == ref_name
        torch.testing.assert_close(value, ref_value, atol=1e-5, rtol=1e-5)
    if reference_module.affine:
        torch.testing.assert_close(module.weight.grad, reference_module.weight.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(module.bias.grad, reference_module.bias.grad, atol=1e-3, rtol=1e-4)
    module.eval()
    reference_module.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(module(x), reference_module(x), atol=1e-5, rtol=1e-5)


def test_module_relu_and_repr():
    module = regops.nn.BatchNorm2d(3, activation="relu")
    assert repr(module) == repr(torch.nn.BatchNorm2d(3))[:-1] + ", activation='relu')"
    assert repr(regops.nn.BatchNorm2d(3)) == repr(torch.nn.BatchNorm2d(3))
    assert isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(module, regops.nn._BatchNorm)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(module(x), torch.relu(F.batch_norm(x, None, None, training=True)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        regops.nn.BatchNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="expected 4D input"):
        module(torch.randn(4, 3, 5))


def test_state_dict_round_trips():
    torch.manual_seed(1)
    theirs = torch.nn.BatchNorm2d(5)
    theirs(torch.randn(4, 5, 3, 3))
    ours = regops.nn.BatchNorm2d(5)
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours(torch.randn(4, 5, 3, 3))
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 2
    # A state_dict from before num_batches_tracked existed loads as torch's does.
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict(old, strict=False)


def test_bfloat16_module_and_parameters():
    """A model moved to bfloat16 has bfloat16 parameters and buffers: accepted, stats kept in bfloat16."""
    module = regops.nn.BatchNorm2d(3).to(torch.bfloat16)
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16).requires_grad_()
    y = module(x)
    y.sum().backward()
    expected = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    torch.testing.assert_close(y, expected(x.detach()), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(module.running_mean, expected.running_mean, atol=1e-2, rtol=1e-2)
    assert module.weight.grad.dtype == torch.bfloat16


# --- torch.library and torch.compile -----------------------------------------------

def _opcheck_args(device="cpu"):
    gen = torch.Generator().manual_seed(9)
    x, w, b, rm, rv, grad = _make((3, 4, 5, 3), torch.float64, torch.channels_last, device, gen)
    mean, var = torch.ops.regops.batch_norm_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sum_dy, sum_dy_xmu = reference.batch_norm_backward_reduce(grad, x, mean, invstd, w, b, True)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        ("batch_norm_forward", (leaf(x), leaf(w), leaf(b), rm, rv, True, 1e-5, False)),
        ("batch_norm_forward", (leaf(x), None, None, None, None, True, 1e-5, True)),
        ("batch_norm_forward", (leaf(x), leaf(w), leaf(b), rm, rv, False, 1e-5, True)),
        ("batch_norm_backward", (grad, x, w, b, mean, invstd, True, True)),
        ("batch_norm_backward", (leaf(grad), leaf(x), leaf(w), b, leaf(mean), leaf(invstd), True, False)),
        ("batch_norm_backward", (leaf(grad), leaf(x), leaf(w), leaf(b), mean, invstd, False, True)),
        ("batch_norm_stats", (x,)),
        ("batch_norm_elementwise", (x, mean, invstd, w, None, True)),
        ("batch_norm_backward_reduce", (grad, x, mean, invstd, w, b, True)),
        ("batch_norm_backward_elementwise", (grad, x, mean, invstd, w, b, sum_dy, sum_dy_xmu, 45, False)),
    ]


@pytest.mark.parametrize("namespace, device", native_op_targets())
def test_opcheck_native_ops(namespace, device):
    for name, args in _opcheck_args(device):
        opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


def test_opcheck_triton_ops():
    """On a GPU every opcheck test runs; under the interpreter only the schema
    and autograd registration checks (it runs kernels even on fake tensors)."""
    if "triton" not in regops.available_backends():
        pytest.skip("triton backend not available")
    device = "cuda" if HAS_CUDA else "cpu"
    for name, args in _opcheck_args(device):
        opcheck(getattr(torch.ops.regops, f"triton_{name}").default, args, test_utils=TRITON_OPCHECK_UTILS)


class _ConvBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = regops.nn.BatchNorm2d(8, activation="relu")
        self.norm2 = regops.nn.BatchNorm2d(8, momentum=None)

    def forward(self, x):
        return self.norm2(self.norm(self.conv(x)))


@pytest.mark.parametrize("backend,device", compile_backend_devices())
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_torch_compile_fullgraph_matches_eager(backend, device, layout):
    torch._dynamo.reset()
    torch.manual_seed(0)
    with regops.use_backend(backend):
        eager_model = _ConvBlock().to(device)
        compiled_model = _ConvBlock().to(device)
        compiled_model.load_state_dict(eager_model.state_dict())
        compiled = torch.compile(compiled_model, fullgraph=True)
        for _ in range(2):
            x = torch.randn(4, 3, 6, 6, device=device).contiguous(memory_format=layout).requires_grad_()
            eager = eager_model(x)
            (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
            out = compiled(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, eager_grad, atol=1e-4, rtol=1e-4)
        for (name, value), ref in zip(compiled_model.state_dict().items(), eager_model.state_dict().values()):
            torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5, msg=name)
        assert int(compiled_model.norm.num_batches_tracked) == 2
        compiled_model.eval()
        eager_model.eval()
        x = torch.randn(4, 3, 6, 6, device=device)
        torch.testing.assert_close(compiled(x), eager_model(x), atol=1e-5, rtol=1e-5)


# --- errors ----------------------------------------------------------------------------

def test_one_value_per_channel_in_training_raises_value_error(backend_device):
    _, device = backend_device
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        regops.batch_norm(torch.randn(1, 3, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        regops.nn.BatchNorm2d(3).to(device)(torch.randn(1, 3, 1, 1, device=device))
    # Eval mode needs no batch statistics.
    module = regops.nn.BatchNorm2d(3).to(device).eval()
    assert module(torch.randn(1, 3, 1, 1, device=device)).shape == (1, 3, 1, 1)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3, 5)
    ones, zeros = torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        regops.batch_norm(x, torch.zeros(4), ones, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        regops.batch_norm(x, zeros, ones, torch.ones(2))
    with pytest.raises(ValueError, match="running_var is on meta but input is on cpu"):
        regops.batch_norm(x, zeros, torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="running_mean must be torch.float32"):
        regops.batch_norm(x, zeros.to(torch.float16), ones)
    with pytest.raises(ValueError, match="input must have at least 2 dimensions"):
        regops.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        regops.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        regops.batch_norm(x, None, None, training=True, activation="tanh")
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        regops.batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        regops.batch_norm_backward_elementwise(x, x, zeros, ones, None, None, zeros, zeros, 0)
    with pytest.raises(ValueError, match="grad_out must match input"):
        regops.batch_norm_backward_reduce(x[:2], x, zeros, ones)
    # The C++ entries check too, for callers of torch.ops directly.
    with pytest.raises(RuntimeError, match="running_mean must be a 1-D tensor of 3 elements"):
        torch.ops.regops.batch_norm_forward(x, None, None, torch.zeros(4), None, True, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight must be Double for a Double input, got Float"):
        torch.ops.regops.batch_norm_forward(x.double(), ones, None, None, None, True, 1e-5, False)
    with pytest.raises(RuntimeError, match="input must have at least 2 dimensions"):
        torch.ops.regops.batch_norm_stats(torch.randn(5))
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel"):
        torch.ops.regops.batch_norm_forward(torch.randn(1, 3), None, None, None, None, True, 1e-5, False)
    with pytest.raises(RuntimeError, match="running_mean and running_var must either both be None or neither"):
        torch.ops.regops.batch_norm_forward(x, None, None, zeros, None, True, 1e-5, False)
    with pytest.raises(RuntimeError, match="grad_out must have the input's shape"):
        torch.ops.regops.batch_norm_backward(x[:2], x, None, None, zeros, ones, True, False)


# --- hostile layouts: strides on size-1 dims, strided side tensors, many partials ------

def _odd_stride_inputs():
    """Tensors torch calls contiguous (or channels_last) whose size-1 dims
    carry strides that say nothing about the layout: a transposed size-1
    dim, a stride-0 size-1 channel dim, and a channels_last tensor with W = 1."""
    base = torch.randn(4, 3, 1, 8, dtype=torch.float64)
    single_channel = torch.randn(5, 1, 6, dtype=torch.float64).as_strided((5, 1, 6), (6, 0, 1))
    channels_last = torch.randn(3, 5, 4, 1, dtype=torch.float64).to(memory_format=torch.channels_last)
    channels_last = channels_last.as_strided(channels_last.shape, (20, 1, 5, 77))
    return [base.transpose(2, 3), single_channel, channels_last]


@pytest.mark.parametrize("case", range(3), ids=["transposed-size-1", "stride-0-channel", "channels-last-w1"])
def test_arbitrary_strides_on_size_1_dims(backend_device, case):
    """The statistics, the backward sums and both elementwise passes of an
    input (and grad_out) with arbitrary strides on its size-1 dims equal
    those of the same values laid out plainly."""
    backend, device = backend_device
    x = _odd_stride_inputs()[case].to(device)
    assert x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(case)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device).as_strided(x.shape, x.stride())
    plain_x, plain_grad = x.clone(memory_format=torch.contiguous_format), grad.clone(memory_format=torch.contiguous_format)
    c = x.shape[1]
    weight, bias = torch.randn(c, generator=gen, dtype=torch.float64).to(device), torch.rand(c, dtype=torch.float64).to(device)
    mean, var = regops.batch_norm_stats(x)
    want_mean, want_var = reference.batch_norm_stats(plain_x)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    invstd = torch.rsqrt(want_var + 1e-5)
    sums = regops.batch_norm_backward_reduce(grad, x, want_mean, invstd, weight, bias, activation="relu")
    for got, want in zip(sums, reference.batch_norm_backward_reduce(plain_grad, plain_x, want_mean, invstd, weight,
                                                                    bias, relu=True)):
        torch.testing.assert_close(got, want)
    y = regops.batch_norm_elementwise(x, want_mean, invstd, weight, bias)
    torch.testing.assert_close(y, reference.batch_norm_elementwise(plain_x, want_mean, invstd, weight, bias))
    dx = regops.batch_norm_backward_elementwise(grad, x, want_mean, invstd, weight, bias, *sums, 7)
    torch.testing.assert_close(dx, reference.batch_norm_backward_elementwise(plain_grad, plain_x, want_mean, invstd,
                                                                             weight, bias, *sums, 7))


def test_strided_per_channel_tensors(backend_device):
    """mean, invstd, weight, bias, sum_dy and sum_dy_xmu given as views with
    stride 2 (weight[::2]) read their own elements."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 5, 2, 3, generator=gen).to(device).contiguous(memory_format=layout)
        grad = torch.randn(x.shape, generator=gen).to(device).contiguous(memory_format=layout)
        wide = [torch.randn(10, generator=gen).to(device) for _ in range(6)]
        wide[1] = wide[1].abs() + 0.5  # invstd
        strided = [t[::2] for t in wide]
        plain = [t.contiguous() for t in strided]
        y = regops.batch_norm_elementwise(x, *strided[:4], activation="relu")
        torch.testing.assert_close(y, reference.batch_norm_elementwise(x, *plain[:4], relu=True))
        sums = regops.batch_norm_backward_reduce(grad, x, *strided[:4])
        for got, want in zip(sums, reference.batch_norm_backward_reduce(grad, x, *plain[:4])):
            torch.testing.assert_close(got, want)
        dx = regops.batch_norm_backward_elementwise(grad, x, *strided, 1)
        torch.testing.assert_close(dx, reference.batch_norm_backward_elementwise(grad, x, *plain, 1))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_triton_reductions_merge_many_partials_in_a_fixed_order(monkeypatch, layout):
    """With each channel split over many programs (one row each) the merged
    statistics and sums match float64, and a second run gives the same bits."""
    if "triton" not in regops.available_backends():
        pytest.skip("needs the triton backend")
    from regops.triton import batch_norm as triton_batch_norm

    monkeypatch.setattr(triton_batch_norm, "MIN_ELEMENTS_PER_PROGRAM", 1)
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 5, 3, 3, generator=gen) * 3 + 100).to(device).contiguous(memory_format=layout)
    grad = torch.randn(x.shape, generator=gen).to(device).contiguous(memory_format=layout)
    geometry = triton_batch_norm._prepare(x)[2]
    assert geometry.splits == geometry.outer > 1
    with regops.use_backend("triton"):
        runs = []
        for _ in range(2):
            mean, var = regops.batch_norm_stats(x)
            runs.append((mean, var, *regops.batch_norm_backward_reduce(grad, x, mean, torch.rsqrt(var + 1e-5))))
    want_mean, want_var = reference.batch_norm_stats(x.double())
    torch.testing.assert_close(runs[0][0].double(), want_mean, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(runs[0][1].double(), want_var, atol=1e-5, rtol=1e-5)
    want_sums = reference.batch_norm_backward_reduce(grad.double(), x.double(), runs[0][0].double(),
                                                     torch.rsqrt(runs[0][1].double() + 1e-5))
    for got, want in zip(runs[0][2:], want_sums):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_elementwise_passes_split_long_rows(monkeypatch):
    """A batch of one NCHW image: the normalize and grad_input passes cut each
    channel's row into several runs of tiles, and match the reference."""
    if "triton" not in regops.available_backends():
        pytest.skip("needs the triton backend")
    from regops.triton import batch_norm as triton_batch_norm

    monkeypatch.setattr(triton_batch_norm, "MIN_ELEMENTS_PER_PROGRAM", 16)
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(1, 2, 40, 64, generator=gen) * 2 + 3).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    weight, bias = torch.randn(2, generator=gen).to(device), torch.randn(2, generator=gen).to(device)
    (_, _, runs), _, _ = triton_batch_norm._prepare(x)[2].elementwise_split()
    assert runs == 3  # 2560 elements a row, tiles of 1024
    mean, var = reference.batch_norm_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sums = reference.batch_norm_backward_reduce(grad, x, mean, invstd, weight, bias, relu=True)
    with regops.use_backend("triton"):
        y = regops.batch_norm_elementwise(x, mean, invstd, weight, bias, activation="relu")
        dx = regops.batch_norm_backward_elementwise(grad, x, mean, invstd, weight, bias, *sums, x.numel() // 2,
                                                    activation="relu")
    torch.testing.assert_close(y, reference.batch_norm_elementwise(x, mean, invstd, weight, bias, relu=True))
    torch.testing.assert_close(dx, reference.batch_norm_backward_elementwise(grad, x, mean, invstd, weight, bias,
                                                                             *sums, x.numel() // 2, relu=True))


@pytest.mark.parametrize("values,mean", [((1.0, float("inf")), float("inf")), ((float("-inf"), 2.0), float("-inf")),
                                         ((float("inf"), float("-inf")), float("nan"))], ids=["+inf", "-inf", "both"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_triton_statistics_of_infinite_values_are_torchs(monkeypatch, values, mean, layout):
    """torch's mean of a batch holding +inf is +inf (so is its running mean),
    -inf for -inf, NaN for both; the variance is NaN. Also when the infinite
    values fall into partials merged from several programs."""
    if "triton" not in regops.available_backends():
        pytest.skip("needs the triton backend")
    from regops.triton import batch_norm as triton_batch_norm

    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(4, 2, 3, 3)
    x[1, 0, 0, 1], x[3, 0, 2, 2] = values
    x[2, 0, 1, 1] = values[0]
    x = x.to(device).contiguous(memory_format=layout)
    torch_mean, torch_var = torch.zeros(2, device=device), torch.ones(2, device=device)
    F.batch_norm(x, torch_mean, torch_var, training=True)
    assert torch.equal(torch_mean[0].isnan(), torch.tensor(mean).isnan()) and (mean != mean or torch_mean[0] == mean)
    for minimum in (4096, 1):
        monkeypatch.setattr(triton_batch_norm, "MIN_ELEMENTS_PER_PROGRAM", minimum)
        running_mean, running_var = torch.zeros(2, device=device), torch.ones(2, device=device)
        with regops.use_backend("triton"):
            got_mean, got_var = regops.batch_norm_stats(x)
            regops.batch_norm(x, running_mean, running_var, training=True)
        torch.testing.assert_close(got_mean.cpu(), reference.batch_norm_stats(x.cpu())[0], equal_nan=True)
        torch.testing.assert_close(got_var[0].cpu(), torch.tensor(float("nan")), equal_nan=True)
        torch.testing.assert_close(running_mean[0].cpu(), torch_mean[0].cpu(), equal_nan=True)
        assert torch.isnan(running_var[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_many_channels_beyond_one_grid_dimension_match_torch(backend_device, layout):
    """More channels than a CUDA grid's y dimension holds (65535), which
    torch accepts: the reductions run on a one-dimensional grid. Forward
    statistics and the backward against torch."""
    backend, device = backend_device
    if triton_interpreted(backend, device):
        pytest.skip("the interpreter runs one program per channel: too slow for 70000 channels")
    if backend == "cuda" and device.type == "cpu":
        pytest.skip("the simulation runs a block of fibers per channel: minutes for 70000 channels; "
                    "tests/test_batch_norm_launch.py checks the launch arithmetic")
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 70001, 3, 1, generator=gen).to(device).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(device)
    ours = regops.nn.BatchNorm2d(70001).to(device)
    theirs = torch.nn.BatchNorm2d(70001).to(device)
    expected_x = x.detach().clone().requires_grad_()
    y = ours(x)
    expected = theirs(expected_x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-5)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, expected_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
