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
        direct = regops.dropout_backward(grad, mask, p)
        recomputed = regops.dropout(x, p, seed=seed, offset=offset, recompute_mask=True)
    keep = reference.dropout_keep(x.numel(), p, seed % 2**64, offset).reshape(shape)
    assert torch.equal(mask.cpu(), reference.pack_mask(keep))
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
        keep = regops.unpack_mask(mask, shape)
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
