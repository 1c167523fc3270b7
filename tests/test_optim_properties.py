"""Property tests (Hypothesis, tests/property_strategies.py) of SGD and AdamW on every
backend against torch, over random parameter sets, layouts, dtypes and
hyperparameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import regops
from conftest import backend_devices, triton_interpreted
from property_strategies import INTERPRETED_PAIRS, pair_id, few, shapes, make_tensor


# --- optimizers -------------------------------------------------------------------

HAS_OPTIM = hasattr(regops, "optim")
needs_optim = pytest.mark.skipif(not HAS_OPTIM, reason="regops.optim is not in this build")
OPTIM_PAIRS = [pair for pair in backend_devices() if not triton_interpreted(*pair)]
PARAM_LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last"]


@st.composite
def param_sets(draw, max_params=4, max_numel=300):
    """Parameters of random shapes and layouts, split into 1-3 param groups."""
    count = draw(st.integers(1, max_params))
    params = [dict(shape=draw(shapes(max_numel=max_numel)), layout=draw(st.sampled_from(PARAM_LAYOUTS)),
                   seed=draw(st.integers(0, 2**31 - 1)), has_grad=draw(st.booleans() | st.just(True)))
              for _ in range(count)]
    groups = draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
    return params, groups


def build_params(spec, dtype, device):
    return [make_tensor(p["shape"], p["layout"], dtype, device, p["seed"]).requires_grad_() for p in spec]


HYPER = dict(
    lr=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)),
    weight_decay=st.one_of(st.just(0.0), st.floats(1e-6, 0.2)),
)


@st.composite
def sgd_groups(draw, n_groups):
    groups = []
    for _ in range(n_groups):
        # Positive hyperparameters stay above float32's tiny values: the kernels
        # compute in float32, where 1e-300 is 0 (and torch would keep a buffer).
        momentum = draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.99)))
        nesterov = momentum > 0 and draw(st.booleans())
        groups.append(dict(lr=draw(HYPER["lr"]), weight_decay=draw(HYPER["weight_decay"]), momentum=momentum,
                           dampening=0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.9))),
                           nesterov=nesterov, maximize=draw(st.booleans())))
    return groups


@st.composite
def adamw_groups(draw, n_groups):
    return [dict(lr=draw(HYPER["lr"]), weight_decay=draw(HYPER["weight_decay"]),
                 betas=(draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.99))),
                        draw(st.one_of(st.just(0.0), st.floats(0.5, 0.9999)))),
                 eps=draw(st.one_of(st.floats(1e-10, 1e-2), st.just(1e-8))),
                 amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
            for _ in range(n_groups)]


def _run_optimizer(cls, params, group_of, groups, steps, grad_seed):
    param_groups = [dict(params=[p for p, g in zip(params, group_of) if g == i], **groups[i])
                    for i in range(len(groups))]
    optimizer = cls([g for g in param_groups if g["params"]])
    gen = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        for p, has_grad in params_with_grad_flags(params):
            # Drawn in float32 and rounded to the parameter's dtype, so that
            # torch's float32 copy sees the very same gradient values.
            grad = torch.randn(p.shape, generator=gen).to(getattr(p, "_grad_dtype", p.dtype))
            p.grad = grad.to(p.dtype).to(p.device) if has_grad else None
        optimizer.step()
    return optimizer


def params_with_grad_flags(params):
    return [(p, getattr(p, "_has_grad", True)) for p in params]


def _check_optimizer(backend, device, regops_cls, torch_cls, spec, group_of, groups, steps, grad_seed, dtype):
    ours = build_params(spec, dtype, device)
    # torch's oracle runs in float32 (regops' math is float32 for every dtype).
    theirs = [p.detach().to(torch.float32, copy=True).requires_grad_() for p in ours]
    # The same storage layout for torch's copies (clone keeps dense strides;
    # a sliced view becomes contiguous there, which changes nothing for torch).
    for p, q, s in zip(ours, theirs, spec):
        p._has_grad = q._has_grad = s["has_grad"]
        q._grad_dtype = dtype
    with regops.use_backend(backend):
        optimizer = _run_optimizer(regops_cls, ours, group_of, groups, steps, grad_seed)
    reference_optimizer = _run_optimizer(lambda g: torch_cls(g, foreach=False), theirs, group_of, groups, steps,
                                         grad_seed)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 3e-2)
    for p, q in zip(ours, theirs):
        assert p.dtype == dtype and p.shape == q.shape
        torch.testing.assert_close(p.detach().float(), q.detach().float(), atol=atol, rtol=rtol)
        ours_state, theirs_state = optimizer.state.get(p, {}), reference_optimizer.state.get(q, {})
        for key, value in theirs_state.items():
            if key == "step" or value is None:
                continue
            assert key in ours_state, key
            torch.testing.assert_close(ours_state[key].float(), value.float(), atol=atol, rtol=rtol)


OPTIM_DTYPES = st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])


def _optimizer_case(data, pair, name, max_params=4, max_numel=300):
    spec, group_of = data.draw(param_sets(max_params=max_params, max_numel=max_numel))
    draw_groups = sgd_groups if name == "SGD" else adamw_groups
    groups = data.draw(draw_groups(max(group_of) + 1))
    dtype = data.draw(OPTIM_DTYPES)
    steps, grad_seed = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 2**31 - 1))
    _check_optimizer(*pair, getattr(regops.optim, name), getattr(torch.optim, name), spec, group_of, groups, steps,
                     grad_seed, dtype)


@needs_optim
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("pair", OPTIM_PAIRS, ids=pair_id)
@given(data=st.data())
def test_optimizer_matches_torch(pair, name, data):
    _optimizer_case(data, pair, name)


@needs_optim
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=pair_id)
@few(3)
@given(data=st.data())
def test_optimizer_matches_torch_triton_interpreted(pair, name, data):
    _optimizer_case(data, pair, name, max_params=2, max_numel=40)
