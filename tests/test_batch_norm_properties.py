"""Property tests (Hypothesis, tests/property_strategies.py) of batch norm on every
backend against torch, over random shapes, layouts, dtypes and momenta."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import regops
from conftest import BATCH_NORM_TOLERANCES, backend_devices, triton_interpreted
from property_strategies import FLOAT_DTYPES, SIZES, INTERPRETED_PAIRS, pair_id, few


# --- batch norm ------------------------------------------------------------------

HAS_BATCH_NORM = hasattr(regops, "batch_norm")
needs_batch_norm = pytest.mark.skipif(not HAS_BATCH_NORM, reason="regops.batch_norm is not in this build")
# Every backend, the reference included: here torch is the oracle.
BN_PAIRS = [pair for pair in backend_devices() if not triton_interpreted(*pair)]
# Normalized outputs are O(1); float64 statistics of the same input are the oracle.
# The random cases keep a bfloat16 rtol of 3e-2.
BN_TOLERANCE = {**BATCH_NORM_TOLERANCES, torch.bfloat16: (3e-2, 3e-2)}


@st.composite
def batch_norm_cases(draw, max_numel=2048, dtypes=FLOAT_DTYPES):
    spatial = draw(st.lists(SIZES, min_size=0, max_size=3))
    n, c = draw(SIZES), draw(st.sampled_from([1, 2, 3, 7, 16]))
    shape = [n, c] + spatial
    while torch.Size(shape).numel() > max_numel:
        shape[shape.index(max(shape))] //= 2
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]))
    if layout == "channels_last" and len(shape) == 5:
        layout = "channels_last_3d"
    return dict(
        shape=tuple(shape), layout=layout, dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31 - 1)),
        training=draw(st.booleans()), affine=draw(st.booleans()), track=draw(st.booleans()),
        momentum=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))),
        eps=draw(st.one_of(st.just(1e-5), st.floats(1e-10, 1.0))),  # torch refuses eps <= 0 in training
        activation=draw(st.sampled_from([None, "relu"])), param_dtype=draw(st.sampled_from(["acc", "input"])),
    )


def bn_input(case, device) -> torch.Tensor:
    shape, layout, dtype, seed = case["shape"], case["layout"], case["dtype"], case["seed"]
    gen = torch.Generator().manual_seed(seed)
    # A per-channel shift and scale, so the statistics are not trivially (0, 1).
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    base = base * torch.rand(shape[1], generator=gen, dtype=torch.float64).add(0.5).view(view) \
        + torch.randn(shape[1], generator=gen, dtype=torch.float64).mul(3).view(view)
    x = base.to(dtype=dtype, device=device)
    if layout == "channels_last" and len(shape) == 4:
        return x.to(memory_format=torch.channels_last)
    if layout == "channels_last_3d" and len(shape) == 5:
        return x.to(memory_format=torch.channels_last_3d)
    if layout == "transposed" and len(shape) >= 3:
        # (N, C, ..., L) stored as (L, ..., C, N): every stride differs from contiguous.
        return x.permute(*reversed(range(len(shape)))).contiguous().permute(*reversed(range(len(shape))))
    if layout == "sliced":
        bigger = torch.cat([x, x], dim=-1) if len(shape) > 2 else torch.cat([x, x], dim=0)
        return bigger[..., ::2] if len(shape) > 2 else bigger[::2]
    return x


def _values_per_channel(shape) -> int:
    count = shape[0]
    for size in shape[2:]:
        count *= size
    return count


def _check_batch_norm(backend, device, case):
    dtype, shape, c = case["dtype"], case["shape"], case["shape"][1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    param_dtype = acc if case["param_dtype"] == "acc" else dtype
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = bn_input(case, device).requires_grad_()
    weight = bias = None
    if case["affine"]:
        weight = torch.randn(c, generator=gen).to(param_dtype).to(device).requires_grad_()
        bias = torch.randn(c, generator=gen).to(param_dtype).to(device).requires_grad_()
    running = (torch.randn(c, generator=gen).to(param_dtype).to(device),
               torch.rand(c, generator=gen).add(0.5).to(param_dtype).to(device)) if case["track"] else (None, None)
    training = case["training"] or not case["track"]
    momentum, eps, activation = case["momentum"], case["eps"], case["activation"]

    # torch in float64 on the same values: the oracle.
    x64 = x.detach().to(torch.float64).requires_grad_()
    w64 = weight.detach().to(torch.float64).requires_grad_() if weight is not None else None
    b64 = bias.detach().to(torch.float64).requires_grad_() if bias is not None else None
    run64 = tuple(r.to(torch.float64, copy=True) if r is not None else None for r in running)
    kwargs = dict(training=training, momentum=momentum, eps=eps)

    count = _values_per_channel(shape)
    if training and count == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            torch.nn.functional.batch_norm(x64, *run64, w64, b64, **kwargs)
        with regops.use_backend(backend), pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            regops.batch_norm(x, *running, weight, bias, **kwargs, activation=activation)
        return
    if count == 0:
        # torch's own kernels disagree on empty batches (some write NaN running
        # statistics); regops leaves the buffers alone and returns an empty output.
        before = [r.clone() for r in running if r is not None]
        with regops.use_backend(backend):
            y = regops.batch_norm(x, *running, weight, bias, **kwargs, activation=activation)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert all(torch.equal(r, b) for r, b in zip([r for r in running if r is not None], before))
        return

    def torch_batch_norm(dtype_):
        """torch's batch norm on copies of the inputs in ``dtype_``: the
        output, the running statistics and the gradients of x, weight, bias."""
        # On a contiguous copy: torch's CPU batch norm backward returns a wrong
        # input gradient for some degenerate strides (e.g. shape (1, 3, 1, 2),
        # strides (1, 1, 3, 3), with a contiguous grad_output), and the math
        # does not depend on the layout.
        xs = x.detach().to(dtype_).contiguous().requires_grad_()
        ws = [t.detach().to(dtype_).requires_grad_() if t is not None else None for t in (weight, bias)]
        runs = [r.to(dtype_, copy=True) if r is not None else None for r in running]
        out = torch.nn.functional.batch_norm(xs, *runs, *ws, **kwargs)
        if activation == "relu":
            out = torch.relu(out)
        leaves = [t for t in [xs] + ws if t is not None]
        grads_ = torch.autograd.grad(out, leaves, grad.to(dtype_))
        return out.detach(), runs, grads_

    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected, expected_running, expected_grads = torch_batch_norm(torch.float64)
    # torch's float32 result shows how well-conditioned each value is: with two
    # nearly equal values per channel even the exact algorithm in float32 loses
    # digits. regops may be off by a few times torch's own float32 error.
    torch32, torch32_running, torch32_grads = torch_batch_norm(torch.float32)
    with regops.use_backend(backend):
        y = regops.batch_norm(x, *running, weight, bias, **kwargs, activation=activation)
    assert y.shape == x.shape and y.dtype == dtype
    atol, rtol = BN_TOLERANCE[dtype]
    assert_as_accurate_as_torch(y, expected, torch32, atol, rtol, "output")
    for got, want, t32 in zip(running, expected_running, torch32_running):
        if got is not None:
            assert got.dtype == param_dtype
            assert_as_accurate_as_torch(got, want, t32, atol, rtol, "running statistic")

    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad.to(dtype=dtype, device=device))
    for got, want, t32, t, name in zip(grads, expected_grads, torch32_grads, inputs, ["input", "weight", "bias"]):
        assert got.dtype == t.dtype and got.shape == t.shape
        # Weight and bias gradients sum N * L values.
        scale = 1.0 if t is x else count ** 0.5
        assert_as_accurate_as_torch(got, want, t32, atol * scale, rtol, f"gradient of {name}")


def assert_as_accurate_as_torch(got, want64, torch32, atol, rtol, what):
    """|got - exact| <= 4 |torch float32 - exact| + atol * max(1, |exact|) + rtol |exact|,
    elementwise; NaN where and only where the exact result is NaN."""
    got, want64, torch32 = got.detach().cpu().to(torch.float64), want64.cpu(), torch32.cpu().to(torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want64)), what
    finite = ~torch.isnan(want64)
    error = (got - want64)[finite].abs()
    scale = max(1.0, want64[finite].abs().max().item()) if finite.any() else 1.0
    bound = 4 * (torch32 - want64)[finite].abs() + atol * scale + rtol * want64[finite].abs()
    worst = (error - bound).argmax() if error.numel() else None
    assert error.numel() == 0 or bool((error <= bound).all()), (
        f"{what}: error {error[worst].item():.3g} > bound {bound[worst].item():.3g} "
        f"(exact {want64[finite][worst].item():.6g}, got {got[finite][worst].item():.6g}, "
        f"torch float32 {torch32[finite][worst].item():.6g})")


@needs_batch_norm
@pytest.mark.parametrize("pair", BN_PAIRS, ids=pair_id)
@given(case=batch_norm_cases())
def test_batch_norm_matches_torch(pair, case):
    _check_batch_norm(*pair, case)


@needs_batch_norm
@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=pair_id)
@few(3)
@given(case=batch_norm_cases(max_numel=128, dtypes=[torch.float32]))
def test_batch_norm_matches_torch_triton_interpreted(pair, case):
    _check_batch_norm(*pair, case)


@needs_batch_norm
@few(15)
@given(case=batch_norm_cases(max_numel=512), steps=st.integers(1, 4), momentum=st.one_of(st.none(), st.floats(0, 1)))
def test_batch_norm_module_matches_torch_module(case, steps, momentum):
    """regops.nn.BatchNorm{1,2,3}d against torch.nn's over a few training
    steps and then eval: outputs, running statistics, num_batches_tracked
    (momentum=None: the cumulative average)."""
    shape = case["shape"]
    if len(shape) < 3 and len(shape) != 2:
        return
    module_name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    if _values_per_channel(shape) <= 1:
        return
    ours = getattr(regops.nn, module_name)(shape[1], eps=case["eps"], momentum=momentum,
                                            affine=case["affine"], track_running_stats=case["track"])
    theirs = getattr(torch.nn, module_name)(shape[1], eps=case["eps"], momentum=momentum,
                                            affine=case["affine"], track_running_stats=case["track"])
    theirs.load_state_dict(ours.state_dict())
    x = bn_input({**case, "dtype": torch.float32}, "cpu")
    for step in range(steps + 1):
        if step == steps:
            ours.eval()
            theirs.eval()
        # atol: two nearly equal values in a channel leave (x - mean) with a
        # float32 rounding error that invstd (up to 1 / sqrt(eps)) magnifies;
        # torch's CPU module accumulates in float64 (found by the dev profile).
        torch.testing.assert_close(ours(x + step), theirs(x + step), atol=1e-3, rtol=1e-4)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-4, rtol=1e-4)
