"""Dropout: the random rule, every backend against the reference, autograd,
torch.library checks, torch.compile, and the errors users see."""

import math

import pytest
import torch
from torch.library import opcheck

import regops
from regops import reference
from conftest import (CUDA_DEVICE, HAS_CUDA, TRITON_OPCHECK_UTILS, backend_devices, compile_backend_devices,
                      native_op_targets, needs_cuda_backend,
                      triton_interpreted)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Sizes that are not multiples of 4, 8 or 16, around the CPU block (128) and
# the Triton block (1024 elements: the full ones run unmasked).
SIZES = [1, 3, 7, 9, 15, 17, 127, 129, 1000, 1025, 2049, 4099]
# Offsets past 2^32 use the high word of the Philox counter.
OFFSETS = [0, 1, 5, (1 << 32) - 3, (1 << 33) + 7, (1 << 61) + 12345]
SEEDS = [0, 1, 0x1234_5678_9ABC_DEF0, (1 << 64) - 1, -7]

# Random123's published known-answer vectors for Philox4x32-10:
# (counter words, key words, output words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def assert_output_equal(actual, expected, backend, device):
    """Bit equality, except that the Triton interpreter converts float32 to
    bfloat16 by truncation where a GPU rounds to nearest even: there the
    result may be 1 bf16 ulp off, and only there."""
    if triton_interpreted(backend, device) and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual, expected, atol=0, rtol=2**-7)
    else:
        assert torch.equal(actual, expected)


def test_philox_known_answers(backend_device):
    _, device = backend_device
    counter = torch.tensor([kat[0] for kat in PHILOX_KAT], dtype=torch.int64, device=device)
    key = torch.tensor([kat[1] for kat in PHILOX_KAT], dtype=torch.int64, device=device)
    expected = torch.tensor([kat[2] for kat in PHILOX_KAT], dtype=torch.int64)
    assert torch.equal(regops.philox4x32_10(counter, key).cpu(), expected)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_masks_bit_identical_to_reference(backend_device, p):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(int(p * 100))
    for n in SIZES:
        seed = SEEDS[torch.randint(len(SEEDS), (1,), generator=gen).item()]
        offset = OFFSETS[torch.randint(len(OFFSETS), (1,), generator=gen).item()]
        x = torch.randn(n, generator=gen).to(device)
        _, mask = regops.dropout_with_mask(x, p, seed=seed, offset=offset)
        _, expected = reference.dropout_with_mask(x.cpu(), p, seed % (1 << 64), offset)
        assert mask.dtype == torch.uint8 and mask.shape == (reference.mask_bytes(n),)
        assert torch.equal(mask.cpu(), expected), f"n={n} seed={seed} offset={offset}"


def test_masks_identical_across_backends():
    """The same (numel, p, seed, offset) gives the same mask on every backend."""
    masks = {}
    for backend, device in backend_devices():
        with regops.use_backend(backend):
            x = torch.ones(3001, device=device)
            masks[(backend, device)] = regops.dropout_with_mask(x, 0.37, seed=99, offset=(1 << 32) + 1)[1].cpu()
    first = next(iter(masks.values()))
    assert len(masks) >= 2
    for key, mask in masks.items():
        assert torch.equal(mask, first), key


def test_mask_padding_bits_are_zero(backend_device):
    _, device = backend_device
    for n in (1, 7, 9, 100, 129):
        _, mask = regops.dropout_with_mask(torch.ones(n, device=device), 0.0, seed=3)
        bits = reference.unpack_mask(mask.cpu(), (mask.numel() * 8,))
        assert bits[:n].all() and not bits[n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_exact(backend_device, dtype):
    backend, device = backend_device
    if dtype == torch.float64 and device.type == "cuda" and backend == "triton":
        pytest.skip("float64 is a CPU/gradcheck dtype")
    for n in (5, 130, 2050):
        x = torch.randn(n, 3, dtype=dtype, device=device, requires_grad=True)
        y, mask = regops.dropout_with_mask(x, 0.3, seed=n, offset=11)
        keep = regops.unpack_mask(mask, x.shape)
        assert_output_equal(y, reference.dropout_apply(x.detach(), keep, 0.3), backend, device)
        grad = torch.randn_like(y)
        (grad_x,) = torch.autograd.grad(y, x, grad)
        assert_output_equal(grad_x, reference.dropout_apply(grad, keep, 0.3), backend, device)


def test_output_is_x_times_keep_times_scale(backend_device):
    """The defining formula, written out without the reference module."""
    backend, device = backend_device
    x = torch.randn(999, device=device)
    y, mask = regops.dropout_with_mask(x, 0.25, seed=5)
    keep = regops.unpack_mask(mask, x.shape)
    assert torch.equal(y, torch.where(keep, x * torch.tensor(1 / 0.75, dtype=torch.float32), torch.zeros_like(x)))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_kept_fraction_within_binomial_bounds(backend_device, p):
    backend, device = backend_device
    n = 20_000 if triton_interpreted(backend, device) else 400_000
    for seed in (1, 2, 3):
        _, mask = regops.dropout_with_mask(torch.zeros(n, device=device), p, seed=seed)
        kept = regops.unpack_mask(mask, (n,)).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(kept - (1 - p)) < 6 * sigma, (kept, 1 - p, sigma)


def test_bits_are_independent_of_position():
    """Each of the four words of a Philox call, and each bit position of a
    mask byte, keeps at the same rate (a misplaced word index would not)."""
    n = 1 << 18
    _, mask = regops.dropout_with_mask(torch.zeros(n), 0.5, seed=17)
    keep = regops.unpack_mask(mask, (n // 8, 8)).double()
    rates = keep.mean(dim=0)
    assert (rates - 0.5).abs().max() < 6 * math.sqrt(0.25 / (n // 8))


def test_recompute_mask_gives_the_same_gradient(backend_device):
    _, device = backend_device
    x = torch.randn(37, 41, device=device, requires_grad=True)
    grad = torch.randn(37, 41, device=device)
    y1 = regops.dropout(x, 0.4, seed=8, offset=3)
    y2 = regops.dropout(x, 0.4, seed=8, offset=3, recompute_mask=True)
    assert torch.equal(y1, y2)
    (g1,) = torch.autograd.grad(y1, x, grad)
    (g2,) = torch.autograd.grad(y2, x, grad)
    assert torch.equal(g1, g2)


def test_recompute_mask_saves_no_mask():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4096, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        regops.dropout(x, 0.5, recompute_mask=True)
    assert sum(t.numel() * t.element_size() for t in saved) == 8  # the seed
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        regops.dropout(x, 0.5)
    assert sum(t.numel() * t.element_size() for t in saved) == 4096 // 8  # one bit per element


def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    x = torch.randn(6, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.dropout(t, 0.3, seed=4), (x,))
    assert torch.autograd.gradcheck(lambda t: regops.dropout(t, 0.3, seed=4, recompute_mask=True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: regops.dropout(t, 0.3, seed=4), (x,))


def test_non_dense_input_uses_logical_order(backend_device):
    """A view with gaps is copied to contiguous: its elements are numbered row-major."""
    backend, device = backend_device
    base = torch.randn(40, 30, device=device)
    for view in (base[:, ::3], base[5:, 2:].t(), base[::2, None]):
        y, mask = regops.dropout_with_mask(view, 0.5, seed=21)
        y_contiguous, mask_contiguous = regops.dropout_with_mask(view.contiguous(), 0.5, seed=21)
        assert y.shape == view.shape and y.is_contiguous()
        assert torch.equal(mask, mask_contiguous) and torch.equal(y, y_contiguous)
        assert torch.equal(regops.unpack_mask(mask, like=view), regops.unpack_mask(mask, view.shape))


def _dense_layouts(device):
    """Dense tensors that are not contiguous, and one that is: each is its
    memory seen through other strides."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(3, 5, 7, 4, generator=gen).to(device)
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(2, 3, 4, 5, 3, generator=gen).to(device).contiguous(
            memory_format=torch.channels_last_3d),
        "permuted": x.permute(2, 0, 3, 1),
        "transposed": torch.randn(33, 17, generator=gen).to(device).t(),
        "offset": torch.randn(9, 7, 5, generator=gen).to(device)[2:].transpose(0, 2),
        "size-1 strides": torch.randn(5, 1, 13, 1, generator=gen).to(device).as_strided(
            (5, 1, 13, 1), (13, 1000, 1, 7)),
        "contiguous": x,
    }


@pytest.mark.parametrize("layout", list(_dense_layouts("cpu")))
def test_dense_input_keeps_its_layout_and_memory_order(backend_device, layout):
    """The random rule numbers a dense tensor's elements in memory order: the
    output has the input's strides, and mask and output are those of the
    same memory read as a contiguous tensor, bit for bit on every backend."""
    backend, device = backend_device
    x = _dense_layouts(device)[layout]
    order = reference.memory_order(x)
    assert order is not None
    y, mask = regops.dropout_with_mask(x, 0.4, seed=17, offset=3)
    flat_y, flat_mask = regops.dropout_with_mask(x.permute(order).contiguous(), 0.4, seed=17, offset=3)
    assert all(a == b for a, b, size in zip(y.stride(), x.stride(), x.shape) if size > 1), (y.stride(), x.stride())
    assert torch.equal(mask, flat_mask) and torch.equal(y.permute(order), flat_y)
    assert torch.equal(mask.cpu(), reference.dropout_with_mask(x.cpu(), 0.4, 17, 3)[1])
    keep = regops.unpack_mask(mask, like=x)
    assert keep.shape == x.shape
    assert torch.equal(y, torch.where(keep, x * torch.tensor(1 / 0.6, dtype=x.dtype), torch.zeros_like(x)))
    # In place: the same bits, and still the same layout.
    inplace = x.clone(memory_format=torch.preserve_format)
    regops.dropout(inplace, 0.4, inplace=True, seed=17, offset=3)
    assert torch.equal(inplace, y)


@pytest.mark.parametrize("recompute_mask", [False, True], ids=["mask", "recompute"])
def test_gradient_in_another_layout_gets_the_right_bits(backend_device, recompute_mask):
    """A contiguous gradient for a channels_last input (autograd may hand
    either) is read in the input's memory order, as is the second derivative."""
    backend, device = backend_device
    layouts = _dense_layouts(device)
    cases = (layouts["channels_last"], layouts["size-1 strides"])
    if triton_interpreted(backend, device):
        # gradgradcheck launches kernels per element: a small case for the interpreter.
        cases = (torch.randn(2, 3, 2, 2, device=device).contiguous(memory_format=torch.channels_last),)
    for x in cases:
        x = x.double().requires_grad_()
        y = regops.dropout(x, 0.3, seed=9, recompute_mask=recompute_mask)
        keep = regops.unpack_mask(regops.dropout_with_mask(x.detach(), 0.3, seed=9)[1], like=x)
        grad = torch.randn(x.shape, dtype=x.dtype, device=device)
        for grad_layout in (grad, grad.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else grad.t()):
            (grad_x,) = torch.autograd.grad(y, x, grad_layout, retain_graph=True)
            assert torch.equal(grad_x, torch.where(keep, grad * (1 / 0.7), torch.zeros_like(grad)))
        assert torch.autograd.gradgradcheck(lambda t: regops.dropout(t, 0.3, seed=9, recompute_mask=recompute_mask),
                                            (x,), gen_non_contig_grad_outputs=True)
    # The public backward, given the input as like=.
    x = layouts["channels_last"]
    _, mask = regops.dropout_with_mask(x, 0.3, seed=9)
    grad = torch.randn(x.shape, device=device)
    expected = torch.where(regops.unpack_mask(mask, like=x), grad * torch.tensor(1 / 0.7), torch.zeros_like(grad))
    assert torch.equal(regops.dropout_backward(grad, mask, 0.3, like=x), expected)


def test_dense_input_is_not_copied():
    """The CPU kernels read a dense input where it lies: no copy in the
    forward or the backward (the profiler does see the copy of a non-dense input)."""
    def copies(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]

    x = _dense_layouts("cpu")["channels_last"].requires_grad_()
    with regops.use_backend("cpu"):
        y = regops.dropout(x, 0.5, seed=1)
        grad = torch.randn_like(y)
        assert copies(lambda: regops.dropout(x, 0.5, seed=1)) == []
        assert copies(lambda: torch.autograd.grad(y, x, grad, retain_graph=True)) == []
        assert copies(lambda: regops.dropout(x.detach()[:, :, ::2], 0.5, seed=1)) != []


def test_unpack_mask_arguments():
    x = torch.randn(4, 6)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    assert torch.equal(regops.unpack_mask(mask, x.shape), regops.unpack_mask(mask, like=x))
    with pytest.raises(ValueError, match="contradicts like's shape"):
        regops.unpack_mask(mask, (6, 4), like=x)
    with pytest.raises(ValueError, match="needs the shape"):
        regops.unpack_mask(mask)
    with pytest.raises(ValueError, match="like must have grad's shape"):
        regops.dropout_backward(x, mask, 0.5, like=x.t())


def test_empty_input(backend_device):
    _, device = backend_device
    x = torch.empty(0, 3, device=device, requires_grad=True)
    y, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    assert y.shape == (0, 3) and mask.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_views_and_a_strided_mask(backend_device, dtype):
    """An input that starts one element into its storage (not 16-byte
    aligned), sizes that are not multiples of 4, 8 or 16, and a mask read
    through a stride-2 view: the same values as the reference."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(12)
    for numel in (1, 13, 1025, 2051):
        storage = torch.randn(numel + 1, generator=gen).to(dtype=dtype, device=device)
        x = storage[1:]
        y, mask = regops.dropout_with_mask(x, 0.3, seed=21)
        want_y, want_mask = reference.dropout_with_mask(x.cpu(), 0.3, 21)
        assert torch.equal(mask.cpu(), want_mask)
        assert_output_equal(y.cpu(), want_y, backend, device)
        wide = torch.full((2 * mask.numel(),), 0xA5, dtype=torch.uint8, device=device)
        wide[::2] = mask
        grad = torch.randn(numel + 1, generator=gen).to(dtype=dtype, device=device)[1:]
        assert_output_equal(regops.dropout_backward(grad, wide[::2], 0.3).cpu(),
                            reference.dropout_backward(grad.cpu(), mask.cpu(), 0.3), backend, device)


def test_eval_is_identity_and_p_zero_keeps_all(backend_device):
    _, device = backend_device
    x = torch.randn(10, 10, device=device)
    assert regops.dropout(x, 0.5, training=False) is x
    assert torch.equal(regops.dropout(x, 0.0, seed=1), x)
    assert torch.equal(regops.dropout(x, 1.0, seed=1), torch.zeros_like(x))


def test_nan_and_inf_propagate_like_torch(backend_device):
    """A dropped NaN stays NaN (x * 0), as torch's dropout multiplies too."""
    _, device = backend_device
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 64, device=device)
    y, mask = regops.dropout_with_mask(x, 0.5, seed=3)
    keep = regops.unpack_mask(mask, x.shape)
    expected = x * torch.where(keep, 2.0, 0.0)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(y[~torch.isnan(y)], expected[~torch.isnan(expected)])


def test_inplace(backend_device):
    _, device = backend_device
    x = torch.randn(300, device=device)
    expected = regops.dropout(x, 0.5, seed=6)
    out = regops.dropout(x, 0.5, inplace=True, seed=6)
    assert out is x and torch.equal(x, expected)
    # A non-contiguous view is updated in place too.
    base = torch.randn(20, 30, device=device)
    view = base.t()
    expected = regops.dropout(view, 0.5, seed=6)
    regops.dropout(view, 0.5, inplace=True, seed=6)
    assert torch.equal(view, expected)
    # With autograd, as torch: in place on a non-leaf, gradients flow.
    leaf = torch.randn(300, device=device, requires_grad=True)
    hidden = leaf * 2
    out = regops.dropout(hidden, 0.5, inplace=True, seed=6)
    assert out is hidden
    out.sum().backward()
    assert torch.equal(leaf.grad, 2 * (out != 0) * 2.0)


def test_seed_none_follows_torch_manual_seed(backend_device):
    _, device = backend_device
    x = torch.ones(1000, device=device)
    torch.manual_seed(0)
    a, b = regops.dropout(x, 0.5), regops.dropout(x, 0.5)
    torch.manual_seed(0)
    c = regops.dropout(x, 0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_thread_count_does_not_change_the_result():
    x = torch.randn(100_003)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = regops.dropout_with_mask(x, 0.3, seed=10)
        torch.set_num_threads(max(2, threads))
        many = regops.dropout_with_mask(x, 0.3, seed=10)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", None])
def test_bad_p_raises_value_error(p):
    with pytest.raises(ValueError, match="p must be in"):
        regops.dropout(torch.randn(3), p)
    with pytest.raises(ValueError, match="p must be in"):
        regops.nn.Dropout(p)


def test_tensor_p_is_read_once_like_torch(backend_device):
    """torch.nn.functional.dropout takes p as a one-element tensor (converted
    to a Python float); so does regops, on every entry."""
    _, device = backend_device
    x = torch.randn(300, device=device, requires_grad=True)
    for p in (torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64, device=device), torch.tensor([0.25])):
        value = float(p)
        y = regops.dropout(x, p, seed=5)
        assert torch.equal(y, regops.dropout(x, value, seed=5))
        out, mask = regops.dropout_with_mask(x, p, seed=5)
        assert torch.equal(mask, regops.dropout_with_mask(x, value, seed=5)[1])
        assert torch.equal(regops.dropout_backward(x.detach(), mask, p), regops.dropout_backward(x.detach(), mask, value))
        assert regops.nn.Dropout(p).p == value
    assert torch.equal(regops.dropout(x, torch.tensor(1)), torch.zeros_like(x))  # an integer tensor, as torch
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        regops.dropout(x, torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"one-element real tensor.*shape \(2,\)"):
        regops.dropout(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="one-element real tensor"):
        regops.dropout(x, torch.tensor(True))


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(100)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    with pytest.raises(ValueError, match="mask must be a flat uint8 tensor of 16 bytes"):
        regops.dropout_backward(x, mask[:8], 0.5)
    with pytest.raises(ValueError, match="mask must be a flat uint8"):
        regops.dropout_backward(x, mask.to(torch.int32), 0.5)
    with pytest.raises(ValueError, match="mask must be a flat uint8"):
        regops.unpack_mask(mask, (1000,))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        regops.dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        regops.dropout([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="offset must be"):
        regops.dropout(x, 0.5, offset=-1)
    with pytest.raises(ValueError, match="seed must be"):
        regops.dropout(x, 0.5, seed=1 << 64)
    # The C++ entry checks too, for callers of torch.ops directly.
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.regops.dropout_forward(x, 2.0, torch.tensor([1]), 0, True)
    with pytest.raises(RuntimeError, match="mask must be a flat uint8 tensor"):
        torch.ops.regops.dropout_backward(x, mask[:3], 0.5)


def test_unpack_mask_round_trip():
    keep = torch.rand(5, 7, 3) > 0.5
    assert torch.equal(regops.unpack_mask(reference.pack_mask(keep), keep.shape), keep)


def _opcheck_args():
    x = torch.randn(100, dtype=torch.float64)
    seed = torch.tensor([5])
    _, mask = torch.ops.regops.dropout_forward(x, 0.3, seed, 7, True)
    counter = torch.tensor([kat[0] for kat in PHILOX_KAT], dtype=torch.int64)
    key = torch.tensor([kat[1] for kat in PHILOX_KAT], dtype=torch.int64)
    # Dense and not contiguous: the output keeps the layout (the fake kernel too).
    x_nhwc = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _, mask_nhwc = torch.ops.regops.dropout_forward(x_nhwc, 0.3, seed, 7, True)
    return [
        ("dropout_forward", (x_nhwc.clone().requires_grad_(), 0.3, seed, 7, True)),
        ("dropout_forward_", (x_nhwc.clone(), 0.3, seed, 7, False)),
        ("dropout_backward", (torch.randn_like(x_nhwc).requires_grad_(), mask_nhwc, 0.3)),
        ("dropout_forward", (x.clone().requires_grad_(), 0.3, seed, 7, True)),
        ("dropout_forward", (x.clone().requires_grad_(), 0.3, seed, 7, False)),
        ("dropout_forward_", (x.clone(), 0.3, seed, 7, True)),
        ("dropout_backward", (torch.randn(100, dtype=torch.float64, requires_grad=True), mask, 0.3)),
        ("philox4x32_10", (counter, key)),
    ]


@pytest.mark.parametrize("namespace, device", native_op_targets())
def test_opcheck_native_ops(namespace, device):
    for name, args in _opcheck_args():
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


def test_opcheck_triton_ops():
    """On a GPU every opcheck test runs. Under the interpreter Triton runs the
    kernel even on fake tensors, so only the schema and autograd checks apply."""
    if "triton" not in regops.available_backends():
        pytest.skip("triton backend not available")
    device = "cuda" if HAS_CUDA else "cpu"
    for name, args in _opcheck_args():
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(getattr(torch.ops.regops, f"triton_{name}").default, args, test_utils=TRITON_OPCHECK_UTILS)


class _SeededDropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x):
        return regops.dropout(torch.relu(self.linear(x)), 0.5, seed=1234, offset=2)


@pytest.mark.parametrize("backend,device", compile_backend_devices())
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    with regops.use_backend(backend):
        net = _SeededDropoutNet().to(device)
        x = torch.randn(8, 16, device=device, requires_grad=True)
        eager = net(x)
        (eager_grad,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(net, fullgraph=True)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("backend,device", compile_backend_devices())
def test_torch_compile_dropout_module(backend, device):
    """regops.nn.Dropout with a fresh seed each call compiles without graph
    breaks; each output element is 0 or x / (1 - p), and its gradient agrees."""
    torch._dynamo.reset()
    with regops.use_backend(backend):
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), regops.nn.Dropout(0.5)).to(device)
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn(16, 32, device=device, requires_grad=True)
        out = compiled(x)
        hidden = model[0](x)
        kept = out != 0
        torch.testing.assert_close(out[kept], hidden[kept] * 2)
        assert 0.3 < kept.float().mean().item() < 0.7
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        torch.testing.assert_close(grad, (kept.float() * 2) @ model[0].weight)


def test_dropout_module():
    module = regops.nn.Dropout(0.25)
    assert repr(module) == "Dropout(p=0.25, inplace=False)"
    assert list(module.parameters()) == [] and module.state_dict() == {}
    x = torch.randn(64, 64)
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    y = module(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert repr(torch.nn.Dropout(0.25)) == repr(module)


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        regops.set_backend("fast")
    if "cuda" not in regops.available_backends():
        with pytest.raises(RuntimeError, match="not available"):
            regops.set_backend("cuda")
    with regops.use_backend("reference"):
        assert regops.get_backend() == "reference"
    assert regops.get_backend() is None


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_unaligned_views_and_large_sizes(dtype):
    """Views that start off a 16-byte boundary take the scalar path; large
    sizes take the grid-stride loop (more mask bytes than 132 SMs x 8 blocks
    x 256 threads). Both must equal the CPU result."""
    base = torch.randn((1 << 22) + 5, dtype=dtype, device=CUDA_DEVICE)
    for view in (base, base[1:], base[3:-1]):
        with regops.use_backend("cuda"):
            y, mask = regops.dropout_with_mask(view, 0.3, seed=77, offset=(1 << 32) - 5)
        with regops.use_backend("cpu"):
            y_cpu, mask_cpu = regops.dropout_with_mask(view.cpu(), 0.3, seed=77, offset=(1 << 32) - 5)
        assert torch.equal(mask.cpu(), mask_cpu) and torch.equal(y.cpu(), y_cpu)


@needs_cuda_backend
def test_cuda_poisoned_output_is_fully_written():
    """Fill the allocator's next block with NaN, free it, and check that the
    kernel overwrites every element and mask byte it returns."""
    n = 1 << 20
    poison = torch.full((n,), float("nan"), device=CUDA_DEVICE)
    poison_mask = torch.full((n // 8 + 16,), 0xFF, dtype=torch.uint8, device=CUDA_DEVICE)
    del poison, poison_mask
    x = torch.randn(n, device=CUDA_DEVICE)
    with regops.use_backend("cuda"):
        y, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    assert not torch.isnan(y).any()
    assert torch.equal(mask.cpu(), reference.dropout_with_mask(x.cpu(), 0.5, 1)[1])
