"""What the property tests (tests/test_*_properties.py) share: Hypothesis
strategies for shapes, layouts, dtypes and dropout arguments, the backend
pairs they run on, and bit equality with the Triton interpreter's bfloat16
allowance. Bounded by the Hypothesis profile of tests/conftest.py ("ci": 30
examples a test, derandomized, so a failure replays as is;
HYPOTHESIS_PROFILE=dev draws fresh examples and prints a @reproduce_failure
blob). Tensor values come from a torch generator seeded by a drawn integer,
so the example Hypothesis prints is the whole input. Triton under the
interpreter gets a few tiny examples."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from conftest import FLOAT_DTYPES, assert_same_bits, backend_devices, triton_interpreted

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]
SIZES = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 8, 13, 17, 33])

# Compiled backends (the reference is the oracle, so it is not tested against itself).
KERNEL_PAIRS = [pair for pair in backend_devices() if pair[0] != "reference"]
FAST_PAIRS = [pair for pair in KERNEL_PAIRS if not triton_interpreted(*pair)]
INTERPRETED_PAIRS = [pair for pair in KERNEL_PAIRS if triton_interpreted(*pair)]


def pair_id(pair):
    return f"{pair[0]}-{pair[1]}"


def few(n: int):
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
    if triton_interpreted(backend, device) and actual.dtype == torch.bfloat16:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, atol=0, rtol=2**-7, equal_nan=True)
    else:
        assert_same_bits(actual, expected)
