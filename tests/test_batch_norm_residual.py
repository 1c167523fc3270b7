"""Batch norm fused with a residual add and ReLU, act(bn(x) + z) (the ResNet
bottleneck's tail): every backend against the torch composite
relu(F.batch_norm(x) + z) in float64 (output, the gradients of x, z, weight
and bias, the running statistics), gradcheck and gradgradcheck in float64,
opcheck, hostile layouts of the residual, the module and the errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import regops
from conftest import (HAS_CUDA, TRITON_OPCHECK_UTILS, assert_batch_norm_results, cuda_simulated, native_op_targets,
                      triton_interpreted)

# Odd sizes; both layouts; S == 1; a 3-D input. The simulation and the
# interpreter are slow: a few small ones.
SHAPES = [(3, 7, 13, 17), (2, 5, 7, 7), (3, 7, 1, 1), (4, 3), (2, 3, 11)]
SLOW_SHAPES = [(2, 3, 5, 7), (3, 5, 1, 1)]
# How the residual is laid out relative to the input.
RESIDUAL_LAYOUTS = ["same", "other", "strided", "offset"]


def _slow(backend, device) -> bool:
    return triton_interpreted(backend, device) or cuda_simulated(backend, device)


def _residual_like(values: torch.Tensor, kind: str, x: torch.Tensor) -> torch.Tensor:
    """`values` (contiguous) as a tensor of layout `kind` relative to x: the
    same memory format, the other one (channels_last against NCHW and back),
    a strided view (every other element of a wider tensor), or a view at an
    offset of one element (not 16-byte aligned)."""
    if kind == "same":
        return values.contiguous(memory_format=regops.reference.batch_norm_memory_format(x))
    if kind == "other":
        if values.dim() != 4:
            return values.transpose(0, 1).contiguous().transpose(0, 1)  # non-dense: copied by the op
        other = torch.contiguous_format if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.channels_last
        return values.contiguous(memory_format=other)
    if kind == "strided":
        wide = torch.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype, device=values.device)
        wide[..., ::2] = values
        return wide[..., ::2]
    storage = torch.zeros(values.numel() + 1, dtype=values.dtype, device=values.device)
    view = storage[1:].view(values.shape)
    view.copy_(values)
    return view


def _make(shape, dtype, layout, device, gen):
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + torch.rand(view, generator=gen, dtype=torch.float64))
    x = (x + torch.randn(view, generator=gen, dtype=torch.float64)).to(dtype).to(device).contiguous(memory_format=layout)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.randn(channels, generator=gen, dtype=pdtype).to(device)
    bias = torch.randn(channels, generator=gen, dtype=pdtype).to(device)
    running_mean = torch.randn(channels, generator=gen, dtype=pdtype).to(device)
    running_var = (torch.rand(channels, generator=gen, dtype=pdtype) + 0.5).to(device)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device).contiguous(memory_format=layout)
    return x, z, weight, bias, running_mean, running_var, grad


def _torch_float64(x, z, weight, bias, running_mean, running_var, grad, training, relu):
    """relu(F.batch_norm(x) + z) on float64 copies: output, the four gradients, running stats."""
    leaves = [t.detach().double().requires_grad_() for t in (x, z, weight, bias)]
    rm, rv = running_mean.double().clone(), running_var.double().clone()
    y = F.batch_norm(leaves[0], rm, rv, leaves[2], leaves[3], training, 0.1, 1e-5) + leaves[1]
    if relu:
        y = torch.relu(y)
    return (y, *torch.autograd.grad(y, leaves, grad.double()), rm, rv)


def _layouts(shape):
    return [torch.contiguous_format, torch.channels_last] if len(shape) == 4 else [torch.contiguous_format]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_matches_torch(backend_device, dtype, relu, training):
    backend, device = backend_device
    slow = _slow(backend, device)
    if slow and (dtype in (torch.float16, torch.float64) or not relu and not training):
        pytest.skip("the simulation and the interpreter run a few representative cases only")
    gen = torch.Generator().manual_seed(len(str(dtype)) * 4 + 2 * relu + training)
    kinds = RESIDUAL_LAYOUTS if not slow else ["same", "other", "offset"]
    case_number = 0
    for shape in SLOW_SHAPES if slow else SHAPES:
        for layout in _layouts(shape):
            x, z, weight, bias, running_mean, running_var, grad = _make(shape, dtype, layout, device, gen)
            kind = kinds[case_number % len(kinds)]
            case_number += 1
            residual = _residual_like(z, kind, x)
            expected = _torch_float64(x, residual, weight, bias, running_mean, running_var, grad, training, relu)
            x.requires_grad_()
            residual.requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            y = regops.batch_norm(x, running_mean, running_var, w, b, training, 0.1, 1e-5,
                                  activation="relu" if relu else None, residual=residual)
            gx, gz, gw, gb = torch.autograd.grad(y, (x, residual, w, b), grad)
            case = f"{backend} {shape} {layout} residual={kind} {dtype} relu={relu} training={training}"
            assert y.dtype == dtype and gx.dtype == dtype and gz.dtype == dtype, case
            assert gz.shape == residual.shape, case
            if len(shape) == 4 and layout != torch.contiguous_format:
                assert y.is_contiguous(memory_format=layout), case
            assert_batch_norm_results(("output", "grad_input", "grad_residual", "grad_weight", "grad_bias",
                                       "running_mean", "running_var"), (y, gx, gz, gw, gb, running_mean, running_var),
                                      expected, dtype, x.numel() // shape[1], case)


def test_residual_gradcheck_float64(backend_device):
    backend, device = backend_device
    slow = _slow(backend, device)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 2, 2, 1) if slow else (3, 2, 3, 2)
    for layout in (torch.channels_last,) if slow else (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).contiguous(memory_format=layout)
        z = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        w = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        b = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
        rm, rv = torch.zeros(2, dtype=torch.float64, device=device), torch.ones(2, dtype=torch.float64, device=device)
        for training in (True,) if slow else (True, False):
            for activation in ("relu",) if slow else ("relu", None):
                leaves = tuple(t.clone().requires_grad_() for t in (x, z, w, b))
                assert torch.autograd.gradcheck(
                    lambda t, z_, w_, b_: regops.batch_norm(t, rm.clone(), rv.clone(), w_, b_, training,
                                                            activation=activation, residual=z_), leaves)


def test_residual_gradgradcheck_float64(backend_device):
    """Second derivatives through the fused op: the mask moves with z but is
    constant almost everywhere, so z gets none of its own."""
    backend, device = backend_device
    if _slow(backend, device):
        pytest.skip("the double backward is plain torch ops over the fused kernels' outputs: the cpu backend covers it")
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    z = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64)
    w, b = torch.randn(2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)
    for training in (True, False):
        rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        leaves = tuple(t.clone().requires_grad_() for t in (x, z, w, b))
        assert torch.autograd.gradgradcheck(
            lambda t, z_, w_, b_: regops.batch_norm(t, rm.clone(), rv.clone(), w_, b_, training, activation="relu",
                                                    residual=z_), leaves)


def _opcheck_args(device="cpu", shape=(3, 4, 5, 3)):
    gen = torch.Generator().manual_seed(9)
    x, z, w, b, rm, rv, grad = _make(shape, torch.float64, torch.channels_last, device, gen)
    mean, var = torch.ops.regops.batch_norm_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    strided = _residual_like(z, "strided", x)
    return [
        ("batch_norm_forward", (leaf(x), leaf(w), leaf(b), rm, rv, True, 1e-5, True, leaf(z))),
        ("batch_norm_forward", (leaf(x), None, None, rm, rv, False, 1e-5, True, strided)),
        ("batch_norm_forward", (leaf(x), leaf(w), leaf(b), None, None, True, 1e-5, False, leaf(z))),
        ("batch_norm_backward", (grad, x, w, b, mean, invstd, True, True, z)),
        ("batch_norm_backward", (leaf(grad), leaf(x), leaf(w), b, leaf(mean), leaf(invstd), True, True, strided)),
        ("batch_norm_backward", (leaf(grad), leaf(x), leaf(w), leaf(b), mean, invstd, False, True, z)),
    ]


@pytest.mark.parametrize("namespace, device", native_op_targets())
def test_opcheck_native_ops(namespace, device):
    # The simulation runs every kernel launch as fibers: a smaller input.
    shape = (2, 3, 2, 3) if namespace == "regops_cuda_sim" else (3, 4, 5, 3)
    for name, args in _opcheck_args(device, shape):
        opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


def test_opcheck_triton_ops():
    if "triton" not in regops.available_backends():
        pytest.skip("triton backend not available")
    device = "cuda" if HAS_CUDA else "cpu"
    for name, args in _opcheck_args(device):
        opcheck(getattr(torch.ops.regops, f"triton_{name}").default, args, test_utils=TRITON_OPCHECK_UTILS)


def test_backward_returns_the_masked_gradient_as_grad_residual(backend_device):
    """The op's grad_residual is grad_out where relu(bn(x) + z) > 0, else 0;
    empty without a residual."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend has no registered op")
    gen = torch.Generator().manual_seed(21)
    x, z, w, b, _, _, grad = _make((2, 3, 4, 5), torch.float32, torch.contiguous_format, device, gen)
    ops = regops._backend.native_ops(backend, "cpu") if backend != "triton" else None
    forward = torch.ops.regops.triton_batch_norm_forward if ops is None else ops.batch_norm_forward
    backward = torch.ops.regops.triton_batch_norm_backward if ops is None else ops.batch_norm_backward
    y, mean, invstd, _ = forward(x, w, b, None, None, True, 1e-5, True, z)
    _, _, _, grad_residual = backward(grad, x, w, b, mean, invstd, True, True, z)
    torch.testing.assert_close(grad_residual, torch.where(y > 0, grad, torch.zeros_like(grad)))
    assert backward(grad, x, w, b, mean, invstd, True, True)[3].numel() == 0


def test_module_matches_torch_composite():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 5, 7, generator=gen).to(memory_format=torch.channels_last)
    z = torch.randn(4, 6, 5, 7, generator=gen)
    grad = torch.randn(4, 6, 5, 7, generator=gen)
    ours = regops.nn.BatchNorm2d(6, activation="relu")
    theirs = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.randn(6, generator=torch.Generator().manual_seed(1)))
            module.bias.copy_(torch.randn(6, generator=torch.Generator().manual_seed(2)))
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        zs = [z.clone().requires_grad_() for _ in range(2)]
        y = ours(xs[0], residual=zs[0])
        expected = torch.relu(theirs(xs[1]) + zs[1])
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)
        y.backward(grad)
        expected.backward(grad)
        for mine, torchs in ((xs[0].grad, xs[1].grad), (zs[0].grad, zs[1].grad), (ours.weight.grad, theirs.weight.grad),
                             (ours.bias.grad, theirs.bias.grad)):
            torch.testing.assert_close(mine, torchs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours(x).shape == x.shape  # the residual stays optional


def test_residual_without_a_gradient_gets_none(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    x, z, w, b, _, _, grad = _make((2, 3, 3, 3), torch.float32, torch.contiguous_format, device, gen)
    x.requires_grad_()
    y = regops.batch_norm(x, None, None, w, b, True, activation="relu", residual=z)
    (gx,) = torch.autograd.grad(y, (x,), grad)
    expected = torch.autograd.grad(torch.relu(F.batch_norm(x, None, None, w, b, True) + z), (x,), grad)[0]
    torch.testing.assert_close(gx, expected, atol=1e-5, rtol=1e-5)


def test_bad_residual_raises_clear_errors(backend_device):
    backend, device = backend_device
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="residual must match input"):
        regops.batch_norm(x, None, None, training=True, activation="relu", residual=x[:1])
    with pytest.raises(ValueError, match="residual must match input"):
        regops.batch_norm(x, None, None, training=True, activation="relu", residual=x.double())
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        regops.batch_norm(x, None, None, training=True, residual=1.0)


@pytest.mark.parametrize("namespace, device", native_op_targets())
def test_registered_ops_check_the_residual(namespace, device):
    ops = getattr(torch.ops, namespace)
    x = torch.randn(2, 3, 4, 4, device=device)
    c = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, True, x[:1])
    with pytest.raises(RuntimeError, match="residual must be Float like input, got Half"):
        ops.batch_norm_backward(x, x, None, None, c, c, True, True, x.half())


def test_empty_input_with_a_residual(backend_device):
    backend, device = backend_device
    x = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
    z = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = regops.batch_norm(x, rm, rv, None, None, False, activation="relu", residual=z)
    gx, gz = torch.autograd.grad(y, (x, z), torch.empty_like(y))
    assert y.shape == gx.shape == gz.shape == x.shape
