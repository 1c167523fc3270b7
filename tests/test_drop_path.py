"""DropPath (stochastic depth): timm's semantics, keep decisions from the
dropout random rule over the sample index on every backend, drop_path_add,
autograd, torch.compile and the module."""

import pytest
import torch

import regops
from regops import reference
from conftest import backend_devices, compile_backend_devices


def _timm_drop_path(x, keep, p, scale_by_keep):
    """timm's drop_path with the keep decisions given."""
    random_tensor = keep.double()
    if scale_by_keep and p < 1:
        random_tensor = random_tensor / (1 - p)
    return x * random_tensor.to(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_timm_with_the_rules_keep_decisions(backend_device, dtype, scale_by_keep):
    backend, device = backend_device
    for p, samples in [(0.3, 1), (0.5, 9), (0.9, 33)]:
        x = torch.randn(samples, 3, 5, device=device).to(dtype)
        out = regops.drop_path(x, p, scale_by_keep=scale_by_keep, seed=11, offset=4)
        keep = reference.dropout_keep(samples, p, 11, 4)
        rtol = 8e-3 if dtype == torch.bfloat16 else 0  # the scale may round twice on the way to bfloat16
        torch.testing.assert_close(out, _timm_drop_path(x, keep.to(device), p, scale_by_keep), atol=0, rtol=rtol)
        residual = torch.randn_like(x)
        fused = regops.drop_path_add(x, residual, p, scale_by_keep=scale_by_keep, seed=11, offset=4)
        loose = dtype == torch.bfloat16  # addcmul rounds once, out + residual twice
        torch.testing.assert_close(fused, residual + out, atol=1e-2 if loose else 1e-6, rtol=1e-2 if loose else 1e-6)


def test_keep_decisions_identical_across_backends():
    results = []
    for backend, device in backend_devices():
        with regops.use_backend(backend):
            results.append(regops.drop_path(torch.ones(200, 2, device=device), 0.4, seed=7).cpu())
    assert all(torch.equal(r, results[0]) for r in results)
    assert (results[0] == 0).any() and (results[0] != 0).any()


def test_whole_samples_are_dropped_and_gradients_follow(backend_device):
    backend, device = backend_device
    x = torch.randn(64, 4, 3, device=device, requires_grad=True)
    residual = torch.randn(64, 4, 3, device=device, requires_grad=True)
    out = regops.drop_path_add(x, residual, 0.5, seed=3)
    out.sum().backward()
    dropped = (out - residual).detach().flatten(1)
    per_sample = (dropped == 0).all(1)
    assert per_sample.any() and (~per_sample).any()
    assert ((dropped == 0).any(1) == per_sample).all()  # all or nothing per sample
    factor = x.grad.flatten(1)[:, 0]
    assert torch.equal(factor, torch.where(per_sample, 0.0, 2.0))
    assert torch.equal(residual.grad, torch.ones_like(residual))


def test_eval_and_zero_p_are_identity(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 3, device=device)
    assert regops.drop_path(x, 0.5, training=False) is x
    assert regops.drop_path(x, 0.0) is x
    module = regops.nn.DropPath(0.5).eval()
    assert module(x) is x
    assert torch.equal(regops.drop_path_add(x, x, 0.5, training=False), 2 * x)
    assert regops.drop_path(torch.empty(0, 3, device=device), 0.5).shape == (0, 3)


def test_p_one_drops_every_sample(backend_device):
    backend, device = backend_device
    x = torch.randn(5, 2, device=device)
    assert torch.equal(regops.drop_path(x, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("backend,device", compile_backend_devices())
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    with regops.use_backend(backend):
        fn = torch.compile(lambda x, r: regops.drop_path_add(x, r, 0.25, seed=5), fullgraph=True)
        x, r = torch.randn(16, 8, device=device), torch.randn(16, 8, device=device)
        torch.testing.assert_close(fn(x, r), regops.drop_path_add(x, r, 0.25, seed=5))
        model = torch.compile(regops.nn.DropPath(0.25), fullgraph=True)
        assert model(x).shape == x.shape


def test_errors():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="p must"):
        regops.drop_path(x, 2.0)
    with pytest.raises(ValueError, match="sample dimension"):
        regops.drop_path(torch.tensor(1.0), 0.5)
    with pytest.raises(ValueError, match="residual"):
        regops.drop_path_add(x, torch.ones(3, 3), 0.5)
    with pytest.raises(TypeError, match="training"):
        regops.drop_path(x, 0.5, training=1)
    assert "drop_prob=0.300" in repr(regops.nn.DropPath(0.3))
