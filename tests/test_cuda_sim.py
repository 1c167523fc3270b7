"""The SIMT simulation of the CUDA kernels (REGOPS_CUDA_SIM=1, csrc/simt/):
launch limits, the semantics of warp operations, the detection of defects
planted in the self-test kernels (csrc/simt/selftest.cpp), and results that do
not depend on the thread schedule for every regops op."""

from __future__ import annotations

import pytest
import torch

import regops
from conftest import CUDA_SIMULATED, assert_same_bits, reschedule

pytestmark = pytest.mark.skipif(not CUDA_SIMULATED, reason="needs REGOPS_CUDA_SIM=1")

THREADS = 256  # the self-test kernels' block size
SEEDS = range(8)


def _sim():
    return torch.ops.regops_cuda_sim


def _input(n=1000):
    return torch.arange(n, dtype=torch.float32) % 97 - 40.0


@pytest.fixture(autouse=True)
def _fresh_schedule():
    reschedule(0)
    _sim().take_launches()
    yield
    reschedule(0)


def test_cuda_backend_runs_on_cpu_tensors():
    assert "cuda" in regops.available_backends()
    with regops.use_backend("cuda"):
        assert regops._backend.backend_for(torch.zeros(1)) == "cuda"
        regops.dropout(torch.ones(10), 0.5, seed=1)
    assert _sim().take_launches().shape[0] == 1
    with regops.use_backend("cuda"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        regops.dropout(torch.ones(10, device="meta"), 0.5, seed=1)


# --- launch configuration ------------------------------------------------------------

@pytest.mark.parametrize("grid, block, shared, error", [
    ((1, 1, 1), (1025, 1, 1), 0, "invalid configuration argument"),
    ((1, 1, 1), (32, 32, 2), 0, "invalid configuration argument"),   # 2048 threads
    ((1, 1, 1), (1, 1, 65), 0, "invalid configuration argument"),
    ((1, 65536, 1), (32, 1, 1), 0, "invalid configuration argument"),
    ((1, 1, 65536), (32, 1, 1), 0, "invalid configuration argument"),
    ((0, 1, 1), (32, 1, 1), 0, "invalid configuration argument"),
    ((1, 1, 1), (0, 1, 1), 0, "invalid configuration argument"),
    ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, "invalid argument"),
])
def test_bad_launch_configurations_raise_like_the_gpu(grid, block, shared, error):
    with pytest.raises(RuntimeError, match=f"CUDA error: {error}"):
        _sim().selftest_launch(list(grid), list(block), shared)


@pytest.mark.parametrize("grid, block, shared", [
    ((1, 1, 1), (1024, 1, 1), 0),
    ((1, 1, 1), (1, 16, 64), 0),
    ((1, 65535, 1), (1, 1, 1), 0),
    ((2, 1, 3), (32, 1, 1), 48 * 1024),
])
def test_launches_at_the_limits_run(grid, block, shared):
    _sim().selftest_launch(list(grid), list(block), shared)
    assert _sim().take_launches().tolist() == [[*grid, *block, shared]]


def test_grid_sizes_are_the_h100_ones():
    """Dropout launches one thread per mask byte, at most 132 SMs x 8 blocks of
    256: a large input gets the capped grid and a grid-stride loop."""
    with regops.use_backend("cuda"):
        for numel, blocks in ((1000, 1), (8 * 256 * 5 + 1, 6), (8 * 256 * 1056 * 2, 1056)):
            regops.dropout(torch.ones(numel), 0.5, seed=1)
            assert _sim().take_launches().tolist() == [[blocks, 1, 1, 256, 1, 1, 0]]


# --- the layer's semantics -------------------------------------------------------------

def test_block_sum_through_shared_memory():
    x = _input()
    expected = torch.stack([chunk.sum() for chunk in x.split(THREADS)])
    for seed in SEEDS:
        reschedule(seed)
        assert torch.equal(_sim().selftest("block_sum", x), expected)


def _warp_ops_expected(x: torch.Tensor) -> torch.Tensor:
    """CUDA's semantics of the warp_ops kernel's shuffles and votes, lane by lane."""
    n = x.numel()
    padded = torch.full((-(-n // THREADS) * THREADS,), -1.0)
    padded[:n] = x
    rows = []
    for i in range(n):
        warp_base, lane = i - i % 32, i % 32
        v = padded[i].item()

        def at(lane_):
            return padded[warp_base + lane_].item()

        segment8 = lane - lane % 8
        warp = padded[warp_base:warp_base + 32]
        ballot = sum(1 << k for k in range(32) if k % 3 == 0) & 0xFFFF
        rows.append([
            at(3),
            at(lane - 1) if lane >= 1 else v,
            at(lane + 1) if lane + 1 < 32 else v,
            at(lane ^ 5),
            at(lane + 2) if lane % 8 + 2 < 8 else v,
            float(ballot),
            float(bool((warp > 1000).any())) + 2.0 * float(bool((warp >= -1).all())),
            at(segment8 + ((lane % 8) ^ 1)) if lane < 8 else v,
        ])
    return torch.tensor(rows).flatten()


def test_warp_operations_follow_cuda():
    x = _input(300)  # a partial last block: lanes past the input still take part
    assert torch.equal(_sim().selftest("warp_ops", x), _warp_ops_expected(x))


def test_atomics_are_atomic():
    x = _input(5000)
    out = _sim().selftest("atomic_sum", x)
    assert out[0].item() == x.sum().item() and out[1].item() == x.numel()


def test_unknown_selftest_and_bad_input_raise():
    with pytest.raises(RuntimeError, match="no kernel named"):
        _sim().selftest("nothing", _input())
    with pytest.raises(RuntimeError, match="non-empty 1-D float32"):
        _sim().selftest("block_sum", _input().double())


# --- planted defects ----------------------------------------------------------------------

@pytest.mark.parametrize("kernel, message", [
    ("partial_warp_shuffle", r"divergent warp collective: __shfl_down_sync .* waits at __syncthreads\(\)"),
    ("divergent_barrier", r"__syncthreads\(\) at .*selftest.cpp:\d+ reached by 232 of 256 threads"),
    ("branch_barriers", r"__syncthreads\(\) at .* while other threads wait at __syncthreads\(\) at"),
    ("misaligned_vector", r"misaligned address: 16-byte vector load"),
    ("shared_out_of_bounds", r"shared memory index 256 out of bounds \[0, 256\) of slots"),
])
def test_defects_raise(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        _sim().selftest(kernel, _input())


def test_missing_barrier_is_caught():
    """Without the barrier, thread 0 may read warp slots that other warps have
    not written yet: uninitialized shared memory (NaN) or a schedule-dependent sum."""
    x = _input()
    expected = _sim().selftest("block_sum", x)
    wrong = 0
    for seed in SEEDS:
        reschedule(seed)
        wrong += not torch.equal(_sim().selftest("block_sum_missing_barrier", x), expected)
    assert wrong > 0


def test_shared_memory_race_depends_on_the_schedule():
    x = _input()
    results = set()
    for seed in SEEDS:
        reschedule(seed)
        results.add(tuple(_sim().selftest("shared_race", x).tolist()))
    assert len(results) > 1


# --- every op: bit-identical under two schedules -------------------------------------------

def _dropout_run():
    x = torch.randn(3 * 2048 + 13, generator=torch.Generator().manual_seed(1))
    y, mask = regops.dropout_with_mask(x[1:], 0.3, seed=5, offset=3)
    back = regops.dropout_backward(y, mask, 0.3)
    words = regops.philox4x32_10(torch.arange(400, dtype=torch.int64).view(100, 4),
                                 torch.arange(200, dtype=torch.int64).view(100, 2))
    return y, mask, back, words


def _batch_norm_run():
    gen = torch.Generator().manual_seed(2)
    outputs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(6, 40, 5, 7, generator=gen).to(memory_format=layout).requires_grad_()
        w = torch.randn(40, generator=gen).requires_grad_()
        b = torch.randn(40, generator=gen).requires_grad_()
        y = regops.batch_norm(x, None, None, w, b, True, activation="relu")
        outputs += [y, *torch.autograd.grad(y, (x, w, b), torch.randn(y.shape, generator=gen))]
        mean, var = regops.batch_norm_stats(x.detach())
        invstd = (var + 1e-5).rsqrt()
        grad = torch.randn(x.shape, generator=gen)
        sum_dy, sum_dy_xmu = regops.batch_norm_backward_reduce(grad, x.detach(), mean, invstd, w.detach())
        outputs += [mean, var, regops.batch_norm_elementwise(x.detach(), mean, invstd, w.detach(), b.detach()),
                    sum_dy, sum_dy_xmu,
                    regops.batch_norm_backward_elementwise(grad, x.detach(), mean, invstd, w.detach(), None, sum_dy,
                                                           sum_dy_xmu, x.numel() // 40)]
    return outputs


def _optimizer_run():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(70000, generator=gen).requires_grad_(), torch.randn(7, 3, generator=gen).requires_grad_()]
    sgd_params = [p.detach().clone().requires_grad_() for p in params]
    optimizers = [regops.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True),
                  regops.optim.SGD(sgd_params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)]
    for _ in range(2):
        for p in params + sgd_params:
            p.grad = torch.randn(p.shape, generator=gen)
        for optimizer in optimizers:
            optimizer.step()
    return [p.detach() for p in params + sgd_params] + [regops.multi_tensor_norm([p.detach() for p in params])]


@pytest.mark.parametrize("run", [_dropout_run, _batch_norm_run, _optimizer_run], ids=["dropout", "batch_norm", "optim"])
def test_two_schedules_give_identical_bits(run):
    results = []
    for seed in (1, 2):
        reschedule(seed)
        with regops.use_backend("cuda"):
            results.append(run())
    for first, second in zip(*results):
        assert_same_bits(first, second)
