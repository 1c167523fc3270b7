"""Hostile inputs: NaN and inf propagate exactly as in torch, wrong devices,
dtypes and shapes raise clear errors before any kernel runs (the inputs are
left untouched), and every op gives the same bits for any number of CPU
threads (and across runs on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import regops
from conftest import CUDA_DEVICE, HAS_CUDA, backend_devices, reschedule, triton_interpreted

NAN, INF = float("nan"), float("inf")
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def specials(n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Random normals with NaN, +inf, -inf, -0.0 and the largest finite
    value of ``dtype`` mixed in at random places."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 6, (n,), generator=gen)
    big = torch.finfo(dtype).max
    for code, value in enumerate([NAN, INF, -INF, -0.0, big]):
        x[pick == code] = value
    return x.to(dtype=dtype, device=device)


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor, bf16_truncated: bool = False):
    """Same NaN positions, and bitwise-equal everything else (so -0.0 and
    +0.0 are told apart). ``bf16_truncated``: the Triton interpreter rounds
    float32 -> bfloat16 by truncation (a GPU rounds to nearest), so finite
    values may be 1 bf16 ulp off there."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    if bf16_truncated and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual[~nan], expected[~nan], atol=0, rtol=2**-7)
        assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    else:
        assert torch.equal(actual[~nan], expected[~nan])


@contextlib.contextmanager
def num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def same_bits_for_thread_counts(fn):
    """fn() under 1 and 2 threads (and the machine's default): every returned
    tensor bit-identical."""
    results = []
    for threads in (1, 2, max(2, torch.get_num_threads())):
        with num_threads(threads):
            out = fn()
        results.append([t.detach().clone() for t in (out if isinstance(out, (tuple, list)) else (out,))])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.reshape(-1).view(torch.uint8) if a.dtype.is_floating_point else a,
                               b.reshape(-1).view(torch.uint8) if b.dtype.is_floating_point else b)


# --- dropout: NaN and inf --------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_nan_inf_like_torch(backend_device, dtype, p):
    """torch's dropout multiplies by mask * scale, so a dropped NaN stays NaN
    and a dropped inf becomes NaN. With regops' own mask, torch's
    native_dropout_backward (grad * mask * scale, the same elementwise rule as
    torch's forward) is the oracle; p = 0 and p = 1 need no mask at all, so
    there torch.nn.functional.dropout itself is compared."""
    backend, device = backend_device
    if dtype == torch.float64 and device.type == "cuda" and backend == "triton":
        pytest.skip("float64 is a CPU/gradcheck dtype")
    n = 300 if triton_interpreted(backend, device) else 2000
    x = specials(n, dtype, device, seed=int(p * 10)).requires_grad_()
    y, mask = regops.dropout_with_mask(x, p, seed=11)
    keep = regops.unpack_mask(mask, like=x)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    loose = triton_interpreted(backend, device)
    assert_same_floats(y, torch.ops.aten.native_dropout_backward(x.detach(), keep, scale), loose)
    if p in (0.0, 1.0):
        assert_same_floats(y, torch.nn.functional.dropout(x.detach(), p, training=True), loose)
    grad = specials(n, dtype, device, seed=5)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert_same_floats(grad_x, torch.ops.aten.native_dropout_backward(grad, keep, scale), loose)
    assert_same_floats(regops.dropout(x.detach(), p, seed=11, recompute_mask=True), y)


def test_dropout_nan_seed_and_offset_extremes():
    """The largest seed and offset the API accepts, on a size whose counters
    cross the 2^62 offset limit's neighbourhood, still match the reference."""
    from regops import reference
    x = torch.randn(1001)
    for seed in (-(2**63), 2**64 - 1):
        y, mask = regops.dropout_with_mask(x, 0.5, seed=seed, offset=2**62 - 1)
        expected_y, expected_mask = reference.dropout_with_mask(x, 0.5, seed % 2**64, 2**62 - 1)
        assert torch.equal(mask, expected_mask) and torch.equal(y, expected_y)


# --- dropout: errors before any kernel runs -----------------------------------------

def _dropout_error_cases():
    x = torch.randn(100)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    meta_mask = mask.to("meta")
    return [
        (lambda t: regops.dropout(t, 1.5, inplace=True), ValueError, r"p must be in \[0, 1\], got 1.5"),
        (lambda t: regops.dropout(t, float("inf"), inplace=True), ValueError, "p must be in"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, seed=2**64), ValueError, "seed must be None or an integer"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, seed=1.5), ValueError, "seed must be"),
        (lambda t: regops.dropout(t, 0.5, inplace=True, offset=2**62), ValueError, "offset must be"),
        (lambda t: regops.dropout(t.to(torch.int32), 0.5), TypeError, "input must be a floating-point tensor"),
        (lambda t: regops.dropout(t.to(torch.complex64), 0.5), TypeError, "input must be a floating-point tensor"),
        (lambda t: regops.dropout(t.numpy(), 0.5), TypeError, "input must be a torch.Tensor"),
        (lambda t: regops.dropout_backward(t, mask[:-1], 0.5), ValueError, "mask must be a flat uint8 tensor of 16"),
        (lambda t: regops.dropout_backward(t, mask.view(2, 8), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, mask.bool(), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, mask.float(), 0.5), ValueError, "mask must be a flat uint8"),
        (lambda t: regops.dropout_backward(t, meta_mask, 0.5), ValueError, r"mask must be on grad's device \(cpu\)"),
        (lambda t: regops.dropout_backward(t, mask, -0.1), ValueError, "p must be in"),
        (lambda t: regops.unpack_mask(mask, (200,)), ValueError, "mask must be a flat uint8 tensor of 32 bytes"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64)),
         ValueError, "counter must be an int64 tensor"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)),
         ValueError, r"key must be an int64 tensor of shape \(3, 2\)"),
        (lambda t: regops.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64),
                                        torch.zeros(3, 2, dtype=torch.int64, device="meta")),
         ValueError, "key must be on counter's device"),
    ]


@pytest.mark.parametrize("case", range(len(_dropout_error_cases())))
def test_dropout_bad_arguments_raise_before_any_kernel(case):
    call, error, message = _dropout_error_cases()[case]
    x = torch.randn(100)
    before = x.clone()
    with pytest.raises(error, match=message):
        call(x)
    assert torch.equal(x, before)


def test_raw_ops_reject_a_meta_tensor_mixed_with_real_ones():
    """Bug found here: the fake kernels double as Meta kernels, and the
    dispatcher picks Meta as soon as one argument is a meta tensor, so a meta
    seed or mask next to real CPU tensors returned uninitialized memory."""
    x = torch.randn(100)
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    with pytest.raises(RuntimeError, match="mask is on meta but grad is on cpu"):
        torch.ops.regops.dropout_backward(x, mask.to("meta"), 0.5)
    for op in (torch.ops.regops.dropout_forward, torch.ops.regops.dropout_forward_):
        with pytest.raises(RuntimeError, match="seed must be on the input's device"):
            op(x, 0.5, torch.tensor([1], device="meta"), 0, True)
    with pytest.raises(RuntimeError, match="counter and key must be on one device"):
        torch.ops.regops.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64),
                                       torch.zeros(1, 2, dtype=torch.int64, device="meta"))
    # All-meta calls are shape inference and stay allowed.
    out, meta_mask = torch.ops.regops.dropout_forward(x.to("meta"), 0.5, torch.tensor([1], device="meta"), 0, True)
    assert out.device.type == "meta" and meta_mask.shape == mask.shape


def test_forced_backend_rejects_the_wrong_device():
    x = torch.randn(10, device="meta")
    with regops.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' needs CPU tensors, got a tensor on meta"):
        regops.dropout(x, 0.5, seed=1)
    if not HAS_CUDA and "cuda" not in regops.available_backends():
        with pytest.raises(RuntimeError, match="not available"):
            regops.set_backend("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_mask_on_the_cpu_is_refused():
    x = torch.randn(100, device="cuda")
    _, mask = regops.dropout_with_mask(x, 0.5, seed=1)
    with pytest.raises(ValueError, match="mask must be on grad's device"):
        regops.dropout_backward(x, mask.cpu(), 0.5)
    with regops.use_backend("cpu"), pytest.raises(RuntimeError, match="needs CPU tensors"):
        regops.dropout(x, 0.5)


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dropout_same_bits_for_any_thread_count(dtype):
    # 5 parallel tasks of 16K elements on the CPU kernel, plus a partial block.
    x = specials(5 * 16384 + 77, dtype, "cpu", seed=3)
    grad = specials(x.numel(), dtype, "cpu", seed=4)

    def run():
        y, mask = regops.dropout_with_mask(x, 0.3, seed=10, offset=2**32 - 7)
        back = regops.dropout_backward(grad, mask, 0.3)
        inplace = regops.dropout(x.clone(), 0.3, inplace=True, seed=10, offset=2**32 - 7)
        words = regops.philox4x32_10(torch.arange(4000, dtype=torch.int64).view(1000, 4),
                                     torch.arange(2000, dtype=torch.int64).view(1000, 2))
        return y, mask, back, inplace, words

    same_bits_for_thread_counts(run)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_dropout_same_bits_across_gpu_runs(backend):
    """Also under the CUDA simulation, each run with another thread schedule."""
    device = CUDA_DEVICE if backend == "cuda" else ("cuda" if HAS_CUDA else None)
    if device is None or backend not in regops.available_backends():
        pytest.skip(f"{backend} backend not available on a GPU or simulated")
    x = specials((1 << 20) + 3, torch.float32, device)
    with regops.use_backend(backend):
        first = regops.dropout_with_mask(x, 0.4, seed=9)
        for run in range(3):
            reschedule(run + 1)
            again = regops.dropout_with_mask(x, 0.4, seed=9)
            assert_same_floats(again[0], first[0]) and torch.equal(again[1], first[1])


# --- optimizers ----------------------------------------------------------------------

HAS_OPTIM = hasattr(regops, "optim")
needs_optim = pytest.mark.skipif(not HAS_OPTIM, reason="regops.optim is not in this build")
OPTIMIZERS = {
    "sgd": (lambda: regops.optim.SGD, lambda: torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (lambda: regops.optim.SGD, lambda: torch.optim.SGD,
                     dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    "adamw": (lambda: regops.optim.AdamW, lambda: torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw-amsgrad": (lambda: regops.optim.AdamW, lambda: torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
}


def _make_optimizers(name, params, torch_params):
    regops_cls, torch_cls, options = OPTIMIZERS[name]
    return regops_cls()(params, **options), torch_cls()(torch_params, foreach=False, **options)


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_nan_and_inf_grads_like_torch(backend_device, name):
    """Without GradScaler a NaN or inf gradient goes into the update exactly as
    in torch.optim: the same elements (and their state) become NaN or inf."""
    backend, device = backend_device
    n = 64 if triton_interpreted(backend, device) else 1000
    params = [specials(n, torch.float32, device, seed=1).nan_to_num(0.0, 1.0, -1.0).requires_grad_()]
    torch_params = [params[0].detach().cpu().clone().requires_grad_()]
    optimizer, torch_optimizer = _make_optimizers(name, params, torch_params)
    for step in range(3):
        grad = specials(n, torch.float32, "cpu", seed=10 + step)
        grad[::3] = torch.randn(grad[::3].shape)  # some finite gradients every step
        params[0].grad, torch_params[0].grad = grad.to(device), grad.clone()
        optimizer.step()
        torch_optimizer.step()
        got, want = params[0].detach().cpu(), torch_params[0].detach()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), step
        assert torch.equal(torch.isinf(got), torch.isinf(want)), step
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


def _scaled_model(dtypes, seed):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 6).to(dtype) for dtype in dtypes]
    return torch.nn.ModuleList(layers)


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 1.0])
def test_grad_scaler_skips_a_nan_step_everywhere(name, clip):
    """A NaN in one bfloat16 gradient skips the whole step, for the float32
    parameters too (other dtype bucket): parameters and every state tensor
    unchanged, AdamW's step count not advanced; the next finite step runs."""
    model = _scaled_model([torch.float32, torch.bfloat16], seed=3)
    regops_cls, _, options = OPTIMIZERS[name]
    optimizer = regops_cls()(model.parameters(), **options, max_grad_norm=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def backward(poison: bool):
        optimizer.zero_grad()
        x = torch.randn(4, 6)
        loss = sum(layer(x.to(layer.weight.dtype)).float().square().sum() for layer in model)
        scaler.scale(loss).backward()
        if poison:
            model[1].weight.grad[2, 3] = float("nan")

    backward(False)
    scaler.step(optimizer)
    scaler.update()
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: {n: t.clone() for n, t in s.items() if isinstance(t, torch.Tensor)}
                    for k, s in enumerate(optimizer.state.values())}
    scale_before = scaler.get_scale()
    backward(True)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale_before / 2
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before)
    for k, state in enumerate(optimizer.state.values()):
        for key, value in state_before[k].items():
            assert torch.equal(state[key], value), key
    backward(False)
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params_before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_optim
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_bad_inputs_raise_before_any_update(name):
    regops_cls = OPTIMIZERS[name][0]()
    p = torch.randn(5, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    # Construction-time errors (a parameter listed twice in a group warns, as in torch).
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16, complex64 and complex128"):
        regops_cls([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        regops_cls([p, q, p], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group|more than one"):
        regops_cls([{"params": [p]}, {"params": [q, p]}], lr=0.1)
    with pytest.raises(ValueError, match="lr must be"):
        regops_cls([p], lr=-1.0)
    optimizer = regops_cls([{"params": [p]}, {"params": [q]}], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        optimizer.add_param_group({"params": [p]})
    assert len(optimizer.param_groups) == 2

    # Step-time errors: nothing is updated, in no group.
    def poisoned_step(mutate, error, match):
        p.grad, q.grad = torch.ones(5), torch.ones(4)
        before = [p.detach().clone(), q.detach().clone()]
        state_before = {k: dict(v) for k, v in optimizer.state.items()}
        undo = mutate()
        with pytest.raises(error, match=match):
            optimizer.step()
        undo()
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])
        assert set(optimizer.state) == set(state_before)

    def bad_lr():
        optimizer.param_groups[1]["lr"] = -0.5
        return lambda: optimizer.param_groups[1].update(lr=0.1)

    def bad_decay():
        optimizer.param_groups[1]["weight_decay"] = float("nan")
        return lambda: optimizer.param_groups[1].update(weight_decay=0.0)

    def sparse_grad():
        q.grad = torch.ones(4).to_sparse()
        return lambda: None

    poisoned_step(bad_lr, ValueError, "lr must be")
    poisoned_step(bad_decay, ValueError, "weight_decay must be")
    poisoned_step(sparse_grad, RuntimeError, "sparse gradients")
    p.grad, q.grad = torch.ones(5), torch.ones(4)
    optimizer.step()  # and then it works
    assert not torch.equal(p.grad, torch.zeros(5))


@needs_optim
def test_optimizer_with_a_meta_parameter_updates_the_others_like_torch():
    """A parameter on the meta device (deferred initialization) is bucketed
    apart, as torch.optim simply runs its ops there: the CPU parameter next to
    it is updated exactly as by torch."""
    p, m = torch.randn(5, requires_grad=True), torch.randn(5, device="meta", requires_grad=True)
    q = p.detach().clone().requires_grad_()
    optimizer = regops.optim.SGD([p, m], lr=0.1, momentum=0.9)
    torch_optimizer = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(2):
        p.grad, q.grad, m.grad = torch.ones(5), torch.ones(5), torch.ones(5, device="meta")
        optimizer.step()
        torch_optimizer.step()
    torch.testing.assert_close(p, q)
    assert m.device.type == "meta"


# --- resume from a state_dict ----------------------------------------------------------

def _model(with_batch_norm: bool):
    layers = [torch.nn.Linear(8, 16)]
    if with_batch_norm:
        layers.append(regops.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), regops.nn.Dropout(0.3), torch.nn.Linear(16, 4)]
    return torch.nn.Sequential(*layers)


def _train(model, optimizer, steps, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x, target = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_state_dict_is_bit_identical(name):
    """Train 6 steps straight, or 3 steps, save (model, optimizer, torch's RNG
    through torch.save), rebuild everything from scratch, load, 3 more steps:
    the same bits. Dropout draws its seed from torch's RNG, batch norm carries
    running statistics, the optimizer its state."""
    with_batch_norm = hasattr(regops.nn, "BatchNorm1d")
    regops_cls, _, options = OPTIMIZERS[name]

    torch.manual_seed(0)
    straight = _model(with_batch_norm)
    optimizer = regops_cls()(straight.parameters(), **options)
    torch.manual_seed(1)
    _train(straight, optimizer, 3, data_seed=5)
    _train(straight, optimizer, 3, data_seed=6)
    straight_state = optimizer.state_dict()

    import io
    torch.manual_seed(0)
    first = _model(with_batch_norm)
    first_optimizer = regops_cls()(first.parameters(), **options)
    torch.manual_seed(1)
    _train(first, first_optimizer, 3, data_seed=5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    del first, first_optimizer
    torch.manual_seed(1234)  # a different process would have another RNG state

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(with_batch_norm)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = regops_cls()(resumed.parameters(), **options)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    _train(resumed, resumed_optimizer, 3, data_seed=6)

    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
    resumed_state = resumed_optimizer.state_dict()
    for index, state in straight_state["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_state["state"][index][key], value), (index, key)


# --- determinism: optimizers -----------------------------------------------------------

@needs_optim
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_same_bits_for_any_thread_count(name, dtype):
    """Several CPU chunks per parameter, and global-norm clipping, whose
    reduction must not depend on how the work is split between threads."""
    regops_cls, _, options = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(shape, generator=gen).to(dtype) for shape in [(300, 700), (1031,), (), (5, 3)]]
    grads = [[torch.randn(t.shape, generator=gen).to(dtype) for t in start] for _ in range(3)]

    def run():
        params = [t.clone().requires_grad_() for t in start]
        optimizer = regops_cls()(params, **options, max_grad_norm=0.5)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return params + states + [optimizer.last_grad_norm]

    same_bits_for_thread_counts(run)


# --- batch norm ------------------------------------------------------------------------

HAS_BATCH_NORM = hasattr(regops, "batch_norm")
needs_batch_norm = pytest.mark.skipif(not HAS_BATCH_NORM, reason="regops.batch_norm is not in this build")


def _bn_input_with_specials(shape, layout, seed):
    """Channel 0 clean, channel 1 with one NaN, channel 2 with +inf, channel 3
    with +inf and -inf, channel 4 with one value of 1e4. (Not near the largest
    float32: torch's CPU statistics accumulate in float64 where regops, like
    torch on a GPU, uses float32, in which the square of 1e30 overflows.)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[0, 1].view(-1)[3] = NAN
    x[-1, 2].view(-1)[0] = INF
    x[0, 3].view(-1)[1], x[-1, 3].view(-1)[2] = INF, -INF
    x[0, 4].view(-1)[0] = 1e4
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@needs_batch_norm
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_nan_inf_like_torch(backend_device, training, layout):
    """Where torch's output, running statistics and gradients are NaN or inf,
    regops' are too, and the finite values agree."""
    backend, device = backend_device
    shape = (2, 6, 3, 3) if triton_interpreted(backend, device) else (4, 6, 5, 7)
    x = _bn_input_with_specials(shape, layout, seed=1)
    weight, bias = torch.randn(6), torch.randn(6)
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    running_mean[5], running_var[5] = NAN, INF  # hostile buffers too (they only matter in eval)
    results = []
    for which in ("torch", "regops"):
        xs = x.to(device).detach().clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
        rm, rv = running_mean.clone().to(device), running_var.clone().to(device)
        if which == "torch":
            y = torch.nn.functional.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5)
        else:
            y = regops.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5)
        grads = torch.autograd.grad(y, (xs, w, b), torch.ones_like(y))
        results.append([y, rm, rv, *grads])
    names = ["output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias"]
    for name, got, want in zip(names, results[1], results[0]):
        got, want = got.detach().cpu(), want.detach().cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), name
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), name
        finite = torch.isfinite(want)
        atol = 1e-4
        if name == "grad_weight" and training:
            # sum(dy * x_hat) cancels to ~0 (dy is ones); channel 4's 1e4
            # outlier makes its float32 terms large, and either summation
            # order may lose up to n * eps * sum|dy * x_hat| (plus the same
            # through the mean): the float32 bound per channel, not 1e-4.
            x64 = x.double()
            dims = [0] + list(range(2, x.dim()))
            x_hat = (x64 - x64.mean(dims, keepdim=True)) / (x64.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
            n = x.numel() // x.shape[1]
            bound = 2 * n * torch.finfo(torch.float32).eps * x_hat.abs().sum(dims)
            atol = torch.maximum(bound.float(), torch.full_like(bound.float(), 1e-4))[finite]
            assert ((got[finite] - want[finite]).abs() <= atol + 1e-4 * want[finite].abs()).all(), (name, got, want)
            continue
        torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=1e-4, msg=name)


@needs_batch_norm
def test_batch_norm_bad_arguments_raise_before_any_kernel():
    x = torch.randn(4, 3, 5)
    cases = [
        (dict(input=torch.randn(3)), ValueError, "at least 2 dimensions"),
        (dict(input=torch.ones(4, 3, dtype=torch.int32)), TypeError, "input must be a floating-point tensor"),
        (dict(input=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "floating-point"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(bias=torch.ones(3, 1)), ValueError, r"bias must have shape \(3,\)"),
        (dict(running_mean=torch.zeros(2)), ValueError, r"running_mean must have shape \(3,\)"),
        (dict(running_var=torch.ones(3, dtype=torch.int64)), (TypeError, ValueError), "running_var must be"),
        (dict(running_var=torch.ones(3, dtype=torch.float64)), ValueError, "running_var must be torch.float32"),
        (dict(weight=torch.ones(3, device="meta")), ValueError, "weight is on meta but input is on cpu"),
        (dict(running_mean=torch.zeros(3, device="meta")), ValueError, "running_mean is on meta"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(eps="1e-5"), ValueError, "eps must be a real number"),
        (dict(momentum=None), ValueError, "momentum must be"),
        (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
        (dict(input=torch.randn(1, 3)), ValueError, "Expected more than 1 value per channel when training"),
        (dict(training=False, running_mean=None, running_var=None), ValueError,
         "running_mean and running_var must be given"),
        (dict(running_mean=None), ValueError, "running_mean and running_var must either both be None or neither"),
        (dict(running_var=None), ValueError, "running_mean and running_var must either both be None or neither"),
        (dict(training=False, running_var=None), ValueError, "must either both be None or neither be None"),
    ]
    for overrides, error, message in cases:
        args = dict(input=x, running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3),
                    bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5)
        args.update(overrides)
        activation = args.pop("activation", None)
        before = [t.clone() for t in (args["running_mean"], args["running_var"]) if isinstance(t, torch.Tensor)
                  and t.device.type == "cpu"]
        with pytest.raises(error, match=message):
            regops.batch_norm(**args, activation=activation)
        after = [t for t in (args["running_mean"], args["running_var"]) if isinstance(t, torch.Tensor)
                 and t.device.type == "cpu"]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), overrides
    with pytest.raises(ValueError, match="expected 4D input"):
        regops.nn.BatchNorm2d(3)(x)


@needs_batch_norm
def test_batch_norm_raw_ops_reject_a_meta_tensor_mixed_with_real_ones():
    """The fake kernels double as Meta kernels (see the dropout test above)."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError):
        torch.ops.regops.batch_norm_forward(x, torch.ones(3, device="meta"), None, None, None, True, 1e-5, False)
    with pytest.raises(RuntimeError):
        torch.ops.regops.batch_norm_elementwise(x, torch.zeros(3, device="meta"), torch.ones(3), None, None, False)


@needs_batch_norm
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_same_bits_for_any_thread_count(layout, dtype, training):
    """The per-channel reductions (statistics and gradient sums) must not
    depend on how the work is split between threads."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 8, 33, 35, generator=gen) * 3 + 1).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def run():
        xs = x.clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        rm, rv = torch.zeros(8), torch.ones(8)
        y = regops.batch_norm(xs, rm, rv, w, b, training, 0.1, 1e-5, activation="relu")
        return (y, rm, rv, *torch.autograd.grad(y, (xs, w, b), grad))

    same_bits_for_thread_counts(run)


@needs_batch_norm
@pytest.mark.skipif(CUDA_DEVICE is None, reason="needs a CUDA device or REGOPS_CUDA_SIM=1")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_same_bits_across_gpu_runs(layout):
    """Also under the CUDA simulation, each run with another thread schedule."""
    x = torch.randn(32, 64, 28, 28, device=CUDA_DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    results = []
    for run in range(3):
        reschedule(run + 1)
        xs = x.clone().requires_grad_()
        with regops.use_backend("cuda"):
            y = regops.batch_norm(xs, None, None, None, None, True)
        results.append((y, *torch.autograd.grad(y, xs, grad)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- the Triton ops: the native ops' checks, word for word, and the device guard ----------

HAS_TRITON = "triton" in regops.available_backends()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton backend")


def _raw_op_error_cases():
    """(op name, arguments) that the native op rejects; its triton_ twin must
    reject them with the same message, before any kernel reads out of bounds."""
    x = torch.randn(100)
    mask = torch.zeros(16, dtype=torch.uint8)
    seed = torch.tensor([1])
    bn = torch.randn(4, 3, 5)
    c = torch.ones(3)
    p, g = [torch.zeros(4)], [torch.zeros(4)]
    steps = [torch.zeros(())]
    sgd_rest = (0.0, 0.0, 0.0, False, False, 0.0, False, False)
    adamw_rest = (0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, False, False, False)
    return [
        ("dropout_backward", (x, mask[:3], 0.5)),  # 3 bytes for 100 elements: read past the end
        ("dropout_backward", (x, mask, 2.0)),
        ("dropout_backward", (x, mask.float(), 0.5)),
        ("dropout_backward", (x, mask.view(2, 8), 0.5)),
        ("dropout_backward", (x.int(), mask, 0.5)),
        ("dropout_forward", (x, 2.0, seed, 0, True)),
        ("dropout_forward", (x, float("nan"), seed, 0, True)),
        ("dropout_forward", (x, 0.5, seed.int(), 0, True)),
        ("dropout_forward", (x, 0.5, torch.tensor([1, 2]), 0, True)),
        ("dropout_forward_", (x.clone(), -0.5, seed, 0, True)),
        ("dropout_forward_", (x.int(), 0.5, seed, 0, True)),
        ("philox4x32_10", (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))),
        ("philox4x32_10", (torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))),
        ("philox4x32_10", (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64))),
        ("batch_norm_stats", (torch.randn(3),)),
        ("batch_norm_stats", (bn.int(),)),
        ("batch_norm_elementwise", (bn, c[:2], c, None, None, False)),
        ("batch_norm_elementwise", (bn, c, c.double(), None, None, False)),
        ("batch_norm_elementwise", (bn, c, c, torch.ones(3, 1), None, False)),
        ("batch_norm_backward_reduce", (bn[:, :, :4], bn, c, c, None, None, False)),
        ("batch_norm_backward_reduce", (bn.double(), bn, c, c, None, None, False)),
        ("batch_norm_backward_elementwise", (bn, bn, c, c, None, None, c, c, 0, False)),
        ("batch_norm_backward_elementwise", (bn, bn, c, c, None, None, c[:1], c, 3, False)),
        ("batch_norm_forward", (bn, None, None, None, None, False, 1e-5, False)),
        ("batch_norm_forward", (torch.randn(1, 3), None, None, None, None, True, 1e-5, False)),
        ("batch_norm_forward", (bn, c[:2], None, None, None, True, 1e-5, False)),
        ("batch_norm_backward", (bn, bn, None, None, c, c[:2], True, False)),
        ("batch_norm_backward", (bn.half(), bn, None, None, c, c, True, False)),
        ("sgd_step_", (p, [], []) + (0.1,) + sgd_rest),
        ("sgd_step_", (p, [torch.zeros(5)], []) + (0.1,) + sgd_rest),
        ("sgd_step_", (p, g, []) + (-0.1,) + sgd_rest),
        ("sgd_step_", (p, g, [], 0.1, 0.9) + sgd_rest[1:]),
        ("sgd_step_", (p, [torch.zeros(4, dtype=torch.float16)], [], 0.1) + sgd_rest),
        ("sgd_step_", ([torch.zeros(8)[::2]], [torch.zeros(8)[::2]], [], 0.1) + sgd_rest),
        ("sgd_step_", (p, g, [], 0.1) + sgd_rest + (torch.ones(2),)),
        ("adamw_step_", (p, g, [torch.zeros(4)], [torch.zeros(4)], [], steps, 0.1, 1.5) + adamw_rest[1:]),
        ("adamw_step_", (p, g, [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros((), dtype=torch.int64)], 0.1)
         + adamw_rest),
        ("adamw_step_", (p, g, [torch.zeros(4)], [torch.zeros(4)], [], steps, 0.1) + adamw_rest[:7] + (True, False)),
        ("adamw_step_", (p, g, [torch.zeros(4)], [], [], steps, 0.1) + adamw_rest),
        ("multi_tensor_norm", ([torch.zeros(3), torch.zeros(3, dtype=torch.float16)], False)),
        ("multi_tensor_norm", ([torch.zeros(3), torch.zeros(3, dtype=torch.int32)], False)),
    ]


@needs_triton
@pytest.mark.parametrize("case", range(len(_raw_op_error_cases())))
def test_triton_ops_reject_what_the_native_ops_reject_in_the_same_words(case):
    name, args = _raw_op_error_cases()[case]
    with pytest.raises(RuntimeError) as native:
        getattr(torch.ops.regops, name)(*args)
    with pytest.raises(RuntimeError) as triton:
        getattr(torch.ops.regops, f"triton_{name}")(*args)
    assert str(triton.value).strip() == str(native.value).strip()


@needs_triton
def test_every_triton_launch_runs_inside_the_device_guard(monkeypatch):
    """Every kernel launch of every Triton op goes through the launch helper,
    inside device_guard(the tensors' device): under the interpreter a
    launch outside it fails this test."""
    from regops.triton import _launch

    if HAS_CUDA:
        pytest.skip("watches the interpreter's launches")
    from triton.runtime.interpreter import InterpretedFunction

    entered, inside, launched = [], [], []
    real_run = InterpretedFunction.run

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def run(self, *args, **kwargs):
        if not inside:
            raise AssertionError(f"{self.fn.__name__} launched outside device_guard")
        launched.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_launch, "device_guard", Guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    with regops.use_backend("triton"):
        x = torch.randn(2, 3, 4, requires_grad=True)
        y = regops.dropout(regops.batch_norm(x, None, None, None, None, True), 0.5, seed=1)
        y.sum().backward()
        regops.dropout(x.detach(), 0.5, seed=1, inplace=True)
        regops.philox4x32_10(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
        for optimizer in (regops.optim.SGD([x], lr=0.1, momentum=0.9, max_grad_norm=1.0),
                          regops.optim.AdamW([x], lr=torch.tensor(0.1))):
            optimizer.step()
    kernels = {"_stats_partial_kernel", "_stats_merge_kernel", "_elementwise_kernel", "_backward_partial_kernel",
               "_sum_merge_kernel", "_backward_elementwise_kernel", "_dropout_forward_kernel",
               "_dropout_backward_kernel", "_philox_kernel", "_sgd_kernel", "_adamw_kernel", "_sum_of_squares_kernel"}
    assert set(launched) == kernels
    assert len(entered) == len(launched) and all(device == x.device for device in entered)


@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_ops_on_the_second_gpu_while_the_first_is_current():
    """Without the guard a launch goes to the current device (0) with
    pointers of device 1."""
    from regops import reference

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, 5, 5, generator=gen)
    with torch.cuda.device(0), regops.use_backend("triton"):
        on_1 = x.to("cuda:1")
        y, mask = regops.dropout_with_mask(on_1, 0.5, seed=3)
        want_y, want_mask = reference.dropout_with_mask(x, 0.5, 3)
        assert torch.equal(mask.cpu(), want_mask) and torch.equal(y.cpu(), want_y)
        mean, var = regops.batch_norm_stats(on_1)
        want_mean, want_var = reference.batch_norm_stats(x)
        torch.testing.assert_close(mean.cpu(), want_mean)
        torch.testing.assert_close(var.cpu(), want_var)
        param = on_1.clone().requires_grad_()
        param.grad = torch.ones_like(param)
        regops.optim.SGD([param], lr=0.5).step()
        torch.testing.assert_close(param.detach().cpu(), x - 0.5)
        assert torch.cuda.current_device() == 0
