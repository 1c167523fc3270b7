"""regops' drop-ins judged by PyTorch's own test samples, on the CPU backend
(the C++ kernels; the other backends have their own tests).

- Optimizers: every SGD and AdamW sample of
  ``torch.testing._internal.common_optimizers.optim_db`` (with torch's
  foreach / fused / differentiable variants, and the samples torch keeps for
  CUDA devices, run here on CPU tensors) for float32, float64 and complex64
  parameters: several steps in lockstep with torch's for-loop implementation,
  the state_dict's keys and layout, load_state_dict both ways then more
  lockstep, and every error input raising (or warning) what torch raises.
- Modules: every sample of ``common_modules.module_db`` for BatchNorm1d/2d/3d
  in train and eval mode against torch: outputs, running statistics and every
  gradient; SyncBatchNorm (one process) on the same samples; the error
  inputs. module_db has no Dropout entry: Dropout runs on the shapes and
  probabilities of torch's ``nn.functional.dropout`` OpInfo samples (written
  out here: importing the OpInfo database takes longer than this whole file)
  and is checked statistically.

A sample that cannot apply skips with the reason.
"""

import copy
import inspect
import math
import warnings
import zlib

import pytest
import torch

import regops
from conftest import load_hypothesis_profiles

from torch.testing._internal import common_modules as torch_modules  # noqa: E402
from torch.testing._internal import common_optimizers as torch_optimizers  # noqa: E402

load_hypothesis_profiles()  # torch.testing._internal loads its own hypothesis profile

DEVICE = "cpu"


@pytest.fixture(autouse=True)
def _cpu_backend():
    with regops.use_backend("cpu"):
        yield


# --- optimizers --------------------------------------------------------------------

OPTIMIZERS = {torch.optim.SGD: regops.optim.SGD, torch.optim.AdamW: regops.optim.AdamW}
OPTIM_INFOS = [info for info in torch_optimizers.optim_db if info.optim_cls in OPTIMIZERS]
OPTIM_DTYPES = [torch.float32, torch.float64, torch.complex64]
# torch's flags that choose among its implementations of one rule; the
# oracle is always the for-loop implementation.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "differentiable", "capturable")
# What regops' param groups hold besides torch's keys.
REGOPS_OPTIONS = {"l1", "l1_mode", "l2", "max_grad_norm", "stochastic_rounding", "ema_decay", "swa_start",
                  "average_dtype"}
STEPS = 4


def _sample_id(case) -> str:
    info, sample, where = case
    flags = ",".join(f"{k}" for k in IMPLEMENTATION_FLAGS if sample.kwargs.get(k))
    origin = "-cudasample" if where == "cuda" else ""
    return f"{info.optim_cls.__name__}-{sample.desc}{'-' + flags if flags else ''}{origin}"


def _optim_samples():
    """(info, sample, where) for every sample: torch's CPU samples with their
    implementation variants, then those torch builds only for CUDA devices
    (capturable, tensor betas, foreach), which run on CPU tensors here."""
    cases = []
    for info in OPTIM_INFOS:
        seen = []
        for where in ("cpu", "cuda"):
            for sample in torch_optimizers._get_optim_inputs_including_global_cliquey_kwargs(where, None, info):
                key = (sample.desc, repr(sample.kwargs))
                if key not in seen:
                    seen.append(key)
                    cases.append((info, sample, where))
    return cases


# Every sample in float32; in float64 and complex64 those that do not set
# foreach, fused or differentiable (which choose nothing in regops'
# arithmetic), to keep the file quick.
OPTIM_SAMPLES = [pytest.param(case, dtype, id=f"{_sample_id(case)}-{str(dtype)[6:]}")
                 for case in _optim_samples() for dtype in OPTIM_DTYPES
                 if dtype == torch.float32 or not any(case[1].kwargs.get(k) for k in ("foreach", "fused",
                                                                                      "differentiable"))]


def _params(dtype, gen):
    """A weight, a transposed (dense) one, a non-contiguous view, a bias and
    a 0-d parameter: fresh leaves."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return [randn(6, 5).requires_grad_(), randn(4, 7).t().requires_grad_(),
            randn(5, 8)[:, ::2].detach().requires_grad_(), randn(6).requires_grad_(), randn(()).requires_grad_()]


def _copies(params):
    # detach().clone() keeps the strides of dense tensors and makes a
    # non-contiguous one contiguous, so torch's copy of the view is rebuilt
    # as a view too.
    out = []
    for p in params:
        if regops.optim._base.is_flat(p):
            q = p.detach().clone()
        else:
            base = torch.zeros(p.shape[0], p.shape[1] * 2, dtype=p.dtype)[:, ::2]
            q = base.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def _groups(params):
    """Two param groups (the second with its own lr), as torch's tests use."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.02}]


def _set_grads(param_sets, gen):
    for tensors in zip(*param_sets):
        grad = torch.randn(tensors[0].shape, generator=gen, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = grad.clone()


def _torch_kwargs(kwargs):
    """The for-loop implementation with the sample's hyperparameters (torch's
    capturable needs CUDA tensors; it changes where the step count lives,
    not the update)."""
    out = {k: v for k, v in kwargs.items() if k not in IMPLEMENTATION_FLAGS}
    return dict(out, foreach=False)


def _tolerance(dtype, float32_scalars=False):
    """float64 parameters are exact to float64 rounding, unless a tensor lr
    or betas is float32: torch then computes its step size and decay factor
    as float32 tensors, regops in float64 from the tensor's value."""
    if dtype in (torch.float32, torch.complex64) or float32_scalars:
        return dict(atol=1e-6, rtol=1e-5)
    return dict(atol=1e-12, rtol=1e-10)


def _has_tensor_scalars(kwargs):
    return isinstance(kwargs.get("lr"), torch.Tensor) or any(isinstance(b, torch.Tensor)
                                                              for b in kwargs.get("betas", ()))


def _assert_params_close(ours, theirs, tolerance, what):
    for index, (p, q) in enumerate(zip(ours, theirs)):
        assert p.dtype == q.dtype and p.shape == q.shape
        torch.testing.assert_close(p.detach(), q.detach(), **tolerance, msg=lambda m: f"{what} param {index}: {m}")


def _assert_state_dicts_match(ours, theirs, tolerance, flags):
    """regops' state_dict has torch's keys, shapes, dtypes and values; its
    param groups have torch's keys and values plus regops' options, and the
    implementation flags it was given (``flags``) where the oracle has the
    for-loop's."""
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index in theirs["state"]:
        mine, torch_state = ours["state"][index], theirs["state"][index]
        assert set(mine) == set(torch_state), index
        for key, value in torch_state.items():
            if isinstance(value, torch.Tensor):
                got = mine[key]
                assert isinstance(got, torch.Tensor) and got.shape == value.shape and got.dtype == value.dtype, key
                assert got.device == value.device, key
                torch.testing.assert_close(got, value, **tolerance)
            else:
                assert mine[key] == value, key
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for mine, torch_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert set(mine) - set(torch_group) <= REGOPS_OPTIONS, set(mine) - set(torch_group)
        for key, value in torch_group.items():
            assert key in mine, key
            if key in IMPLEMENTATION_FLAGS:
                assert mine[key] == flags.get(key, mine[key]), key
                continue
            if isinstance(value, tuple):  # betas, possibly tensors
                assert len(mine[key]) == len(value)
                for a, b in zip(mine[key], value):
                    assert float(a) == float(b) and isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor), key
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), key
            else:
                assert mine[key] == value, key


@pytest.mark.parametrize("case,dtype", OPTIM_SAMPLES)
def test_optimizer_sample_in_lockstep_with_torch(case, dtype):
    info, sample, where = case
    torch_cls, regops_cls = info.optim_cls, OPTIMIZERS[info.optim_cls]
    kwargs = copy.deepcopy(sample.kwargs)
    gen = torch.Generator().manual_seed(zlib.crc32(sample.desc.encode()))
    if kwargs.get("differentiable"):
        with pytest.raises(NotImplementedError, match="differentiable"):
            regops_cls(_groups(_params(dtype, gen)), **kwargs)
        return
    tolerance = _tolerance(dtype, _has_tensor_scalars(kwargs))
    start = _params(dtype, gen)
    theirs, ours = _copies(start), _copies(start)
    torch_optimizer = torch_cls(_groups(theirs), **_torch_kwargs(kwargs))
    regops_optimizer = regops_cls(_groups(ours), **kwargs)
    for step in range(STEPS):
        _set_grads([theirs, ours], gen)
        torch_optimizer.step()
        regops_optimizer.step()
        _assert_params_close(ours, theirs, tolerance, f"step {step}")
    _assert_state_dicts_match(regops_optimizer.state_dict(), torch_optimizer.state_dict(), tolerance, kwargs)

    # load_state_dict both ways: a torch optimizer continues from regops'
    # state, a regops one from torch's, in lockstep with the originals.
    torch_from_regops, regops_from_torch = _copies(ours), _copies(theirs)
    torch_continued = torch_cls(_groups(torch_from_regops), **_torch_kwargs(kwargs))
    regops_continued = regops_cls(_groups(regops_from_torch), **kwargs)
    torch_continued.load_state_dict(copy.deepcopy(regops_optimizer.state_dict()))
    regops_continued.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for group in torch_continued.param_groups:  # torch runs its for-loop whatever regops saved
        group.update(foreach=False, fused=False, capturable=False)
    for step in range(STEPS):
        _set_grads([theirs, ours, torch_from_regops, regops_from_torch], gen)
        for optimizer in (torch_optimizer, regops_optimizer, torch_continued, regops_continued):
            optimizer.step()
        _assert_params_close(ours, theirs, tolerance, f"continued step {step}")
        _assert_params_close(torch_from_regops, theirs, tolerance, f"torch loaded from regops, step {step}")
        _assert_params_close(regops_from_torch, theirs, tolerance, f"regops loaded from torch, step {step}")
    # torch's own keys keep torch's values through the round trip.
    for group, original in zip(regops_continued.state_dict()["param_groups"], torch_optimizer.state_dict()["param_groups"]):
        assert {k: v for k, v in group.items() if k in original and k != "betas"} == \
               {k: v for k, v in original.items() if k != "betas"}


def _error_cases():
    cases = []
    for info in OPTIM_INFOS:
        for error in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
            cases.append((info, error))
    return cases


def _error_id(case):
    info, error = case
    return f"{info.optim_cls.__name__}-{error.optimizer_error_input.desc}"


# torch's foreach implementation cannot take a tensor lr or tensor betas
# without capturable=True; regops has one fused implementation, which does.
_FOREACH_TENSOR_RULES = ("lr as Tensor doesn't work with foreach & not capturable",
                         r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True")


@pytest.mark.parametrize("case", _error_cases(), ids=_error_id)
def test_optimizer_error_input_raises_what_torch_raises(case):
    info, error = case
    sample = error.optimizer_error_input
    if sample.desc in _FOREACH_TENSOR_RULES:
        pytest.skip("not applicable: regops' single fused implementation takes tensor lr and betas with "
                    "foreach=True (the foreach flag selects nothing in regops)")
    regops_cls = OPTIMIZERS[info.optim_cls]
    params = sample.params if sample.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]
    assert error.error_on == torch_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR  # torch's CPU samples
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            regops_cls(params, **sample.kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            regops_cls(params, **sample.kwargs)


def test_cuda_only_error_inputs_of_the_implementation_flags():
    """torch's CUDA error samples (built on a CUDA tensor there), on a CPU one."""
    p = [torch.nn.Parameter(torch.randn(3))]
    for cls in OPTIMIZERS.values():
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            cls(p, foreach=True, fused=True)
        with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
            cls(p, fused=True, differentiable=True)


@pytest.mark.parametrize("torch_cls", list(OPTIMIZERS), ids=lambda c: c.__name__)
def test_named_parameters_and_duplicates_as_torch(torch_cls):
    regops_cls = OPTIMIZERS[torch_cls]
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    ours, theirs = regops_cls(model.named_parameters(), lr=0.1), torch_cls(twin.named_parameters(), lr=0.1)
    assert ours.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"] == ["weight", "bias"]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        _set_grads([list(model.parameters()), list(twin.parameters())], gen)
        ours.step()
        theirs.step()
    _assert_params_close(list(model.parameters()), list(twin.parameters()), _tolerance(torch.float32), "named")
    assert ours.state_dict()["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]
    # A parameter listed twice in a group warns as torch does and is updated once per step.
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        duplicated = regops_cls([p, p], lr=0.1)
    p.grad = torch.ones(3)
    once = torch.nn.Parameter(torch.ones(3))
    once.grad = torch.ones(3)
    duplicated.step()
    regops_cls([once], lr=0.1).step()
    assert torch.equal(p, once)


def _legacy(state_dict, keys):
    """A state_dict saved before torch had ``keys``, with Python-number steps."""
    legacy = copy.deepcopy(state_dict)
    for group in legacy["param_groups"]:
        for key in keys:
            group.pop(key, None)
    for state in legacy["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    return legacy


@pytest.mark.parametrize("torch_cls", list(OPTIMIZERS), ids=lambda c: c.__name__)
def test_legacy_state_dict_takes_torch_defaults(torch_cls):
    """torch's __setstate__ defaults (maximize, nesterov, amsgrad, ... False)
    whatever the optimizer it is loaded into, and a tensor step."""
    regops_cls = OPTIMIZERS[torch_cls]
    flags = dict(maximize=True, nesterov=True, momentum=0.9) if torch_cls is torch.optim.SGD else \
        dict(maximize=True, amsgrad=True)
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    saved = torch_cls([p], lr=0.1, foreach=False)
    p.grad = torch.randn(4)
    saved.step()
    keys = ["maximize", "nesterov", "amsgrad", "foreach", "differentiable", "fused", "capturable"]
    legacy = _legacy(saved.state_dict(), keys)
    ours, theirs = regops_cls([q], lr=0.1, **flags), torch_cls([torch.nn.Parameter(q.detach().clone())], lr=0.1,
                                                                 **flags)
    ours.load_state_dict(copy.deepcopy(legacy))
    theirs.load_state_dict(copy.deepcopy(legacy))
    for key in keys:
        if key in theirs.param_groups[0]:
            assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    assert ours.param_groups[0]["maximize"] is False
    for state, torch_state in zip(ours.state.values(), theirs.state.values()):
        if "step" in torch_state:
            assert isinstance(state["step"], torch.Tensor) and state["step"].shape == ()
            assert float(state["step"]) == float(torch_state["step"])


# --- modules -----------------------------------------------------------------------

BATCH_NORMS = {torch.nn.BatchNorm1d: regops.nn.BatchNorm1d, torch.nn.BatchNorm2d: regops.nn.BatchNorm2d,
               torch.nn.BatchNorm3d: regops.nn.BatchNorm3d}
MODULE_INFOS = [info for info in torch_modules.module_db if info.module_cls in BATCH_NORMS]
# module_db has no SyncBatchNorm entry: its one-process form is batch norm,
# so it runs on the batch norm samples.
PAIRS = [(info, info.module_cls, BATCH_NORMS[info.module_cls]) for info in MODULE_INFOS] + \
        [(info, torch.nn.SyncBatchNorm, regops.nn.SyncBatchNorm) for info in MODULE_INFOS]


def _module_samples():
    cases = []
    for info, torch_cls, regops_cls in PAIRS:
        for dtype in info.dtypes:
            # SyncBatchNorm runs the code of BatchNorm*d here: float32 is enough.
            if dtype not in (torch.float32, torch.float64) or (torch_cls is torch.nn.SyncBatchNorm
                                                               and dtype != torch.float32):
                continue
            for training in (True, False):
                samples = info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True,
                                                  training=training)
                for index, sample in enumerate(samples):
                    cases.append(pytest.param(info, torch_cls, regops_cls, dtype, training, index,
                                              id=f"{torch_cls.__name__}-{info.name}-{sample.desc or index}-"
                                                 f"{'train' if training else 'eval'}-{str(dtype)[6:]}"))
    return cases


def _module_tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)


def _parameter_grad_tolerance(dtype):
    """weight.grad and bias.grad are sums over every value of a channel, which
    regops and torch add in different orders (and split over the threads
    differently): in float32 one of them came out 3.6e-5 apart (relative)."""
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else _module_tolerance(dtype)


def _randomize(module, gen):
    """Non-trivial affine parameters and running statistics (their defaults
    are 1, 0, 0 and 1)."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            tensor = getattr(module, name, None)
            if tensor is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
        if getattr(module, "running_var", None) is not None:
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen,
                                                dtype=module.running_var.dtype) + 0.5)


@pytest.mark.parametrize("info,torch_cls,regops_cls,dtype,training,index", _module_samples())
def test_module_sample_matches_torch(info, torch_cls, regops_cls, dtype, training, index):
    # The samples draw their inputs from torch's default generator: seeded, so
    # a case has the same input whatever ran before it.
    torch.manual_seed(index)
    sample = info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True, training=training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = torch_cls(*args, **kwargs, device=DEVICE, dtype=dtype)
    ours = regops_cls(*args, **kwargs, device=DEVICE, dtype=dtype)
    gen = torch.Generator().manual_seed(index)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    ours.train(training)
    tolerance = _module_tolerance(dtype)
    (input,) = sample.forward_input.args
    for step in range(2):  # twice: the running statistics move and are used
        x_theirs = input.detach().clone().requires_grad_()
        x_ours = input.detach().clone().requires_grad_()
        expected = theirs(x_theirs)
        got = ours(x_ours)
        torch.testing.assert_close(got, expected, **tolerance)
        grad_out = torch.randn(expected.shape, generator=gen, dtype=dtype)
        expected.backward(grad_out)
        got.backward(grad_out)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tolerance)
        for name, parameter in theirs.named_parameters():
            mine = dict(ours.named_parameters())[name]
            torch.testing.assert_close(mine.grad, parameter.grad, **_parameter_grad_tolerance(dtype),
                                       msg=lambda m: f"{name}.grad: {m}")
            mine.grad = parameter.grad = None
        for name, buffer in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, **tolerance,
                                       msg=lambda m: f"{name}: {m}")
    assert set(ours.state_dict()) == set(theirs.state_dict())


def _module_error_cases():
    cases = []
    for info, torch_cls, regops_cls in PAIRS:
        if info.module_error_inputs_func is None:
            continue
        for training in (True, False):
            errors = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=False,
                                                   training=training)
            for index, error in enumerate(errors):
                cases.append(pytest.param(info, torch_cls, regops_cls, training, index,
                                          id=f"{torch_cls.__name__}-{info.name}-{index}-"
                                             f"{'train' if training else 'eval'}"))
    return cases


@pytest.mark.parametrize("info,torch_cls,regops_cls,training,index", _module_error_cases())
def test_module_error_input_raises_what_torch_raises(info, torch_cls, regops_cls, training, index):
    """torch's error inputs (eps <= 0), in training, where torch raises, and
    in eval, where torch raises for a negative eps only: regops raises
    exactly where torch does, an error of the same type."""
    error = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=False,
                                          training=training)[index]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    assert error.error_on == torch_modules.ModuleErrorEnum.FORWARD_ERROR
    theirs, ours = torch_cls(*args, **kwargs), regops_cls(*args, **kwargs)
    theirs.train(training)
    ours.train(training)
    (input,) = sample.forward_input.args
    try:
        expected = theirs(input)
    except Exception as torch_error:  # noqa: BLE001  (whatever torch raises, regops must raise too)
        with pytest.raises(type(torch_error)) as raised:
            ours(input)
        if training:
            assert isinstance(torch_error, error.error_type)
            assert raised.match(error.error_regex)
        return
    assert not training, "torch raises for its error inputs in training"
    torch.testing.assert_close(ours(input), expected, **_module_tolerance(torch.float32))


def test_functional_batch_norm_accepts_what_torch_accepts_in_one_dimension():
    """torch takes the channels from dim 1: an empty 1-D input is accepted
    (a copy comes back, with a gradient path), a non-empty one is not."""
    x = torch.randn(0, requires_grad=True)
    for training in (True, False):
        stats = (None, None) if training else (torch.zeros(0), torch.ones(0))
        expected = torch.nn.functional.batch_norm(x, *stats, training=training)
        got = regops.batch_norm(x, *stats, training=training)
        assert got.shape == expected.shape == (0,) and got is not x
        got.sum().backward()
        assert x.grad.shape == (0,)
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(torch.randn(5), torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        regops.batch_norm(torch.randn(5), torch.zeros(5), torch.ones(5))


# --- dropout -----------------------------------------------------------------------
# The shapes and probabilities of torch's nn.functional.dropout OpInfo samples
# (common_methods_invocations.sample_inputs_dropout), in both modes, in place
# or not; plus one large input for the statistics.

DROPOUT_SHAPES = [(5, 5), (5,), ()]
DROPOUT_CASES = [(shape, p, training, inplace) for shape in DROPOUT_SHAPES for p in (0.0, 0.5, 1.0)
                 for training in (True, False) for inplace in (False, True)]


def _check_dropout(shape, p, training, inplace, dtype, gen):
    x = torch.rand(shape, generator=gen, dtype=dtype) + 0.5  # no zeros: a zero output means dropped
    module = regops.nn.Dropout(p, inplace=inplace).train(training)
    twin = torch.nn.Dropout(p, inplace=inplace).train(training)
    assert repr(module) == repr(twin)
    leaf = x.clone().requires_grad_()
    source = leaf.clone() if inplace else leaf  # in place needs a non-leaf, as in torch
    out = module(source)
    if inplace:
        assert out.data_ptr() == source.data_ptr()
    assert out.shape == x.shape and out.dtype == x.dtype
    grad_out = torch.rand(shape, generator=gen, dtype=dtype) + 0.5
    out.backward(grad_out)
    if not training or p == 0:
        assert torch.equal(out, x) and torch.equal(leaf.grad, grad_out)
        return None
    if p == 1:
        assert torch.equal(out, torch.zeros_like(x)) and torch.equal(leaf.grad, torch.zeros_like(x))
        return None
    kept = out != 0
    scale = 1 / (1 - p)
    # Kept elements are scaled by 1 / (1 - p), as torch scales them; the
    # gradient flows through exactly the kept ones.
    torch.testing.assert_close(out[kept], x[kept] * scale, atol=0, rtol=2e-7 if dtype == torch.float32 else 1e-15)
    torch.testing.assert_close(leaf.grad, torch.where(kept, grad_out * scale, 0), atol=0,
                               rtol=2e-7 if dtype == torch.float32 else 1e-15)
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,p,training,inplace", DROPOUT_CASES)
def test_dropout_sample_behaves_as_torch(shape, p, training, inplace, dtype):
    _check_dropout(shape, p, training, inplace, dtype, torch.Generator().manual_seed(len(shape)))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drops_the_fraction_torch_drops(p):
    """On 2^18 elements the dropped fraction is p within 5 standard
    deviations, torch's too; two calls draw different masks."""
    gen = torch.Generator().manual_seed(11)
    n = 1 << 18
    torch.manual_seed(5)
    kept = _check_dropout((n,), p, True, False, torch.float32, gen)
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs((1 - kept.float().mean().item()) - p) < bound
    torch_kept = torch.nn.functional.dropout(torch.ones(n), p) != 0
    assert abs((1 - torch_kept.float().mean().item()) - p) < bound
    again = regops.nn.Dropout(p)(torch.ones(n)) != 0
    assert not torch.equal(again, kept)
    # Independent elements: neighbours are kept together with probability (1 - p)^2.
    together = (kept[1:] & kept[:-1]).float().mean().item()
    assert abs(together - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) * 2


def test_optimizer_kwargs_have_torch_names_and_defaults():
    """Every torch constructor argument exists in regops' with torch's default."""
    for torch_cls, regops_cls in OPTIMIZERS.items():
        theirs = inspect.signature(torch_cls.__init__).parameters
        ours = inspect.signature(regops_cls.__init__).parameters
        for name, parameter in theirs.items():
            assert name in ours, (regops_cls.__name__, name)
            assert ours[name].default == parameter.default or name == "params", (regops_cls.__name__, name)
            assert ours[name].kind == parameter.kind, (regops_cls.__name__, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regops.optim.AdamW([torch.nn.Parameter(torch.randn(2))], foreach=True, fused=False, capturable=True)
