"""Penalized SGD and AdamW: lockstep against torch.optim's for-loop
implementations, the L1 / L2 penalties against references, clipping against
clip_grad_norm_, state_dict interchange with torch, GradScaler, the ops
through torch.library's checks and torch.compile, and the errors users see."""

import copy

import pytest
import torch
from torch.library import opcheck

import regops
from regops import reference
from conftest import cuda_simulated, native_op_targets, triton_interpreted

# Odd sizes around the CPU chunk (32768) and block (512) and the Triton
# block (1024); a 0-d and an empty parameter too.
SHAPES = [(7, 13), (1,), (), (0,), (33, 1000), (3, 5, 7), (1031,)]
TINY_SHAPES = [(7, 13), (), (1031,)]
HALF_TOLERANCE = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _steps_and_shapes(backend, device):
    if triton_interpreted(backend, device):
        return 5, TINY_SHAPES  # the interpreter is slow
    if cuda_simulated(backend, device):
        return 10, SHAPES  # each simulated block costs a fiber per thread: fewer steps, the same chunking
    return 100, SHAPES


def _random_params(shapes, device, dtype, gen):
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for shape in shapes]


def _split_groups(params, options: list[dict]):
    """Three param groups with their own options."""
    return [{"params": params[i::len(options)], **opts} for i, opts in enumerate(options)]


def _random_sgd_options(gen):
    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=gen))]

    groups = []
    for _ in range(3):
        momentum = pick([0.0, 0.9, 0.5])
        nesterov = momentum > 0 and pick([False, True])
        groups.append(dict(lr=pick([0.1, 0.01, 0.003]), momentum=momentum,
                           dampening=0.0 if nesterov else pick([0.0, 0.1]), weight_decay=pick([0.0, 0.01, 0.1]),
                           nesterov=nesterov, maximize=pick([False, True])))
    return groups


def _random_adamw_options(gen):
    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=gen))]

    return [dict(lr=pick([1e-2, 1e-3]), betas=(pick([0.9, 0.8, 0.3]), pick([0.999, 0.99])), eps=pick([1e-8, 1e-6]),
                 weight_decay=pick([0.0, 0.01, 0.1]), amsgrad=pick([False, True]), maximize=pick([False, True]))
            for _ in range(3)]


def _set_grads(params_lists, gen, grad_hook=None):
    """The same fresh random gradients on each list of parameters."""
    grads = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params_lists[0]]
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def _assert_params_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), **tolerance)


def _steps_against_the_reference(name, shapes, options, device, gen, steps):
    """``steps`` steps of REGOPS_CLASSES[name](**options) on random float32
    parameters of ``shapes``, each step compared with the same optimizer's on
    the reference backend. Returns the parameters, the reference's and the
    optimizer."""
    ours = _random_params(shapes, device, torch.float32, gen)
    oracle = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = REGOPS_CLASSES[name](ours, **options)
    reference_optimizer = REGOPS_CLASSES[name](oracle, **options)
    for _ in range(steps):
        _set_grads([ours, oracle], gen)
        optimizer.step()
        with regops.use_backend("reference"):
            reference_optimizer.step()
        _assert_params_close(ours, oracle, atol=2e-6, rtol=1e-5)
    return ours, oracle, optimizer


TORCH_CLASSES = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
REGOPS_CLASSES = {"sgd": regops.optim.SGD, "adamw": regops.optim.AdamW}
RANDOM_OPTIONS = {"sgd": _random_sgd_options, "adamw": _random_adamw_options}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_lockstep_with_torch_float32(backend_device, name):
    """No penalties: every step equals torch's for-loop optimizer."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1 + (name == "adamw"))
    steps, shapes = _steps_and_shapes(backend, device)
    options = RANDOM_OPTIONS[name](gen)
    ours = _random_params(shapes, device, torch.float32, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = REGOPS_CLASSES[name](_split_groups(ours, options))
    torch_optimizer = TORCH_CLASSES[name](_split_groups(theirs, options), foreach=False, fused=False)
    for _ in range(steps):
        _set_grads([ours, theirs], gen)
        optimizer.step()
        torch_optimizer.step()
        _assert_params_close(ours, theirs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_lockstep_half_precision_with_reference(backend_device, name, dtype):
    """16-bit parameters: float32 math, parameter and states rounded once
    per step, as the pure-torch reference does; the states keep the
    parameter's dtype."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is the oracle of this test")
    gen = torch.Generator().manual_seed(3)
    steps, shapes = _steps_and_shapes(backend, device)
    steps = min(steps, 30)
    options = RANDOM_OPTIONS[name](gen)
    for group in options:
        group.update(l1=0.001, l1_mode="subgradient")
    ours = _random_params(shapes, device, dtype, gen)
    oracle = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = REGOPS_CLASSES[name](_split_groups(ours, options))
    reference_optimizer = REGOPS_CLASSES[name](_split_groups(oracle, options))
    tolerance = HALF_TOLERANCE[dtype]
    if triton_interpreted(backend, device) and dtype == torch.bfloat16:
        # The interpreter narrows float32 to bfloat16 by truncation where a
        # GPU rounds to nearest even: a bias of up to one ulp a step.
        tolerance = dict(atol=0.1, rtol=0.05)
    for _ in range(steps):
        _set_grads([ours, oracle], gen)
        optimizer.step()
        with regops.use_backend("reference"):
            reference_optimizer.step()
        _assert_params_close(ours, oracle, **tolerance)
    for state in optimizer.state.values():
        for key, value in state.items():
            assert value.dtype == (torch.float32 if key == "step" else dtype), key


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_l1_subgradient_and_l2_match_gradient_penalties(backend_device, name):
    """l1_mode="subgradient" (and AdamW's coupled l2) equal torch's optimizer
    stepping on g + l2 * p + l1 * sign(p) computed from the parameter before the step."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    steps, shapes = _steps_and_shapes(backend, device)
    steps = min(steps, 30)
    l1, l2 = 0.01, 0.05
    options = RANDOM_OPTIONS[name](gen)
    ours = _random_params(shapes, device, torch.float32, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    extra = dict(l1=l1, l2=l2) if name == "adamw" else dict(l1=l1)
    optimizer = REGOPS_CLASSES[name](_split_groups(ours, [{**o, **extra} for o in options]))
    torch_optimizer = TORCH_CLASSES[name](_split_groups(theirs, options), foreach=False)
    for _ in range(steps):
        _set_grads([ours, theirs], gen)
        for p, group_maximize in ((p, g["maximize"]) for g in torch_optimizer.param_groups for p in g["params"]):
            penalty = l1 * torch.sign(p.detach()) + (l2 * p.detach() if name == "adamw" else 0)
            # torch negates the whole gradient under maximize; the penalty must not flip
            p.grad += -penalty if group_maximize else penalty
        optimizer.step()
        torch_optimizer.step()
        _assert_params_close(ours, theirs, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_l1_proximal_matches_soft_threshold_and_makes_zeros(backend_device, name):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(7)
    steps, shapes = _steps_and_shapes(backend, device)
    steps = min(steps, 20)
    lr, l1 = (0.05, 2.0) if name == "sgd" else (0.01, 10.0)  # thresholds of 0.1 a step
    options = dict(lr=lr, momentum=0.9) if name == "sgd" else dict(lr=lr, weight_decay=0.01)
    ours = _random_params(shapes, device, torch.float32, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = REGOPS_CLASSES[name](ours, **options, l1=l1, l1_mode="proximal")
    torch_optimizer = TORCH_CLASSES[name](theirs, **options, foreach=False)
    for _ in range(steps):
        _set_grads([ours, theirs], gen)
        for p in ours + theirs:
            p.grad *= 0.1
        optimizer.step()
        torch_optimizer.step()
        with torch.no_grad():
            for p in theirs:
                p.copy_(reference.soft_threshold(p, lr * l1))
        _assert_params_close(ours, theirs, atol=5e-6, rtol=1e-5)
    zeros = sum(int((p == 0).sum()) for p in ours)
    expected_zeros = sum(int((p == 0).sum()) for p in theirs)
    total = sum(p.numel() for p in ours)
    assert zeros == expected_zeros
    assert zeros > 0.2 * total, f"proximal L1 left only {zeros} of {total} weights exactly zero"


# More than kSerialBelow (65536) elements in all, so that the CPU kernel
# splits the work between threads: chunks of 32768 that cover pieces of
# several small tensors, and tensors cut between chunks and threads.
MANY_CHUNK_SHAPES = [(70001,), (3,), (), (40000,), (2, 65537), (17,), (1,)]


@pytest.mark.parametrize("l1_mode", [None, "subgradient", "proximal"])
@pytest.mark.parametrize("l2", [0.0, 0.01])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_many_chunks_and_every_penalty_combination_match_the_reference(backend_device, name, l2, l1_mode):
    """Each combination of coupled L2 and L1 terms (the CPU kernel compiles a
    loop for each) over tensors split into many chunks, on two threads,
    against the pure-torch reference backend; global-norm clipping on top."""
    backend, device = backend_device
    if backend == "reference" or triton_interpreted(backend, device):
        pytest.skip("the reference is the oracle here; the interpreter is too slow for these sizes")
    gen = torch.Generator().manual_seed(17)
    penalties = dict(l1=1e-3 if l1_mode else 0.0, l1_mode=l1_mode or "subgradient", max_grad_norm=50.0)
    if name == "sgd":
        options = dict(lr=0.01, momentum=0.9, weight_decay=l2, **penalties)
    else:
        options = dict(lr=1e-3, weight_decay=0.01, l2=l2, **penalties)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours, oracle, _ = _steps_against_the_reference(name, MANY_CHUNK_SHAPES, options, device, gen, steps=5)
    finally:
        torch.set_num_threads(previous_threads)
    if l1_mode == "proximal":
        assert sum(int((p == 0).sum()) for p in ours) == sum(int((p == 0).sum()) for p in oracle)


# More tensors than one CUDA launch table holds (41 to 96 depending on the
# number of lists), with sizes from 1 to a few chunks of 65536 elements; on a
# GPU also one tensor of more blocks than a table holds (320 chunks).
MANY_TENSOR_SHAPES = [(int(n),) for n in torch.randint(1, 3000, (150,), generator=torch.Generator().manual_seed(5))]
MANY_TENSOR_SHAPES[::37] = [(65536 * 2 + 3,)] * len(MANY_TENSOR_SHAPES[::37])
MORE_BLOCKS_THAN_A_TABLE = (320 * 65536 + 4099,)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_more_tensors_and_blocks_than_one_launch_holds_match_the_reference(backend_device, name):
    """The CUDA step splits a group over several launches when it outgrows
    the table passed as a kernel argument: every tensor (also one that
    continues in the next launch) is updated once, against the reference;
    the gradient norm over the same tensors is bitwise reproducible."""
    backend, device = backend_device
    if backend == "reference" or triton_interpreted(backend, device):
        pytest.skip("the reference is the oracle here; the interpreter is too slow for these sizes")
    gen = torch.Generator().manual_seed(23)
    shapes = MANY_TENSOR_SHAPES + ([MORE_BLOCKS_THAN_A_TABLE] if device.type == "cuda" else [])
    options = dict(lr=0.01, momentum=0.9) if name == "sgd" else dict(lr=1e-3, weight_decay=0.01, amsgrad=True)
    ours, _, optimizer = _steps_against_the_reference(name, shapes, options, device, gen, steps=3)
    if name == "adamw":
        assert all(float(optimizer.state[p]["step"]) == 3.0 for p in ours)
    grads = [p.grad for p in ours]
    norm = regops.multi_tensor_norm(grads, squared=True)
    torch.testing.assert_close(norm.cpu(), reference.multi_tensor_norm([g.cpu() for g in grads], squared=True),
                               rtol=1e-5, atol=0)
    assert torch.equal(norm, regops.multi_tensor_norm(grads, squared=True))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_clipping_matches_clip_grad_norm(backend_device, name, max_norm):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(11)
    steps, shapes = _steps_and_shapes(backend, device)
    steps = min(steps, 20)
    options = RANDOM_OPTIONS[name](gen)
    ours = _random_params(shapes, device, torch.float32, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = REGOPS_CLASSES[name](_split_groups(ours, options), max_grad_norm=max_norm)
    torch_optimizer = TORCH_CLASSES[name](_split_groups(theirs, options), foreach=False)
    for _ in range(steps):
        _set_grads([ours, theirs], gen)
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=False)
        optimizer.step()
        torch_optimizer.step()
        torch.testing.assert_close(optimizer.last_grad_norm.cpu(), expected_norm.cpu(), rtol=1e-5, atol=0)
        _assert_params_close(ours, theirs, atol=5e-6, rtol=1e-5)


def test_multi_tensor_norm_against_reference(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(13)
    shapes = TINY_SHAPES if triton_interpreted(backend, device) else SHAPES + [(70001,)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        tensors.append(torch.randn(9, 4, generator=gen).to(device, dtype).t())  # a non-contiguous view
        expected = reference.multi_tensor_norm([t.cpu() for t in tensors], squared=True)
        squared = regops.multi_tensor_norm(tensors, squared=True)
        assert squared.dtype == torch.float32 and squared.shape == () and squared.device == device
        torch.testing.assert_close(squared.cpu(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(regops.multi_tensor_norm(tensors).cpu(), expected.sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_loads_both_ways_mid_training(name):
    gen = torch.Generator().manual_seed(17)
    options = RANDOM_OPTIONS[name](gen)
    if name == "sgd":
        for group in options:
            group["momentum"] = 0.9  # so that there is a state to move
    start = _random_params(SHAPES[:4], "cpu", torch.float32, gen)
    copies = [[p.detach().clone().requires_grad_() for p in start] for _ in range(4)]
    # torch -> regops: torch trains 5 steps, both continue from its state.
    a_torch = TORCH_CLASSES[name](_split_groups(copies[0], options), foreach=False)
    b_regops = REGOPS_CLASSES[name](_split_groups(copies[1], options))
    # regops -> torch
    c_regops = REGOPS_CLASSES[name](_split_groups(copies[2], options))
    d_torch = TORCH_CLASSES[name](_split_groups(copies[3], options), foreach=False)
    for _ in range(5):
        _set_grads([copies[0], copies[2]], gen)
        a_torch.step()
        c_regops.step()
    saved_torch, saved_regops = a_torch.state_dict(), c_regops.state_dict()
    for state in saved_torch["state"].values():
        assert set(state) <= {"momentum_buffer", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert [set(s) for s in saved_regops["state"].values()] == [set(s) for s in saved_torch["state"].values()]
    for state in saved_regops["state"].values():
        if "step" in state:
            assert state["step"].dtype == torch.float32 and state["step"].shape == ()
    with torch.no_grad():
        for src, dst in ((copies[0], copies[1]), (copies[2], copies[3])):
            for s, d in zip(src, dst):
                d.copy_(s)
    b_regops.load_state_dict(copy.deepcopy(saved_torch))
    d_torch.load_state_dict(copy.deepcopy(saved_regops))
    for _ in range(5):
        _set_grads(copies, gen)
        for optimizer in (a_torch, b_regops, c_regops, d_torch):
            optimizer.step()
        _assert_params_close(copies[1], copies[0], atol=2e-6, rtol=1e-5)
        _assert_params_close(copies[3], copies[2], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_grad_scaler_skips_inf_steps_and_unscales(name):
    gen = torch.Generator().manual_seed(19)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    torch_model = copy.deepcopy(model)
    options = dict(lr=0.01, momentum=0.9) if name == "sgd" else dict(lr=0.01)
    optimizer = REGOPS_CLASSES[name](model.parameters(), **options)
    torch_optimizer = TORCH_CLASSES[name](torch_model.parameters(), **options, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(6):
        x = torch.randn(5, 9, generator=gen)
        for m, opt, sc in ((model, optimizer, scaler), (torch_model, torch_optimizer, torch_scaler)):
            opt.zero_grad()
            sc.scale(m(x).square().sum()).backward()
            if step in (0, 3):
                m[0].weight.grad[1, 2] = float("inf") if step == 0 else float("nan")
            before = [p.detach().clone() for p in m.parameters()]
            sc.step(opt)
            sc.update()
            if step in (0, 3):
                _assert_params_close(list(m.parameters()), before, atol=0, rtol=0)
        _assert_params_close(list(model.parameters()), list(torch_model.parameters()), atol=2e-6, rtol=1e-5)
        assert scaler.get_scale() == torch_scaler.get_scale()
    if name == "adamw":
        steps = {float(s["step"]) for s in optimizer.state.values()}
        assert steps == {4.0}, "skipped steps must not be counted"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_params_without_grads_are_left_alone(backend_device, name):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(23)
    params = _random_params(TINY_SHAPES, device, torch.float32, gen)
    untouched = params[1]
    before = untouched.detach().clone()
    optimizer = REGOPS_CLASSES[name](params, lr=0.1, momentum=0.9) if name == "sgd" else \
        REGOPS_CLASSES[name](params, lr=0.1)
    for _ in range(2):
        for p in params:
            p.grad = None if p is untouched else torch.randn(p.shape, generator=gen).to(device)
        optimizer.step()
    assert torch.equal(untouched.detach(), before)
    assert untouched not in optimizer.state
    assert all(p in optimizer.state for p in params if p is not untouched)


def test_tensor_lr_changes_without_rebuilding(backend_device):
    """A tensor lr is read by the kernel: changing it in place changes the step."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(29)
    for name in ("sgd", "adamw"):
        ours = _random_params(TINY_SHAPES, device, torch.float32, gen)
        theirs = [p.detach().clone().requires_grad_() for p in ours]
        lr = torch.tensor(0.01)
        optimizer = REGOPS_CLASSES[name](ours, lr=lr)
        torch_optimizer = TORCH_CLASSES[name](theirs, lr=0.01, foreach=False)
        for step in range(3):
            _set_grads([ours, theirs], gen)
            optimizer.step()
            torch_optimizer.step()
            _assert_params_close(ours, theirs, atol=2e-6, rtol=1e-5)
            lr.fill_(0.01 / (step + 2))
            torch_optimizer.param_groups[0]["lr"] = 0.01 / (step + 2)


def test_add_param_group_with_its_own_options():
    gen = torch.Generator().manual_seed(31)
    first, second = _random_params([(5, 3), (4,)], "cpu", torch.float32, gen)
    optimizer = regops.optim.AdamW([first], lr=0.01, l1=0.1)
    optimizer.add_param_group({"params": [second], "weight_decay": 0.0, "l1": 0.0})
    assert optimizer.param_groups[1]["l1"] == 0.0 and optimizer.param_groups[1]["lr"] == 0.01
    torch_second = second.detach().clone().requires_grad_()
    torch_optimizer = torch.optim.AdamW([torch_second], lr=0.01, weight_decay=0.0, foreach=False)
    for _ in range(3):
        _set_grads([[second], [torch_second]], gen)
        first.grad = torch.randn(first.shape, generator=gen)
        optimizer.step()
        torch_optimizer.step()
    _assert_params_close([second], [torch_second], atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="l1_mode"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "l1_mode": "lasso"})


BAD_HYPERPARAMETERS = [
    ("sgd", dict(lr=-0.1), "lr"),
    ("sgd", dict(lr=0.1, momentum=-0.5), "momentum"),
    ("sgd", dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    ("sgd", dict(lr=0.1, l1=-1.0), "l1"),
    ("sgd", dict(lr=0.1, l1_mode="lasso"), "l1_mode"),
    ("sgd", dict(lr=0.1, nesterov=True), "nesterov"),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    ("sgd", dict(lr=0.1, max_grad_norm=0.0), "max_grad_norm"),
    ("adamw", dict(lr=-1e-3), "lr"),
    ("adamw", dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    ("adamw", dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    ("adamw", dict(eps=-1e-8), "eps"),
    ("adamw", dict(weight_decay=-0.1), "weight_decay"),
    ("adamw", dict(l2=-0.1), "l2"),
    ("adamw", dict(l1=float("nan")), "l1"),
    ("adamw", dict(l1_mode="prox"), "l1_mode"),
]


@pytest.mark.parametrize("name,kwargs,argument", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        REGOPS_CLASSES[name]([torch.zeros(3, requires_grad=True)], **kwargs)


def test_parameter_listed_twice_warns_as_torch_and_across_groups_raises():
    p = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        regops.optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        regops.optim.AdamW([{"params": [p]}, {"params": [p]}])


def test_sparse_gradients_raise():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = regops.optim.AdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


def test_unsupported_parameter_dtypes_raise():
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16, complex64 and complex128"):
        regops.optim.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)


def test_kernel_entry_checks():
    p = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="grads must have one tensor per parameter"):
        torch.ops.regops.sgd_step_(p, [], [], 0.1, 0.0, 0.0, 0.0, False, False, 0.0, False, False)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.regops.sgd_step_(p, [torch.zeros(5)], [], 0.1, 0.0, 0.0, 0.0, False, False, 0.0, False, False)
    with pytest.raises(RuntimeError, match="betas"):
        torch.ops.regops.adamw_step_(p, [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros(())],
                                     0.1, 1.5, 0.9, 1e-8, 0.0, 0.0, 0.0, False, False, False)


def _op_samples():
    gen = torch.Generator().manual_seed(37)

    def lists(n=3):
        return [torch.randn(s, generator=gen) for s in [(5, 3), (7,), (1,)][:n]]

    sgd = (lists(), lists(), lists(), 0.1, 0.9, 0.1, 0.01, False, True, 0.01, False, False,
           torch.tensor(2.0), torch.tensor(0.0), torch.tensor(0.5))
    adamw = (lists(), lists(), lists(), [t.abs() for t in lists()], [t.abs() for t in lists()],
             [torch.tensor(3.0) for _ in range(3)], 0.01, 0.9, 0.999, 1e-8, 0.01, 0.01, 0.01, True, True, False,
             None, None, None)
    return sgd, adamw


@pytest.mark.parametrize("namespace", [namespace for namespace, device in native_op_targets() if device == "cpu"])
def test_opcheck(namespace):
    ops = getattr(torch.ops, namespace)
    sgd, adamw = _op_samples()
    opcheck(ops.sgd_step_.default, copy.deepcopy(sgd))
    opcheck(ops.adamw_step_.default, copy.deepcopy(adamw))
    tensor_lr_adamw = copy.deepcopy(adamw)
    tensor_lr_adamw = tensor_lr_adamw[:6] + (torch.tensor(0.01),) + tensor_lr_adamw[7:]
    opcheck(ops.adamw_step_.tensor_lr, tensor_lr_adamw)
    opcheck(ops.multi_tensor_norm.default, (copy.deepcopy(sgd[0]), True))


def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) of a whole optimizer step on the CPU."""
    gen = torch.Generator().manual_seed(41)
    eager = _random_params([(5, 3), (7,)], "cpu", torch.float32, gen)
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    eager_optimizer = regops.optim.AdamW(eager, lr=torch.tensor(0.01), l1=0.01, max_grad_norm=1.0)
    compiled_optimizer = regops.optim.AdamW(compiled, lr=torch.tensor(0.01), l1=0.01, max_grad_norm=1.0)

    @torch.compile(fullgraph=True)
    def step():
        compiled_optimizer.step()

    torch._dynamo.reset()
    for _ in range(3):
        _set_grads([eager, compiled], gen)
        eager_optimizer.step()
        step()
        _assert_params_close(compiled, eager, atol=1e-6, rtol=1e-6)


# --- no host synchronization in step() ------------------------------------------------

_HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_step_with_a_tensor_lr_reads_no_tensor_on_the_host(backend_device, name, monkeypatch):
    """Reading a tensor's value in Python (float(lr), lr.item(), ...) waits
    for the device on a GPU; step() must not, on any compiled backend, with a
    tensor lr, clipping and GradScaler's tensors."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is the readable oracle: it reads values on the host")
    gen = torch.Generator().manual_seed(41)
    params = _random_params(TINY_SHAPES, device, torch.float32, gen)
    optimizer = REGOPS_CLASSES[name](params, lr=torch.tensor(0.01, device=device), max_grad_norm=1.0)
    optimizer.grad_scale = torch.tensor(2.0, device=device)
    optimizer.found_inf = torch.tensor(0.0, device=device)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    before = [p.detach().clone() for p in params]
    reads = []

    def spy(attribute):
        real = getattr(torch.Tensor, attribute)

        def read(self, *args, **kwargs):
            reads.append(attribute)
            return real(self, *args, **kwargs)
        return read

    for attribute in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, attribute, spy(attribute))
    for _ in range(2):
        optimizer.step()
    monkeypatch.undo()
    assert reads == []
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before) if p.numel() > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_step_makes_no_host_sync_on_a_gpu(backend, name, tensor_lr):
    if backend not in regops.available_backends():
        pytest.skip(f"backend {backend} is not available")
    gen = torch.Generator().manual_seed(43)
    params = _random_params(SHAPES, "cuda", torch.float32, gen)
    lr = torch.tensor(0.01, device="cuda") if tensor_lr else 0.01
    with regops.use_backend(backend):
        optimizer = REGOPS_CLASSES[name](params, lr=lr, max_grad_norm=1.0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to("cuda")
        optimizer.step()  # the first step creates the state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
