"""Weight averaging fused into the optimizer step (``ema_decay``,
``swa_start``, ``average_dtype``) against torch.optim.swa_utils.AveragedModel
updated after every step, GradScaler-skipped steps, state_dict resumption and
``regops.optim.swap_averaged``."""

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import regops
from conftest import cuda_simulated, triton_interpreted

pytestmark = pytest.mark.usefixtures("small_triton_optim_programs")
CLASSES = {"sgd": regops.optim.SGD, "adamw": regops.optim.AdamW}
BASE = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01), "adamw": dict(lr=1e-2, weight_decay=0.1)}
EMA_DECAY, SWA_START = 0.9, 4


def _leaves(shapes, device, dtype, gen):
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for shape in shapes]


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _groups(params, swa_start=SWA_START):
    """EMA, SWA and no averaging, one param group each."""
    return [{"params": params[0::3], "ema_decay": EMA_DECAY}, {"params": params[1::3], "swa_start": swa_start},
            {"params": params[2::3]}]


class _Tracker:
    """AveragedModel of each averaged group, updated after every step (the
    SWA one from step SWA_START on), as a user of torch.optim.swa_utils does."""

    def __init__(self, params):
        self.ema_module = torch.nn.ParameterList([torch.nn.Parameter(p.detach()) for p in params[0::3]])
        self.swa_module = torch.nn.ParameterList([torch.nn.Parameter(p.detach()) for p in params[1::3]])
        self.ema = AveragedModel(self.ema_module, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
        self.swa = AveragedModel(self.swa_module)
        self.params = params

    def update(self, step):
        with torch.no_grad():
            for module, params in ((self.ema_module, self.params[0::3]), (self.swa_module, self.params[1::3])):
                for target, p in zip(module, params):
                    target.copy_(p)
        self.ema.update_parameters(self.ema_module)
        if step >= SWA_START:
            self.swa.update_parameters(self.swa_module)

    def check(self, optimizer, **tolerance):
        for averaged, params, key in ((self.ema, self.params[0::3], "ema"), (self.swa, self.params[1::3], "swa")):
            for expected, p in zip(averaged.module, params):
                torch.testing.assert_close(optimizer.state[p][key].cpu(), expected.detach().cpu(), **tolerance)
        for p in self.params[2::3]:
            assert "ema" not in optimizer.state[p] and "swa" not in optimizer.state[p]


def _steps(backend, device):
    if triton_interpreted(backend, device) or cuda_simulated(backend, device):
        return 8, [(7, 13), (), (1031,), (5,), (3, 4), (2,)]
    return 100, [(7, 13), (), (1031,), (33, 1000), (3, 5, 7), (1,), (129,), (4, 4), (0,)]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_averages_match_averaged_model(backend_device, name):
    backend, device = backend_device
    steps, shapes = _steps(backend, device)
    gen = torch.Generator().manual_seed(1)
    params = _leaves(shapes, device, torch.float32, gen)
    optimizer = CLASSES[name](_groups(params), **BASE[name])
    tracker = _Tracker(params)
    for step in range(1, steps + 1):
        _set_grads(params, gen)
        optimizer.step()
        tracker.update(step)
    tracker.check(optimizer, atol=1e-5, rtol=1e-5)
    n_averaged = {float(optimizer.state[p]["n_averaged"]) for p in params[0::3]}
    assert n_averaged == {float(steps)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_float64_and_complex_averages_match_averaged_model(backend_device, dtype):
    """float64 parameters average in float64, complex ones as pairs of reals."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(6)
    params = _leaves([(7, 13), (), (5,), (3, 4), (2,), (1031,)], device, dtype, gen)
    optimizer = regops.optim.AdamW(_groups(params), **BASE["adamw"], average_dtype=torch.float32)
    tracker = _Tracker(params)
    for step in range(1, 9):
        _set_grads(params, gen)
        optimizer.step()
        tracker.update(step)
    tracker.check(optimizer, atol=1e-6, rtol=1e-6)
    assert all(optimizer.state[p]["ema"].dtype == dtype for p in params[0::3])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_skipped_steps_leave_the_average_and_resume_from_a_state_dict(backend_device, name):
    """GradScaler's skipped steps (found_inf read on the device) update
    neither the parameters nor the averages; a state_dict taken mid-way
    resumes to the same averages."""
    backend, device = backend_device
    if triton_interpreted(backend, device):
        pytest.skip("minutes under the Triton interpreter (the Triton kernel's skip of averages is unchecked here)")
    gen = torch.Generator().manual_seed(2)
    shapes = [(7, 13), (), (1031,), (5, 3), (2,), (1,)]
    params = _leaves(shapes, device, torch.float32, gen)
    optimizer = CLASSES[name](_groups(params), **BASE[name])
    tracker = _Tracker(params)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params] for _ in range(12)]
    skipped = {3, 7}
    counted = 0
    for step, step_grads in enumerate(grads, start=1):
        if step == 6:
            saved = copy.deepcopy(optimizer.state_dict())
            resumed = [p.detach().clone().requires_grad_() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.grad_scale = torch.tensor(1.0, device=device)
        optimizer.found_inf = torch.tensor(1.0 if step in skipped else 0.0, device=device)
        before = {key: [optimizer.state[p][key].clone() for p in params if key in optimizer.state[p]]
                  for key in ("ema", "swa")}
        optimizer.step()
        if step in skipped:
            for key, values in before.items():
                after = [optimizer.state[p][key] for p in params if key in optimizer.state[p]]
                assert all(torch.equal(a, b) for a, b in zip(after, values))
        else:
            counted += 1
            # SWA counts steps with step(), skipped ones too: AveragedModel here
            # starts at the same call.
            tracker.update(step)
    tracker.check(optimizer, atol=1e-6, rtol=1e-6)

    resumed_optimizer = CLASSES[name](_groups(resumed), **BASE[name])
    resumed_optimizer.load_state_dict(saved)
    for step, step_grads in enumerate(grads[5:], start=6):
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        resumed_optimizer.grad_scale = torch.tensor(1.0, device=device)
        resumed_optimizer.found_inf = torch.tensor(1.0 if step in skipped else 0.0, device=device)
        resumed_optimizer.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p.detach(), q.detach())
        for key in ("ema", "swa", "n_averaged"):
            if key in optimizer.state[p]:
                assert torch.equal(optimizer.state[p][key], resumed_optimizer.state[q][key]), key


@pytest.mark.parametrize("average_dtype", [None, torch.float32])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_half_precision_averages_are_bit_identical_on_every_backend(backend_device, name, average_dtype):
    """bfloat16 parameters with stochastic rounding and a bfloat16 (rounded
    stochastically) or float32 average: every backend equals the reference."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is the oracle of this test")
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 13), (), (1031,), (5,), (3, 4), (2,)]
    ours = _leaves(shapes, device, torch.bfloat16, gen)
    oracle = [p.detach().clone().requires_grad_() for p in ours]
    options = dict(BASE[name], stochastic_rounding=True, average_dtype=average_dtype)
    # Under the Triton interpreter and the CUDA simulation two steps, SWA from
    # the first: each average is copied once and then lerped once, rounded.
    swa_start = 1 if triton_interpreted(backend, device) or cuda_simulated(backend, device) else SWA_START
    torch.manual_seed(4)
    optimizer = CLASSES[name](_groups(ours, swa_start), **options)
    torch.manual_seed(4)
    oracle_optimizer = CLASSES[name](_groups(oracle, swa_start), **options)
    for step in range(swa_start + 1):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in ours]
        for p, q, g in zip(ours, oracle, grads):
            p.grad, q.grad = g.to(device), g.clone()
        optimizer.step()
        with regops.use_backend("reference"):
            oracle_optimizer.step()
    for p, q in zip(ours, oracle):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value.cpu(), oracle_optimizer.state[q][key].cpu()), key
        if "ema" in optimizer.state[p]:
            assert optimizer.state[p]["ema"].dtype == (average_dtype or torch.bfloat16)


@pytest.mark.parametrize("average_dtype", [None, torch.float32])
def test_swap_averaged_puts_the_averages_in_and_back(average_dtype):
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(torch.bfloat16)
    optimizer = regops.optim.AdamW(model.parameters(), lr=1e-2, ema_decay=0.5, average_dtype=average_dtype)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 6, generator=gen).to(torch.bfloat16)).square().sum().backward()
        optimizer.step()
    trained = [p.detach().clone() for p in model.parameters()]
    averages = [optimizer.state[p]["ema"].clone() for p in model.parameters()]
    assert not all(torch.equal(t, a.to(t.dtype)) for t, a in zip(trained, averages))
    with regops.optim.swap_averaged(optimizer):
        for p, a in zip(model.parameters(), averages):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), a.to(torch.bfloat16))
        model(torch.randn(2, 6).to(torch.bfloat16))
    for p, t, a in zip(model.parameters(), trained, averages):
        assert torch.equal(p.detach(), t)
        assert torch.equal(optimizer.state[p]["ema"], a)
    optimizer.step()  # training goes on with the trained weights and the same state


def test_averaging_options_are_checked():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="exclude each other"):
        regops.optim.SGD(p, ema_decay=0.9, swa_start=3)
    with pytest.raises(ValueError, match="ema_decay"):
        regops.optim.AdamW(p, ema_decay=1.0)
    with pytest.raises(ValueError, match="swa_start"):
        regops.optim.AdamW(p, swa_start=-1)
    with pytest.raises(ValueError, match="average_dtype"):
        regops.optim.AdamW(p, ema_decay=0.9, average_dtype=torch.float16)
