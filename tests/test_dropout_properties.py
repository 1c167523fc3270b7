"""Property tests (Hypothesis, tests/property_strategies.py) of dropout and Philox on
every backend against regops.reference and torch, over random shapes, memory
layouts, dtypes, probabilities, seeds and offsets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import regops
from regops import reference
from property_strategies import (KERNEL_PAIRS, FAST_PAIRS, INTERPRETED_PAIRS, pair_id, few, shapes, make_tensor, tensors,
                        PROBABILITIES, SEEDS, OFFSETS, assert_bits_equal)


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


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=pair_id)
@given(case=tensors(), p=PROBABILITIES, seed=SEEDS, offset=OFFSETS)
def test_dropout_matches_reference(pair, case, p, seed, offset):
    _check_dropout(*pair, case, p, seed, offset)


@pytest.mark.parametrize("pair", INTERPRETED_PAIRS, ids=pair_id)
@few(4)
@given(case=tensors(max_numel=300, max_dims=3), p=PROBABILITIES, seed=SEEDS, offset=OFFSETS)
def test_dropout_matches_reference_triton_interpreted(pair, case, p, seed, offset):
    _check_dropout(*pair, case, p, seed, offset)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=pair_id)
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


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=pair_id)
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


@pytest.mark.parametrize("pair", KERNEL_PAIRS, ids=pair_id)
@few(10)
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


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=pair_id)
@few(15)
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
