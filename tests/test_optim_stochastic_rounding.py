"""Stochastic rounding of 16-bit parameters and optimizer states
(``stochastic_rounding=True``): unbiased, exact where the value is
representable, deterministic for a seed, bit-identical on every backend and
across a state_dict round trip (README "Stochastic rounding")."""

import copy

import pytest
import torch

import regops
from regops import reference
from conftest import cuda_simulated, native_op_targets, triton_interpreted
from torch.library import opcheck

HALF_DTYPES = [torch.bfloat16, torch.float16]
pytestmark = pytest.mark.usefixtures("small_triton_optim_programs")
CLASSES = {"sgd": regops.optim.SGD, "adamw": regops.optim.AdamW}
# SGD with momentum rounds the parameter and its buffer; AdamW with amsgrad
# the parameter and three states.
OPTIONS = {"sgd": dict(lr=0.01, momentum=0.9, weight_decay=0.01, stochastic_rounding=True),
           "adamw": dict(lr=1e-3, weight_decay=0.1, amsgrad=True, stochastic_rounding=True)}


def _leaf(tensor):
    return tensor.detach().requires_grad_()


def _params(device, dtype, gen, small):
    """Odd sizes, a 0-d tensor, a transposed (dense, not contiguous) one, and
    a tensor past one CPU round block (128) and one Triton block (1024)."""
    shapes = [(7, 13), (), (1031,)] if small else [(7, 13), (), (1031,), (33, 1000), (3, 5, 7)]
    params = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for shape in shapes]
    params.append(torch.randn(13, 9, generator=gen).to(device=device, dtype=dtype).t())
    return [_leaf(p) for p in params]


def _set_grads(params_lists, gen):
    grads = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params_lists[0]]
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def _small(backend, device):
    return triton_interpreted(backend, device) or cuda_simulated(backend, device)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_bit_identical_to_the_reference_backend(backend_device, name, dtype):
    """Every backend draws the same bits and rounds the same way: parameters
    and states equal the pure-torch reference's bit for bit."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is the oracle of this test")
    gen = torch.Generator().manual_seed(5)
    ours = _params(device, dtype, gen, _small(backend, device))
    oracle = [_leaf(p.detach().clone()) for p in ours]
    groups = lambda params: [{"params": params[::2]}, {"params": params[1::2], "lr": OPTIONS[name]["lr"] * 3}]
    torch.manual_seed(11)
    optimizer = CLASSES[name](groups(ours), **OPTIONS[name])
    torch.manual_seed(11)
    oracle_optimizer = CLASSES[name](groups(oracle), **OPTIONS[name])
    for _ in range(2 if _small(backend, device) else 3):  # two steps: the step enters the counter
        _set_grads([ours, oracle], gen)
        optimizer.step()
        with regops.use_backend("reference"):
            oracle_optimizer.step()
    for p, q in zip(ours, oracle):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())
        for key, value in optimizer.state[p].items():
            assert torch.equal(value.cpu(), oracle_optimizer.state[q][key].cpu()), key


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rounding_is_unbiased(backend, dtype):
    """SGD moves 10^6 values by less than half an ulp: the mean rounding
    error against the float32 update is within 4 standard errors of zero,
    while round-to-nearest leaves every bfloat16 value where it was."""
    gen = torch.Generator().manual_seed(2)
    n = 1_000_000
    start = (torch.rand(n, generator=gen) + 0.5).to(dtype)  # [0.5, 1.5): ulps of 2^-8 / 2^-7 (bf16)
    if dtype == torch.float16:
        start[: n // 10] = (torch.rand(n // 10, generator=gen) * 6e-5).to(dtype)  # float16 subnormals
    grad = torch.randn(n, generator=gen).to(dtype)
    lr = 2e-5
    param = _leaf(start.clone())
    param.grad = grad.clone()
    optimizer = regops.optim.SGD([param], lr=lr, stochastic_rounding=True)
    with regops.use_backend(backend):
        optimizer.step()
    exact = start.float() - lr * grad.float()
    error = param.detach().float() - exact
    standard_error = error.std() / n ** 0.5
    assert abs(float(error.mean())) < 4 * float(standard_error)
    assert (param.detach() != start).float().mean() > 0.001  # it moved
    if dtype == torch.bfloat16:
        assert torch.equal(exact.to(dtype), start)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_representable_values_are_exact(backend_device, dtype):
    """lr = 0 leaves the parameter as it is, and a first momentum buffer is
    the (representable) gradient, bit for bit; NaN and inf stay."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(1031, generator=gen).to(dtype)
    values[:4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0]).to(dtype)
    param = _leaf(values.clone().to(device))
    param.grad = torch.randn(1031, generator=gen).to(dtype).to(device)
    param.grad[5] = float("nan")
    optimizer = regops.optim.SGD([param], lr=0.0, momentum=0.9, stochastic_rounding=True)
    optimizer.step()
    result = param.detach().cpu()
    assert result[5].isnan()  # p - 0 * NaN: NaN, and it stays NaN through the rounding
    keep = torch.arange(1031) != 5
    assert torch.equal(result[keep], values[keep])
    buffer = optimizer.state[param]["momentum_buffer"].cpu()
    grad = param.grad.cpu()
    assert torch.equal(buffer[~grad.isnan()], grad[~grad.isnan()]) and buffer[5].isnan()


def test_stochastic_round_known_cases():
    """The rounding rule on hand-picked values: the carry decides, NaN stays."""
    one_and_a_quarter_ulp = torch.tensor([1.0 + 2.0 ** -7 / 4])  # bfloat16 ulp at 1 is 2^-7
    below, above = torch.tensor([0xBFFF]), torch.tensor([0xC000])  # 0x4000 dropped: carries iff bits >= 0xC000
    assert float(reference.stochastic_round(one_and_a_quarter_ulp, below, torch.bfloat16)) == 1.0
    assert float(reference.stochastic_round(one_and_a_quarter_ulp, above, torch.bfloat16)) == 1.0 + 2.0 ** -7
    subnormal = torch.tensor([2.5 * 2.0 ** -24])  # float16: between 2 and 3 times 2^-24
    assert float(reference.stochastic_round(subnormal, torch.tensor([0x7FFF]), torch.float16)) == 2 * 2.0 ** -24
    assert float(reference.stochastic_round(subnormal, torch.tensor([0x8000]), torch.float16)) == 3 * 2.0 ** -24
    assert reference.stochastic_round(torch.tensor([float("nan")]), torch.tensor([0xFFFF]), torch.bfloat16).isnan()
    big = torch.tensor([65520.0])  # float16: half way from 65504 to 65536 (inf)
    assert float(reference.stochastic_round(big, torch.tensor([0x7FFF]), torch.float16)) == 65504.0
    assert float(reference.stochastic_round(big, torch.tensor([0x8000]), torch.float16)) == float("inf")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_deterministic_for_a_seed(name):
    gen = torch.Generator().manual_seed(4)
    start = _params("cpu", torch.bfloat16, gen, small=True)
    runs = []
    for seed in (1, 1, 2):
        params = [_leaf(p.detach().clone()) for p in start]
        torch.manual_seed(seed)
        optimizer = CLASSES[name](params, **OPTIONS[name])
        grads = torch.Generator().manual_seed(9)
        for _ in range(3):
            _set_grads([params], grads)
            optimizer.step()
        runs.append(([p.detach().clone() for p in params], optimizer.param_groups[0]["rounding_seed"]))
    (first, seed_a), (second, seed_b), (other, seed_c) = runs
    assert seed_a == seed_b != seed_c
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, c) for a, c in zip(first, other))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_resumes_bit_identically(name):
    """Six steps straight, or three, a state_dict round trip into a fresh
    optimizer (which draws a seed of its own) and three more: the same bits."""
    gen = torch.Generator().manual_seed(6)
    straight = _params("cpu", torch.bfloat16, gen, small=True)
    optimizer = CLASSES[name](straight, **OPTIONS[name])
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in straight] for _ in range(6)]
    for step, step_grads in enumerate(grads):
        if step == 3:
            saved = copy.deepcopy(optimizer.state_dict())
            resumed = [_leaf(p.detach().clone()) for p in straight]
        for p, g in zip(straight, step_grads):
            p.grad = g.clone()
        optimizer.step()
    resumed_optimizer = CLASSES[name](resumed, **OPTIONS[name])
    assert resumed_optimizer.param_groups[0]["rounding_seed"] != saved["param_groups"][0]["rounding_seed"]
    resumed_optimizer.load_state_dict(saved)
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        resumed_optimizer.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_float32_parameters_are_not_rounded():
    """stochastic_rounding leaves float32 parameters to the float32 update."""
    gen = torch.Generator().manual_seed(7)
    start = _params("cpu", torch.float32, gen, small=True)
    plain, rounded = [[_leaf(p.detach().clone()) for p in start] for _ in range(2)]
    a = regops.optim.AdamW(plain, lr=1e-2)
    b = regops.optim.AdamW(rounded, lr=1e-2, stochastic_rounding=True)
    _set_grads([plain, rounded], gen)
    a.step()
    b.step()
    assert all(torch.equal(x, y) for x, y in zip(plain, rounded))


def test_rounding_argument_is_checked():
    p = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="rounding must hold"):
        torch.ops.regops.sgd_step_([p], [p.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, 0.0, False, False,
                                   None, None, None, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="rounding must be a contiguous 1-D int64"):
        torch.ops.regops.sgd_step_([p], [p.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, 0.0, False, False,
                                   None, None, None, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="stochastic_rounding"):
        regops.optim.SGD([torch.zeros(2, requires_grad=True)], stochastic_rounding=1)


@pytest.mark.parametrize("namespace", [namespace for namespace, device in native_op_targets() if device == "cpu"])
def test_opcheck_with_rounding_and_averages(namespace):
    """The ops with a rounding tensor (and, where the kernels fuse it, a
    weight average) through torch.library's checks."""
    ops = getattr(torch.ops, namespace)
    gen = torch.Generator().manual_seed(8)

    def lists(dtype=torch.bfloat16):
        return [torch.randn(s, generator=gen).to(dtype) for s in [(5, 3), (9,), (1,)]]

    rounding = torch.tensor([123, 1, 7, 0, 2, 5], dtype=torch.int64)
    averages = [lists(torch.float32), torch.full((3,), 0.25)] if namespace == "regops" else [[], None]
    sgd = (lists(), lists(), lists(), 0.1, 0.9, 0.0, 0.01, False, False, 0.0, False, False, None, None, None,
           rounding, *averages)
    opcheck(ops.sgd_step_.default, copy.deepcopy(sgd))
    adamw = (lists(), lists(), lists(), [t.abs() for t in lists()], [], [torch.tensor(3.0) for _ in range(3)], 0.01,
             0.9, 0.999, 1e-8, 0.01, 0.0, 0.0, False, False, False, None, None, None, rounding, *averages)
    opcheck(ops.adamw_step_.default, copy.deepcopy(adamw))
