"""Layer norm and RMSNorm, alone and fused with dropout and a residual add:
every backend against torch's composite, gradients, masks against
regops.dropout_with_mask, torch.library checks, torch.compile, hostile
layouts, modules and the errors users see."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import regops
from regops import reference
from conftest import (HAS_CUDA, TRITON_OPCHECK_UTILS, backend_devices, compile_backend_devices, native_op_targets,
                      cuda_simulated, triton_interpreted)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (atol, rtol) of an output or gradient of this dtype against the float64
# composite, relative to the largest magnitude of the expected tensor.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10), torch.float16: (3e-3, 3e-3),
              torch.bfloat16: (2e-2, 2e-2)}
# Odd hidden sizes around the vector widths (4, 8, 16 elements) and one row of 1.
SHAPES = [(1, 1), (3, 1), (5, 7), (4, 33), (2, 3, 130)]


def _skip_unimplemented(backend):
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "regops_cuda_sim::layer_norm_forward" if not HAS_CUDA else "regops::layer_norm_forward",
            "CPU" if not HAS_CUDA else "CUDA"):
        pytest.skip("no cuda layer norm kernels")


@pytest.fixture
def ln_backend(backend_device):
    _skip_unimplemented(backend_device[0])
    return backend_device


def _skip_float64(backend, device, dtype):
    if dtype == torch.float64 and device.type == "cuda" and backend == "triton":
        pytest.skip("float64 is a CPU/gradcheck dtype")
    if _slow(backend, device) and dtype in (torch.float16, torch.float64):
        pytest.skip("the interpreter and the simulation run float32 and bfloat16 only (they are slow)")


def _slow(backend, device) -> bool:
    """The Triton interpreter and the CUDA simulation: small cases only."""
    return triton_interpreted(backend, device) or cuda_simulated(backend, device)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol)


def _composite(x, residual, weight, bias, keep, p, eps, rms, residual_in_fp32=False):
    """torch's composite on float64 copies of the rounded values: dropout
    with the given keep mask, rounded to x's dtype as F.dropout rounds, the
    add rounded to h's dtype, then F.layer_norm / F.rms_norm. Returns (out, h)."""
    dropped = x if keep is None else reference.dropout_apply(x, keep, p)
    h_dtype = reference.layer_norm_h_dtype(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    h = dropped.to(h_dtype) if residual is None else (dropped.double() + residual.double()).to(h_dtype)
    hd = h.double()
    w = None if weight is None else weight.double()
    if rms:
        out = F.rms_norm(hd, (hd.shape[-1],), w, eps)
    else:
        out = F.layer_norm(hd, (hd.shape[-1],), w, None if bias is None else bias.double(), eps)
    return out, h


def _inputs(shape, dtype, device, gen, *, residual=True, weight=True, bias=True, residual_dtype=None):
    def make(*size, dt=dtype):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dt).to(device).requires_grad_()
    x = make(*shape)
    res = make(*shape, dt=residual_dtype or dtype) if residual else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = make(shape[-1], dt=acc) if weight else None
    b = make(shape[-1], dt=acc) if bias else None
    return x, res, w, b


def _grads(out_list, inputs, grads):
    leaves = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out_list, leaves, grads, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_torch(ln_backend, dtype, rms):
    backend, device = ln_backend
    _skip_float64(backend, device, dtype)
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES[1:3] if _slow(backend, device) else SHAPES:
        for affine in (True, False):
            x, _, w, b = _inputs(shape, dtype, device, gen, residual=False, weight=affine, bias=affine and not rms)
            if rms:
                out = regops.rms_norm(x, shape[-1:], w, eps=1e-5)
            else:
                out = regops.layer_norm(x, shape[-1:], w, b, eps=1e-5)
            expected, _ = _composite(x.detach(), None, None if w is None else w.detach(),
                                     None if b is None else b.detach(), None, 0.0, 1e-5, rms)
            assert out.dtype == dtype and out.shape == x.shape
            assert_close(out, expected, dtype)
            grad = torch.randn(shape, generator=gen).to(dtype).to(device)
            got = _grads([out], [x, w, b], [grad])
            xd, wd, bd = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
            ref, _ = _composite(xd, None, wd, bd, None, 0.0, 1e-5, rms)
            want = _grads([ref], [xd, wd, bd], [grad.double()])
            for name, g, e in zip("xwb", got, want):
                if e is not None:
                    assert_close(g, e, dtype if name == "x" else torch.float32 if dtype != torch.float64 else dtype)


def test_layer_norm_multi_dim_normalized_shape(ln_backend):
    backend, device = ln_backend
    x = torch.randn(3, 4, 5, device=device)
    w, b = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    torch.testing.assert_close(regops.layer_norm(x, (4, 5), w, b), F.layer_norm(x, (4, 5), w, b))
    torch.testing.assert_close(regops.rms_norm(x, (4, 5), w), F.rms_norm(x, (4, 5), w))


def test_rms_norm_default_eps_is_the_dtypes(ln_backend):
    backend, device = ln_backend
    x = torch.full((2, 8), 1e-4, device=device)
    torch.testing.assert_close(regops.rms_norm(x, (8,)), F.rms_norm(x, (8,)))


CONFIGS = [  # (prenorm, residual_in_fp32, recompute_mask, with residual)
    (False, False, False, True), (True, False, False, True), (True, True, True, True), (False, False, True, False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "prenorm", "prenorm-fp32-recompute", "no-residual"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_norm_matches_composite(ln_backend, dtype, rms, config):
    backend, device = ln_backend
    _skip_float64(backend, device, dtype)
    prenorm, residual_in_fp32, recompute, with_residual = config
    gen = torch.Generator().manual_seed(2)
    p, eps, seed, offset = 0.3, 1e-5, 1234, 7
    for shape in [(5, 7)] if _slow(backend, device) else [(5, 7), (3, 2, 37), (2, 1)]:
        x, res, w, b = _inputs(shape, dtype, device, gen, residual=with_residual, bias=not rms)
        kwargs = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32, return_dropout_mask=True,
                      recompute_mask=recompute, seed=seed, offset=offset)
        if rms:
            result = regops.dropout_add_rms_norm(x, res, w, p, eps, **kwargs)
        else:
            result = regops.dropout_add_layer_norm(x, res, w, b, p, eps, **kwargs)
        out, h, mask = result if prenorm else (result[0], None, result[1])
        _, expected_mask = regops.dropout_with_mask(x.detach().contiguous(), p, seed=seed, offset=offset)
        assert torch.equal(mask.cpu(), expected_mask.cpu())
        keep = regops.unpack_mask(mask, x.shape)
        expected_out, expected_h = _composite(x.detach(), None if res is None else res.detach(), w.detach(),
                                              None if b is None else b.detach(), keep, p, eps, rms, residual_in_fp32)
        assert out.dtype == dtype
        assert_close(out, expected_out, dtype)
        if prenorm:
            assert h.dtype == expected_h.dtype and h.shape == x.shape
            # The Triton interpreter rounds float32 to bfloat16 by truncation
            # (a GPU rounds to nearest): the dropped values may be 1 ulp off there.
            truncates = triton_interpreted(backend, device) and dtype == torch.bfloat16
            assert_close(h, expected_h, dtype if truncates else h.dtype)
        grad = torch.randn(shape, generator=gen).to(dtype).to(device)
        outs, grads = [out], [grad]
        if prenorm:
            outs.append(h)
            grads.append(torch.randn(shape, generator=gen).to(h.dtype).to(device))
        got = _grads(outs, [x, res, w, b], grads)
        xd, rd, wd, bd = [None if t is None else t.detach().double().requires_grad_() for t in (x, res, w, b)]
        # The float64 composite with the same mask: h's rounding is constant
        # there, so its gradient passes straight through.
        dropped = reference.dropout_apply(xd, keep, p)
        hd = dropped if rd is None else dropped + rd
        ref = F.rms_norm(hd, shape[-1:], wd, eps) if rms else F.layer_norm(hd, shape[-1:], wd, bd, eps)
        want = _grads([ref, hd] if prenorm else [ref], [xd, rd, wd, bd], [g.double() for g in grads])
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name, g, e in zip(("x", "residual", "weight", "bias"), got, want):
            if e is None:
                assert g is None, name
                continue
            assert g.dtype == {"x": dtype, "residual": res.dtype if res is not None else None}.get(name, param_dtype)
            assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_splits_and_vector_paths(ln_backend, dtype):
    """Hidden sizes that take each work split and access width of the CUDA
    kernels (a warp or a block per row; 16-byte vectors or scalars), checked
    against the reference backend with the same mask."""
    backend, device = ln_backend
    gen = torch.Generator().manual_seed(4)
    # (7, 37) and (3, 1030) are no whole number of vectors of any dtype: scalars.
    for rows, hidden in [(5, 64), (9, 1000), (3, 1100), (2, 2048), (7, 37), (3, 1030)]:
        x, res, w, b = _inputs((rows, hidden), dtype, device, gen, residual_dtype=torch.float32 if rows % 2 else None)
        grads = [torch.randn(rows, hidden, generator=gen).to(dtype), torch.randn(rows, hidden, generator=gen)]
        if hidden == 1000:  # incoming gradients one element off 16-byte alignment: scalars
            grads = [torch.randn(rows * hidden + 1, generator=gen).to(g.dtype)[1:].view(rows, hidden) for g in grads]
        grads = [g.to(device) for g in grads]
        results = []
        for which in (backend, "reference"):
            with regops.use_backend(which):
                out, h = regops.dropout_add_layer_norm(x, res, w, b, 0.2, prenorm=True, seed=rows, offset=hidden)
                results.append([out, h] + list(torch.autograd.grad([out, h], [x, res, w, b], grads)))
        for got, want in zip(*results):
            assert_close(got, want, dtype)


def test_masks_identical_across_backends():
    masks = {}
    for backend, device in backend_devices():
        if backend in ("triton", "cuda"):
            try:
                _skip_unimplemented(backend)
            except pytest.skip.Exception:
                continue
        with regops.use_backend(backend):
            x = torch.ones(7, 131, device=device)
            _, mask = regops.dropout_add_layer_norm(x, None, None, None, 0.37, seed=99, offset=(1 << 32) + 1,
                                                    return_dropout_mask=True)
            masks[(backend, device)] = mask.cpu()
    first = next(iter(masks.values()))
    assert len(masks) >= 2
    for key, mask in masks.items():
        assert torch.equal(mask, first), key


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_mask_equals_dropout_with_mask(ln_backend, p):
    backend, device = ln_backend
    for rows, hidden in [(1, 1), (3, 5), (9, 17), (4, 300)]:
        for seed, offset in [(0, 0), (-7, 5), ((1 << 64) - 1, (1 << 33) + 7)]:
            x = torch.randn(rows, hidden, device=device)
            _, mask = regops.dropout_add_rms_norm(x, None, None, p, seed=seed, offset=offset,
                                                  return_dropout_mask=True)
            assert torch.equal(mask.cpu(), reference.dropout_with_mask(x.cpu(), p, seed % (1 << 64), offset)[1])


def test_p_one_drops_everything_and_h_is_the_residual(ln_backend):
    backend, device = ln_backend
    x, residual = torch.randn(4, 9, device=device), torch.randn(4, 9, device=device)
    out, h = regops.dropout_add_layer_norm(x, residual, None, None, 1.0, prenorm=True, seed=1)
    assert torch.equal(h, residual)
    torch.testing.assert_close(out, F.layer_norm(residual, (9,)))


def test_recompute_mask_gives_the_same_gradients(ln_backend):
    backend, device = ln_backend
    x = torch.randn(6, 45, device=device, requires_grad=True)
    residual = torch.randn(6, 45, device=device, requires_grad=True)
    w = torch.randn(45, device=device, requires_grad=True)
    grads = []
    for recompute in (False, True):
        out = regops.dropout_add_layer_norm(x, residual, w, None, 0.4, seed=5, recompute_mask=recompute)
        grads.append(torch.autograd.grad(out.sin().sum(), (x, residual, w)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_weight_grad_is_deterministic(ln_backend):
    backend, device = ln_backend
    rows = 37 if _slow(backend, device) else 257  # more rows than the kernels' row chunks or slots
    x = torch.randn(rows, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    grad = torch.randn(rows, 33, device=device)
    first = torch.autograd.grad(regops.layer_norm(x, (33,), w, b), (w, b), grad)
    for _ in range(2):
        again = torch.autograd.grad(regops.layer_norm(x, (33,), w, b), (w, b), grad)
        assert all(torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_chunks_and_thread_counts(dtype, rms):
    """The C++ CPU kernel on a shape with several row chunks of weight and
    bias partials (rows of 250: a partial 32-element chunk per row, and mask
    words that start mid-byte): every output and gradient against the
    float64 composite, and bit-identical at 1 and 2 threads."""
    rows, hidden, p = 700, 250, 0.2
    gen = torch.Generator().manual_seed(6)
    x, res, w, b = _inputs((rows, hidden), dtype, "cpu", gen, bias=not rms)
    grads = [torch.randn(rows, hidden, generator=gen).to(dtype), torch.randn(rows, hidden, generator=gen).to(dtype)]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with regops.use_backend("cpu"):
                if rms:
                    out, h, mask = regops.dropout_add_rms_norm(x, res, w, p, 1e-5, prenorm=True, seed=3,
                                                               return_dropout_mask=True)
                else:
                    out, h, mask = regops.dropout_add_layer_norm(x, res, w, b, p, prenorm=True, seed=3,
                                                                 return_dropout_mask=True)
                results.append([out, h, mask] + list(_grads([out, h], [x, res, w, b], grads)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert (one is None and two is None) or torch.equal(one, two)
    out, h, mask, *got = results[0]
    keep = regops.unpack_mask(mask, x.shape)
    xd, rd, wd, bd = [None if t is None else t.detach().double().requires_grad_() for t in (x, res, w, b)]
    hd = reference.dropout_apply(xd, keep, p) + rd
    ref = F.rms_norm(hd, (hidden,), wd, 1e-5) if rms else F.layer_norm(hd, (hidden,), wd, bd, 1e-5)
    assert_close(out, ref, dtype)
    want = _grads([ref, hd], [xd, rd, wd, bd], [g.double() for g in grads])
    for name, g, e in zip(("x", "residual", "weight", "bias"), got, want):
        assert (g is None) == (e is None), name
        if e is not None:
            assert_close(g, e, dtype)


def test_parameters_of_the_input_dtype(ln_backend):
    """A model moved with .to(bfloat16) has bfloat16 weight and bias; their
    gradients come back in that dtype."""
    backend, device = ln_backend
    x = torch.randn(4, 16, device=device, dtype=torch.bfloat16)
    w = torch.randn(16, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(16, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = regops.layer_norm(x, (16,), w, b)
    torch.testing.assert_close(out, F.layer_norm(x, (16,), w, b), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16


# --- hostile inputs --------------------------------------------------------------------

def test_strided_offset_and_empty_inputs(ln_backend):
    backend, device = ln_backend
    base = torch.randn(6, 40, device=device)
    x = base[1:, 3::2]  # offset, strided rows and columns
    residual = torch.randn(19, 5, device=device).t()  # transposed
    w = torch.randn(38, device=device)[::2]  # strided weight
    b = torch.randn(25, device=device)[3:22]  # an offset view
    out, h, mask = regops.dropout_add_layer_norm(x, residual, w, b, 0.25, prenorm=True, return_dropout_mask=True,
                                                 seed=8)
    keep = regops.unpack_mask(mask, x.shape)
    expected, expected_h = _composite(x, residual, w, b, keep, 0.25, 1e-5, False)
    assert_close(out, expected, torch.float32)
    assert_close(h, expected_h, torch.float32)
    size_one = torch.randn(5, 1, 7, device=device).as_strided((5, 1, 7), (7, 100, 1))
    torch.testing.assert_close(regops.rms_norm(size_one, (7,)), F.rms_norm(size_one, (7,)))
    empty = torch.randn(0, 3, 16, device=device, requires_grad=True)
    out = regops.dropout_add_layer_norm(empty, torch.zeros(0, 3, 16, device=device), None, None, 0.5, seed=1)
    assert out.shape == empty.shape
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("layout", ["transposed", "permuted"])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
def test_dense_non_contiguous_mask_in_memory_order(ln_backend, layout, recompute):
    """A dense x is numbered in memory order, as dropout numbers it: the mask
    is dropout_with_mask(x)'s. "transposed": the hidden dim is outermost in
    memory; "permuted": it is innermost, the rows in another order."""
    backend, device = ln_backend
    gen = torch.Generator().manual_seed(6)
    if layout == "transposed":
        x = torch.randn(9, 5, generator=gen).t()  # (5, 9): hidden 9, strides (1, 5)
    else:
        x = torch.randn(3, 4, 6, generator=gen).transpose(0, 1)  # (4, 3, 6): strides (6, 24, 1)
    x = x.to(device).requires_grad_()
    res = torch.randn(x.shape, generator=gen).to(device).requires_grad_()
    w, b = [torch.randn(x.shape[-1], generator=gen).to(device).requires_grad_() for _ in range(2)]
    out, h, mask = regops.dropout_add_layer_norm(x, res, w, b, 0.4, prenorm=True, return_dropout_mask=True,
                                                 recompute_mask=recompute, seed=21, offset=3)
    _, expected_mask = regops.dropout_with_mask(x.detach(), 0.4, seed=21, offset=3)
    assert torch.equal(mask.cpu(), expected_mask.cpu())
    keep = regops.unpack_mask(mask, like=x)
    assert not torch.equal(keep, regops.unpack_mask(mask, x.shape))  # the two orders differ here
    expected_out, expected_h = _composite(x.detach(), res.detach(), w.detach(), b.detach(), keep, 0.4, 1e-5, False)
    assert_close(out, expected_out, torch.float32)
    assert_close(h, expected_h, torch.float32)
    grads = [torch.randn(x.shape, generator=gen).to(device) for _ in range(2)]
    got = torch.autograd.grad([out, h], [x, res, w, b], grads)
    xd, rd, wd, bd = [t.detach().double().requires_grad_() for t in (x, res, w, b)]
    hd = reference.dropout_apply(xd, keep, 0.4) + rd
    want = torch.autograd.grad([F.layer_norm(hd, x.shape[-1:], wd, bd, 1e-5), hd], [xd, rd, wd, bd],
                               [g.double() for g in grads])
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32)
    # seed=None draws one seed, as dropout_with_mask does, and numbers x the same way.
    torch.manual_seed(9)
    out_drawn = regops.dropout_add_layer_norm(x, res, w, b, 0.4, recompute_mask=recompute)
    torch.manual_seed(9)
    _, drawn_mask = regops.dropout_with_mask(x.detach(), 0.4)
    expected_drawn, _ = _composite(x.detach(), res.detach(), w.detach(), b.detach(),
                                   regops.unpack_mask(drawn_mask, like=x), 0.4, 1e-5, False)
    assert_close(out_drawn, expected_drawn, torch.float32)


def test_hidden_size_one(ln_backend):
    backend, device = ln_backend
    x = torch.randn(5, 1, device=device, requires_grad=True)
    out = regops.layer_norm(x, (1,))
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_nan_propagates(ln_backend):
    backend, device = ln_backend
    x = torch.randn(3, 8, device=device)
    x[1, 2] = float("nan")
    out = regops.layer_norm(x, (8,))
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


# --- gradcheck, torch.library, torch.compile --------------------------------------------

@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradcheck_float64(ln_backend, rms):
    backend, device = ln_backend
    if triton_interpreted(backend, device):
        pytest.skip("minutes under the interpreter; the triton kernels are checked against the reference instead")
    gen = torch.Generator().manual_seed(3)
    x, res, w, b = _inputs((3, 6), torch.float64, device, gen, bias=not rms)

    def fused(x, res, w, *maybe_b):
        if rms:
            out, h = regops.dropout_add_rms_norm(x, res, w, 0.3, 1e-5, prenorm=True, seed=4)
        else:
            out, h = regops.dropout_add_layer_norm(x, res, w, maybe_b[0], 0.3, prenorm=True, seed=4)
        return out, h

    inputs = (x, res, w) if rms else (x, res, w, b)
    assert torch.autograd.gradcheck(fused, inputs)
    plain = (lambda x, w: regops.rms_norm(x, (6,), w)) if rms else (lambda x, w: regops.layer_norm(x, (6,), w, b))
    assert torch.autograd.gradcheck(plain, (x, w))


def _opcheck_args(device):
    gen = torch.Generator().manual_seed(9)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    x = torch.randn(5, 11, generator=gen, dtype=torch.float64).to(device)
    res = torch.randn(5, 11, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(11, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(11, generator=gen, dtype=torch.float64).to(device)
    seed = torch.tensor([5], dtype=torch.int64)
    xf = torch.randn(4, 9, generator=gen).to(device)
    out, h, mean, rstd, mask = torch.ops.regops.layer_norm_forward(x.cpu(), res.cpu(), w.cpu(), b.cpu(), 0.2, seed, 3,
                                                                   1e-5, False, True, True, False)
    to = lambda t: t.to(device)  # noqa: E731
    return [
        ("layer_norm_forward", (leaf(x), leaf(res), leaf(w), leaf(b), 0.2, seed, 3, 1e-5, False, True, True, False)),
        ("layer_norm_forward", (leaf(x), None, None, None, 0.0, None, 0, 1e-5, True, False, False, False)),
        ("layer_norm_forward", (leaf(xf), leaf(xf.half().float()), leaf(torch.ones(9).to(device)), None, 0.5, seed, 0,
                                1e-6, True, False, True, True)),
        ("layer_norm_backward", (to(out), to(h), to(h), to(w), to(mean), to(rstd), to(mask), None, 0.2, 3, False, True,
                                 True)),
        ("layer_norm_backward", (to(out), None, to(h), None, to(mean), to(rstd), None, seed, 0.2, 3, False, False,
                                 False)),
    ]


@pytest.mark.parametrize("namespace, device", native_op_targets())
def test_opcheck_native_ops(namespace, device):
    if namespace == "regops_cuda_sim":
        _skip_unimplemented("cuda")
    for name, args in _opcheck_args(device):
        opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


def test_opcheck_triton_ops():
    if "triton" not in regops.available_backends():
        pytest.skip("triton backend not available")
    if not hasattr(torch.ops.regops, "triton_layer_norm_forward"):
        pytest.skip("the triton backend runs the reference formulas (no triton layer norm op)")
    device = "cuda" if HAS_CUDA else "cpu"
    for name, args in _opcheck_args(device):
        opcheck(getattr(torch.ops.regops, f"triton_{name}").default, args, test_utils=TRITON_OPCHECK_UTILS)


class _Block(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        self.norm1 = regops.nn.DropoutAddLayerNorm(hidden, p=0.2, prenorm=True)
        self.norm2 = regops.nn.DropoutAddRMSNorm(hidden, p=0.1, residual_in_fp32=True)
        self.drop_path = regops.nn.DropPath(0.3)

    def forward(self, x):
        y, h = self.norm1(self.linear(x), x)
        return self.norm2(self.drop_path(y), h)


def _seeded_block(x, residual, weight, bias):
    out, h = regops.dropout_add_layer_norm(x, residual, weight, bias, 0.2, prenorm=True, seed=3, offset=1)
    out = regops.dropout_add_rms_norm(out, h, weight, 0.1, 1e-6, residual_in_fp32=True, recompute_mask=True, seed=4)
    return regops.drop_path_add(out, x, 0.3, seed=5)


@pytest.mark.parametrize("backend,device", compile_backend_devices())
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    with regops.use_backend(backend):
        inputs = [torch.randn(*shape, device=device, requires_grad=True) for shape in ((6, 24), (6, 24), (24,), (24,))]
        eager = _seeded_block(*inputs)
        eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
        out = torch.compile(_seeded_block, fullgraph=True)(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        torch.testing.assert_close(out, eager)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad)
        # Modules drawing a fresh seed per call compile without graph breaks.
        model = _Block(24).to(device)
        x = torch.randn(6, 24, device=device, requires_grad=True)
        (grad,) = torch.autograd.grad(torch.compile(model, fullgraph=True)(x).sum(), x)
        assert grad.isfinite().all()
        model.eval()
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
        plain = torch.compile(lambda t: regops.layer_norm(t, (24,)) + regops.rms_norm(t, (24,)), fullgraph=True)
        torch.testing.assert_close(plain(x), F.layer_norm(x, (24,)) + F.rms_norm(x, (24,)))


# --- modules and convert ------------------------------------------------------------------

def test_modules_state_dicts_load_both_ways():
    pairs = [(torch.nn.LayerNorm(12), regops.nn.LayerNorm(12)), (torch.nn.RMSNorm(12), regops.nn.RMSNorm(12)),
             (torch.nn.LayerNorm(12), regops.nn.DropoutAddLayerNorm(12, p=0.1)),
             (torch.nn.RMSNorm(12), regops.nn.DropoutAddRMSNorm(12, p=0.1)),
             (torch.nn.LayerNorm(12, bias=False), regops.nn.DropoutAddLayerNorm(12, bias=False))]
    for theirs, ours in pairs:
        with torch.no_grad():
            for parameter in theirs.parameters():
                parameter.normal_()
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randn(3, 12)
        torch.testing.assert_close(ours.eval()(x), theirs(x))


def test_fused_modules_in_training_match_composite():
    module = regops.nn.DropoutAddLayerNorm(10, p=0.5, prenorm=True)
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    torch.manual_seed(3)
    out, h = module(x, residual)
    # h - residual recovers the kept 2 * x up to the rounding of the sum (an
    # ulp of each of its two roundings, against the larger of h and the residual).
    dropped = h - residual
    ulp = 2 * torch.finfo(torch.float32).eps * torch.maximum(h.abs(), residual.abs())
    assert ((dropped == 0) | ((dropped - 2 * x).abs() <= ulp)).all() and (dropped == 0).any()
    torch.testing.assert_close(out, F.layer_norm(h, (10,), module.weight, module.bias))
    assert "p=0.5" in repr(module)


def test_convert_swaps_layer_norm_and_rms_norm():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8),
                                torch.nn.LayerNorm(8, elementwise_affine=False))
    weight = model[1].weight
    x = torch.randn(5, 8)
    expected = model(x)
    regops.convert(model)
    assert type(model[1]) is regops.nn.LayerNorm and type(model[2]) is regops.nn.RMSNorm
    assert type(model[3]) is regops.nn.LayerNorm and model[3].weight is None
    assert model[1].weight is weight
    torch.testing.assert_close(model(x), expected)


# --- errors --------------------------------------------------------------------------------

def test_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        regops.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="weight"):
        regops.layer_norm(x, (8,), torch.ones(7))
    with pytest.raises(ValueError, match="bias"):
        regops.layer_norm(x, (8,), None, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual"):
        regops.dropout_add_layer_norm(x, torch.ones(4, 7), None, None, 0.1)
    with pytest.raises(ValueError, match="residual"):
        regops.dropout_add_layer_norm(x, torch.ones(4, 8, dtype=torch.float64), None, None, 0.1)
    with pytest.raises(ValueError, match="p must"):
        regops.dropout_add_rms_norm(x, None, None, 1.5)
    with pytest.raises(ValueError, match="eps"):
        regops.layer_norm(x, (8,), eps=-1.0)
    with pytest.raises(ValueError, match="seed"):
        regops.dropout_add_layer_norm(x, None, None, None, 0.1, seed=1.5)
    with pytest.raises(TypeError, match="prenorm"):
        regops.dropout_add_layer_norm(x, None, None, None, 0.1, prenorm=1)
    with pytest.raises(TypeError, match="input"):
        regops.layer_norm(torch.ones(3, 4, dtype=torch.int64), (4,))
    with pytest.raises(ValueError, match="hidden"):
        regops.dropout_add_layer_norm(torch.ones(3, 0), None, None, None, 0.1)


def test_native_ops_check_their_arguments():
    x = torch.randn(4, 8)
    op = torch.ops.regops.layer_norm_forward
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, None, torch.ones(7), None, 0.0, None, 0, 1e-5, False, False, False, False)
    with pytest.raises(RuntimeError, match="input must be 2-dimensional"):
        op(x.reshape(-1), None, None, None, 0.0, None, 0, 1e-5, False, False, False, False)
    with pytest.raises(RuntimeError, match="residual must have input's shape"):
        op(x, torch.ones(4, 7), None, None, 0.0, None, 0, 1e-5, False, False, False, False)
    with pytest.raises(RuntimeError, match="seed must be"):
        op(x, None, None, None, 0.1, torch.ones(2, dtype=torch.int64), 0, 1e-5, False, False, False, False)
    with pytest.raises(RuntimeError, match="mask must be a flat uint8"):
        torch.ops.regops.layer_norm_backward(x, None, x, None, torch.zeros(4), torch.ones(4),
                                             torch.zeros(3, dtype=torch.uint8), None, 0.1, 0, False, False, False)
