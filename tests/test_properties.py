"""Property tests (Hypothesis): every op on every backend against
regops.reference and torch, over random shapes (0- and 1-sized dimensions
included), memory layouts (transposed, sliced, expanded, channels_last),
dtypes and hyperparameters.

Bounded by the Hypothesis profile of tests/conftest.py ("ci": 30 examples a
test, derandomized, so a failure replays as is; HYPOTHESIS_PROFILE=dev draws
fresh examples and prints a @reproduce_failure blob). Tensor values come from
a torch generator seeded by a drawn integer, so the example Hypothesis prints
is the whole input. Triton under the interpreter gets a few tiny examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import regops
from regops import reference
from conftest import backend_devices, triton_interpreted

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]
SIZES = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 8, 13, 17, 33])

# Compiled backends (the reference is the oracle, so it is not tested against itself).
KERNEL_PAIRS = [pair for pair in backend_devices() if pair[0] != "reference"]
FAST_PAIRS = [pair for pair in KERNEL_PAIRS if not triton_interpreted(*pair)]
INTERPRETED_PAIRS = [pair for pair in KERNEL_PAIRS if triton_interpreted(*pair)]


def _pair_id(pair):
    return f"{pair[0]}-{pair[1]}"


def _few(n: int):
    """At most n examples, fewer if the profile asks for fewer."""
    return settings(max_examples=min(n, settings.default.max_examples))


@st.composite
def shapes(draw, min_dims=0, max_dims=4, max_numel=4096):
    dims = draw(st.lists(SIZES, min_size=min_dims, max_size=max_dims))
    while dims and torch.Size(dims).numel() > max_numel:
        dims[dims.index(max(dims))] //= 2
    return tuple(dims)


def make_tensor(shape, layout: str, dtype, device, seed: int) -> torch.Tensor:
    """A tensor of ``shape`` with the given memory layout and standard-normal
    values from ``seed``. Layouts that do not apply to a shape fall back to
    contiguous (e.g. channels_last needs 4 dims)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    if layout == "transposed" and len(shape) >= 2:
        return randn(*reversed(shape)).permute(*reversed(range(len(shape))))
    if layout == "sliced" and len(shape) >= 1:
        # Every other element of a larger tensor, starting one in, along dim 0.
        bigger = randn(2 * shape[0] + 1, *shape[1:])
        return bigger[1::2]
    if layout == "expanded" and len(shape) >= 1 and shape[-1] > 1:
        return randn(*shape[:-1], 1).expand(shape)
    if layout == "channels_last" and len(shape) == 4:
        return randn(*shape).to(memory_format=torch.channels_last)
    return randn(*shape)


@st.composite
def tensors(draw, dtypes=FLOAT_DTYPES, max_numel=4096, min_dims=0, max_dims=4):
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_numel=max_numel))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, layout, dtype, seed


# p: the edges, values near them, and anything in between.
PROBABILITIES = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 2.0**-32, 1.0 - 2.0**-32, 1e-300]),
    st.floats(0.0, 1.0, allow_nan=False),
)
SEEDS = st.integers(-(2**63), 2**64 - 1)
OFFSETS = st.one_of(st.integers(0, 2**33), st.integers(0, 2**62 - 1))


def assert_bits_equal(actual, expected, backend, device):
    """Bit equality; the Triton interpreter rounds float32 -> bfloat16 by
    truncation (a GPU rounds to nearest), so there 1 bf16 ulp is allowed."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if triton_interpreted(backend, device) and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual, expected, atol=0, rtol=2**-7, equal_nan=True)
    else:
        assert torch.equal(_bits(actual), _bits(expected))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a float tensor in logical order (NaN == NaN, -0 != +0)."""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


# --- dropout -------------------------------------------------------------------

def _check_dropout(backend, device, case, p, seed, offset):
    shape, layout, dtype, value_seed = case
    x = make_tensor(shape, layout, dtype, device, value_seed).requires_grad_()
    with regops.use_backend(backend):
        y, mask = regops.dropout_with_mask(x, p, seed=seed, offset=offset)
        grad = make_tensor(shape, "contiguous", dtype, device, value_seed + 1)
        (grad_x,) = torch.autograd.grad(y, x, grad) if x.numel() else (torch.zeros_like(x),)
        direct = regops.dropout_backward(grad, mask, p, like=x)
        recomputed = regops.dropout(x, p, seed=seed, offset=offset, recompute_mask=True)
    # The random rule numbers a dense x's elements in its memory order (a
    # transposed x's differ from row-major), any other x's in row-major order.
    flat_keep = reference.dropout_keep(x.numel(), p, seed % 2**64, offset)
    assert torch.equal(mask.cpu(), reference.pack_mask(flat_keep))
    keep = reference.in_memory_order(flat_keep, x.detach().cpu())
    assert_bits_equal(y, reference.dropout_apply(x.detach().cpu(), keep, p), backend, device)
    expected_grad = reference.dropout_apply(grad.cpu(), keep, p)
    assert_bits_equal(direct, expected_grad, backend, device)
    # x is itself the leaf (even when it is an expanded view), so its
    # gradient is elementwise.
    assert_bits_equal(grad_x, expected_grad, backend, device)
    assert_bits_equal(recomputed.detach(), y.detach(), backend, device)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=_pair_id)
@given(case=tensors(), p=PROBABILITIES, seed=SEEDS, offset=OFFSETS)
def test_dropout_matches_reference(pair, case, p, seed, offset):
    _check_dropout(*pair, case, p, seed, offset)


@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=_pair_id)
@_few(4)
@given(case=tensors(max_numel=300, max_dims=3), p=PROBABILITIES, seed=SEEDS, offset=OFFSETS)
def test_dropout_matches_reference_triton_interpreted(pair, case, p, seed, offset):
    _check_dropout(*pair, case, p, seed, offset)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=_pair_id)
@given(case=tensors(), p=PROBABILITIES, seed=SEEDS, offset=OFFSETS)
def test_dropout_inplace_equals_out_of_place(pair, case, p, seed, offset):
    backend, device = pair
    shape, layout, dtype, value_seed = case
    if layout == "expanded":
        layout = "sliced"  # writing in place into overlapping memory is refused by torch itself
    x = make_tensor(shape, layout, dtype, device, value_seed)
    with regops.use_backend(backend):
        expected = regops.dropout(x, p, seed=seed, offset=offset)
        out = regops.dropout(x, p, inplace=True, seed=seed, offset=offset)
    assert out is x
    assert_bits_equal(x.contiguous(), expected, backend, device)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=_pair_id)
@given(case=tensors(dtypes=[torch.float32]), p=PROBABILITIES)
def test_dropout_matches_torch_formula(pair, case, p):
    """torch.nn.functional.dropout's definition, written with torch ops: each
    element is x * (1 / (1 - p)) or x * 0 (NaN-preserving), and for p in (0, 1)
    the kept fraction is within a generous binomial bound."""
    backend, device = pair
    shape, layout, dtype, value_seed = case
    x = make_tensor(shape, layout, dtype, device, value_seed)
    with regops.use_backend(backend):
        y, mask = regops.dropout_with_mask(x, p, seed=value_seed)
        keep = regops.unpack_mask(mask, like=x)
    scale = torch.tensor(0.0 if p == 1.0 else 1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(y, x * torch.where(keep, scale, torch.zeros(())))
    if p == 0.0:
        assert keep.all()
    if p == 1.0:
        assert not keep.any()


@pytest.mark.parametrize("pair", KERNEL_PAIRS, ids=_pair_id)
@_few(10)
@given(rows=st.integers(0, 40), words=st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6))
def test_philox_matches_reference(pair, rows, words):
    backend, device = pair
    gen = torch.Generator().manual_seed(words[0])
    counter = torch.randint(0, 2**32, (rows, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (rows, 2), generator=gen, dtype=torch.int64)
    if rows:  # and the extremes
        counter[0], key[0] = torch.tensor(words[:4]), torch.tensor(words[4:])
    with regops.use_backend(backend):
        out = regops.philox4x32_10(counter.to(device), key.to(device))
    expected = torch.stack(reference.philox4x32_10(list(counter.unbind(1)), (key[:, 0], key[:, 1])), dim=1)
    assert torch.equal(out.cpu(), expected.reshape(rows, 4))


@given(shape=shapes(), seed=st.integers(0, 2**31 - 1))
def test_unpack_mask_inverts_pack(shape, seed):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask = reference.pack_mask(keep)
    assert mask.numel() == reference.mask_bytes(keep.numel()) and mask.numel() % 16 == 0
    assert torch.equal(regops.unpack_mask(mask, shape), keep)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=_pair_id)
@_few(15)
@given(case=tensors(), p=st.floats(0.0, 0.99), torch_seed=st.integers(0, 2**31 - 1))
def test_dropout_module_follows_torch_manual_seed(pair, case, p, torch_seed):
    """regops.nn.Dropout draws its seed from torch's generator: the same
    manual_seed gives the same output, in training; eval is the identity."""
    backend, device = pair
    shape, layout, dtype, value_seed = case
    x = make_tensor(shape, layout, dtype, device, value_seed)
    module = regops.nn.Dropout(p)
    with regops.use_backend(backend):
        torch.manual_seed(torch_seed)
        first = module(x)
        torch.manual_seed(torch_seed)
        second = module(x)
        module.eval()
        assert module(x) is x
    assert torch.equal(first, second) and first.shape == x.shape


# --- batch norm ------------------------------------------------------------------

HAS_BATCH_NORM = hasattr(regops, "batch_norm")
needs_batch_norm = pytest.mark.skipif(not HAS_BATCH_NORM, reason="regops.batch_norm is not in this build")
# Every backend, the reference included: here torch is the oracle.
BN_PAIRS = [pair for pair in backend_devices() if not triton_interpreted(*pair)]
# Normalized outputs are O(1); float64 statistics of the same input are the oracle.
BN_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3),
                torch.bfloat16: (3e-2, 3e-2)}


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
@pytest.mark.parametrize("pair", BN_PAIRS, ids=_pair_id)
@given(case=batch_norm_cases())
def test_batch_norm_matches_torch(pair, case):
    _check_batch_norm(*pair, case)


@needs_batch_norm
@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=_pair_id)
@_few(3)
@given(case=batch_norm_cases(max_numel=128, dtypes=[torch.float32]))
def test_batch_norm_matches_torch_triton_interpreted(pair, case):
    _check_batch_norm(*pair, case)


@needs_batch_norm
@_few(15)
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
@pytest.mark.parametrize("pair", OPTIM_PAIRS, ids=_pair_id)
@given(data=st.data())
def test_optimizer_matches_torch(pair, name, data):
    _optimizer_case(data, pair, name)


@needs_optim
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=_pair_id)
@_few(3)
@given(data=st.data())
def test_optimizer_matches_torch_triton_interpreted(pair, name, data):
    _optimizer_case(data, pair, name, max_params=2, max_numel=40)
