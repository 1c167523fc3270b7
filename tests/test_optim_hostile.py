"""The optimizers under hostile inputs: NaN and inf gradients as in torch,
GradScaler's skipped steps, bad inputs rejected before any update, a
bit-identical resume from a state_dict, and the same bits for any number of
CPU threads."""

from __future__ import annotations

import pytest
import torch

import regops
from conftest import specials, same_bits_for_thread_counts, triton_interpreted


# --- optimizers ----------------------------------------------------------------------

HAS_OPTIM = hasattr(regops, "optim")
needs_optim = pytest.mark.skipif(not HAS_OPTIM, reason="regops.optim is not in this build")
OPTIMIZERS = {
    "sgd": (lambda: regops.optim.SGD, lambda: torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (lambda: regops.optim.SGD, lambda: torch.optim.SGD,
                     dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    "adamw": (lambda: regops.optim.AdamW, lambda: torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw-amsgrad": (lambda: regops.optim.AdamW, lambda: torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
}


def _make_optimizers(name, params, torch_params):
    regops_cls, torch_cls, options = OPTIMIZERS[name]
    return regops_cls()(params, **options), torch_cls()(torch_params, foreach=False, **options)


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_nan_and_inf_grads_like_torch(backend_device, name):
    """Without GradScaler a NaN or inf gradient goes into the update exactly as
    in torch.optim: the same elements (and their state) become NaN or inf."""
    backend, device = backend_device
    n = 64 if triton_interpreted(backend, device) else 1000
    params = [specials(n, torch.float32, device, seed=1).nan_to_num(0.0, 1.0, -1.0).requires_grad_()]
    torch_params = [params[0].detach().cpu().clone().requires_grad_()]
    optimizer, torch_optimizer = _make_optimizers(name, params, torch_params)
    for step in range(3):
        grad = specials(n, torch.float32, "cpu", seed=10 + step)
        grad[::3] = torch.randn(grad[::3].shape)  # some finite gradients every step
        params[0].grad, torch_params[0].grad = grad.to(device), grad.clone()
        optimizer.step()
        torch_optimizer.step()
        got, want = params[0].detach().cpu(), torch_params[0].detach()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), step
        assert torch.equal(torch.isinf(got), torch.isinf(want)), step
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


def _scaled_model(dtypes, seed):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 6).to(dtype) for dtype in dtypes]
    return torch.nn.ModuleList(layers)


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 1.0])
def test_grad_scaler_skips_a_nan_step_everywhere(name, clip):
    """A NaN in one bfloat16 gradient skips the whole step, for the float32
    parameters too (other dtype bucket): parameters and every state tensor
    unchanged, AdamW's step count not advanced; the next finite step runs."""
    model = _scaled_model([torch.float32, torch.bfloat16], seed=3)
    regops_cls, _, options = OPTIMIZERS[name]
    optimizer = regops_cls()(model.parameters(), **options, max_grad_norm=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def backward(poison: bool):
        optimizer.zero_grad()
        x = torch.randn(4, 6)
        loss = sum(layer(x.to(layer.weight.dtype)).float().square().sum() for layer in model)
        scaler.scale(loss).backward()
        if poison:
            model[1].weight.grad[2, 3] = float("nan")

    backward(False)
    scaler.step(optimizer)
    scaler.update()
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: {n: t.clone() for n, t in s.items() if isinstance(t, torch.Tensor)}
                    for k, s in enumerate(optimizer.state.values())}
    scale_before = scaler.get_scale()
    backward(True)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale_before / 2
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before)
    for k, state in enumerate(optimizer.state.values()):
        for key, value in state_before[k].items():
            assert torch.equal(state[key], value), key
    backward(False)
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params_before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_optim
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_bad_inputs_raise_before_any_update(name):
    regops_cls = OPTIMIZERS[name][0]()
    p = torch.randn(5, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    # Construction-time errors (a parameter listed twice in a group warns, as in torch).
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16, complex64 and complex128"):
        regops_cls([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        regops_cls([p, q, p], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group|more than one"):
        regops_cls([{"params": [p]}, {"params": [q, p]}], lr=0.1)
    with pytest.raises(ValueError, match="lr must be"):
        regops_cls([p], lr=-1.0)
    optimizer = regops_cls([{"params": [p]}, {"params": [q]}], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        optimizer.add_param_group({"params": [p]})
    assert len(optimizer.param_groups) == 2

    # Step-time errors: nothing is updated, in no group.
    def poisoned_step(mutate, error, match):
        p.grad, q.grad = torch.ones(5), torch.ones(4)
        before = [p.detach().clone(), q.detach().clone()]
        state_before = {k: dict(v) for k, v in optimizer.state.items()}
        undo = mutate()
        with pytest.raises(error, match=match):
            optimizer.step()
        undo()
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])
        assert set(optimizer.state) == set(state_before)

    def bad_lr():
        optimizer.param_groups[1]["lr"] = -0.5
        return lambda: optimizer.param_groups[1].update(lr=0.1)

    def bad_decay():
        optimizer.param_groups[1]["weight_decay"] = float("nan")
        return lambda: optimizer.param_groups[1].update(weight_decay=0.0)

    def sparse_grad():
        q.grad = torch.ones(4).to_sparse()
        return lambda: None

    poisoned_step(bad_lr, ValueError, "lr must be")
    poisoned_step(bad_decay, ValueError, "weight_decay must be")
    poisoned_step(sparse_grad, RuntimeError, "sparse gradients")
    p.grad, q.grad = torch.ones(5), torch.ones(4)
    optimizer.step()  # and then it works
    assert not torch.equal(p.grad, torch.zeros(5))


@needs_optim
def test_optimizer_with_a_meta_parameter_updates_the_others_like_torch():
    """A parameter on the meta device (deferred initialization) is bucketed
    apart, as torch.optim simply runs its ops there: the CPU parameter next to
    it is updated exactly as by torch."""
    p, m = torch.randn(5, requires_grad=True), torch.randn(5, device="meta", requires_grad=True)
    q = p.detach().clone().requires_grad_()
    optimizer = regops.optim.SGD([p, m], lr=0.1, momentum=0.9)
    torch_optimizer = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(2):
        p.grad, q.grad, m.grad = torch.ones(5), torch.ones(5), torch.ones(5, device="meta")
        optimizer.step()
        torch_optimizer.step()
    torch.testing.assert_close(p, q)
    assert m.device.type == "meta"


# --- resume from a state_dict ----------------------------------------------------------

def _model(with_batch_norm: bool):
    layers = [torch.nn.Linear(8, 16)]
    if with_batch_norm:
        layers.append(regops.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), regops.nn.Dropout(0.3), torch.nn.Linear(16, 4)]
    return torch.nn.Sequential(*layers)


def _train(model, optimizer, steps, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x, target = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_state_dict_is_bit_identical(name):
    """Train 6 steps straight, or 3 steps, save (model, optimizer, torch's RNG
    through torch.save), rebuild everything from scratch, load, 3 more steps:
    the same bits. Dropout draws its seed from torch's RNG, batch norm carries
    running statistics, the optimizer its state."""
    with_batch_norm = hasattr(regops.nn, "BatchNorm1d")
    regops_cls, _, options = OPTIMIZERS[name]

    torch.manual_seed(0)
    straight = _model(with_batch_norm)
    optimizer = regops_cls()(straight.parameters(), **options)
    torch.manual_seed(1)
    _train(straight, optimizer, 3, data_seed=5)
    _train(straight, optimizer, 3, data_seed=6)
    straight_state = optimizer.state_dict()

    import io
    torch.manual_seed(0)
    first = _model(with_batch_norm)
    first_optimizer = regops_cls()(first.parameters(), **options)
    torch.manual_seed(1)
    _train(first, first_optimizer, 3, data_seed=5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    del first, first_optimizer
    torch.manual_seed(1234)  # a different process would have another RNG state

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(with_batch_norm)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = regops_cls()(resumed.parameters(), **options)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    _train(resumed, resumed_optimizer, 3, data_seed=6)

    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
    resumed_state = resumed_optimizer.state_dict()
    for index, state in straight_state["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_state["state"][index][key], value), (index, key)


# --- determinism: optimizers -----------------------------------------------------------

@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_same_bits_for_any_thread_count(name, dtype):
    """Several CPU chunks per parameter, and global-norm clipping, whose
    reduction must not depend on how the work is split between threads."""
    regops_cls, _, options = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(shape, generator=gen).to(dtype) for shape in [(300, 700), (1031,), (), (5, 3)]]
    grads = [[torch.randn(t.shape, generator=gen).to(dtype) for t in start] for _ in range(3)]

    def run():
        params = [t.clone().requires_grad_() for t in start]
        optimizer = regops_cls()(params, **options, max_grad_norm=0.5)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return params + states + [optimizer.last_grad_norm]

    same_bits_for_thread_counts(run)
