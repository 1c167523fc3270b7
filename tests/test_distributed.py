"""regops under torch.distributed, on 2 and 3 gloo ranks on the CPU: the test
harness itself, DDP training with regops modules and optimizers, and FSDP2
(DTensor parameters) with the regops optimizers, each against a
single-process run on the whole batch."""

import copy
import time

import pytest
import torch
import torch.distributed as dist

import regops
import regops.distributed
from _distributed import RankFailure, run_distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

GLOBAL_BATCH = 12  # divisible by 2 and 3: every rank gets an equal slice, as DDP's mean needs
STEPS = 4
MAX_GRAD_NORM = 0.25
TOLERANCE = dict(atol=2e-5, rtol=1e-4)  # float32; only the order of the gradient sums differs


# --- the harness ---------------------------------------------------------------------

def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # never completes: the harness must stop this rank


def _never_finish(rank, world_size):
    time.sleep(3600)


def _rank_and_sum(rank, world_size):
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return rank, world_size, float(total)


def test_harness_returns_results_in_rank_order():
    assert run_distributed(_rank_and_sum, 3) == [(rank, 3, 6.0) for rank in range(3)]


def test_harness_reraises_a_rank_exception_with_its_traceback():
    with pytest.raises(RankFailure) as info:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    message = str(info.value)
    # The rank that raised comes first, with its own traceback; rank 0 then
    # fails in its barrier.
    assert message.startswith("_fail_on_rank_one failed on ranks [1")
    first_rank = message.split("--- rank 1 of 2 ---", 1)[1].split("--- rank", 1)[0]
    assert "ValueError: rank 1 fails on purpose" in first_rank
    assert "_fail_on_rank_one" in first_rank


def test_harness_kills_ranks_that_run_past_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish in 4 s; ranks \[0, 1\] were still running"):
        run_distributed(_never_finish, 2, timeout=4)
    assert time.monotonic() - start < 60


# --- models and data shared by the ranks and the single-process reference ------------

class SeededDropout(torch.nn.Module):
    """regops dropout whose mask depends only on (seed, step, global element
    index): rank r, holding rows [row_offset, row_offset + n) of the global
    batch, draws exactly the bits the single process draws for those rows
    (the regops random rule: element i uses Philox counter offset + i // 4)."""

    def __init__(self, p: float, seed: int, features: int) -> None:
        super().__init__()
        assert features % 4 == 0, "rows must start on a Philox counter boundary"
        self.p, self.seed, self.features = p, seed, features
        self.row_offset = 0
        self.calls = 0

    def forward(self, input):
        self.calls += 1
        return regops.dropout(input, self.p, self.training, seed=self.seed + self.calls,
                              offset=self.row_offset * self.features // 4)


def _ddp_model() -> torch.nn.Module:
    """Linear, regops batch norm fused with ReLU, regops dropout, Linear. The
    DDP ranks convert the batch norm to SyncBatchNorm, so that it normalizes
    over the global batch as the single process does. The first Linear has no
    bias: batch norm cancels it, its gradient is rounding noise, and AdamW
    would turn the noise's sign into full-size steps."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12, bias=False), regops.nn.BatchNorm1d(12, activation="relu"),
                               SeededDropout(0.3, seed=1234, features=12), torch.nn.Linear(12, 5))


def _batches(in_features: int, classes: int):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, in_features, generator=generator),
             torch.randint(classes, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]


OPTIMIZERS = {
    "sgd": lambda params: regops.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, l1=1e-3,
                                           max_grad_norm=MAX_GRAD_NORM),
    "adamw": lambda params: regops.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, l1=1e-3, l1_mode="proximal",
                                               max_grad_norm=MAX_GRAD_NORM),
}


def _train(model, optimizer, batches, rows: slice, wrapped=None):
    """STEPS steps of cross-entropy on ``rows`` of each global batch;
    returns the gradient norms the optimizer clipped with."""
    forward = wrapped if wrapped is not None else model
    for module in model.modules():
        if isinstance(module, SeededDropout):
            module.row_offset = rows.start
    norms = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(inputs[rows]), targets[rows])
        loss.backward()
        optimizer.step()
        norms.append(float(optimizer.last_grad_norm))
    return norms


def _single_process(build_model, optimizer_name, batches):
    model = build_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    norms = _train(model, optimizer, batches, slice(0, GLOBAL_BATCH))
    return model.state_dict(), norms


def _assert_matches_single_process(results, build_model, batches):
    for optimizer_name in OPTIMIZERS:
        expected_state, expected_norms = _single_process(build_model, optimizer_name, batches)
        # Clipping must be active, or the test could not see a wrong norm.
        assert max(expected_norms) > MAX_GRAD_NORM
        for rank, result in enumerate(results):
            state, norms = result[optimizer_name]
            assert state.keys() == expected_state.keys()
            for name, value in state.items():
                torch.testing.assert_close(value, expected_state[name], **TOLERANCE,
                                           msg=lambda m: f"rank {rank}, {optimizer_name}, {name}: {m}")
            torch.testing.assert_close(torch.tensor(norms), torch.tensor(expected_norms), **TOLERANCE)


# --- DDP -------------------------------------------------------------------------------

def _train_ddp(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    batches = _batches(6, 5)
    local = GLOBAL_BATCH // world_size
    results = {}
    for optimizer_name, make_optimizer in OPTIMIZERS.items():
        model = regops.nn.SyncBatchNorm.convert_sync_batchnorm(_ddp_model())
        assert isinstance(model[1], regops.nn.SyncBatchNorm)
        ddp = DistributedDataParallel(model)
        norms = _train(model, make_optimizer(model.parameters()), batches, slice(rank * local, (rank + 1) * local),
                       wrapped=ddp)
        results[optimizer_name] = (copy.deepcopy(model.state_dict()), norms)
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_training_matches_single_process(world_size):
    results = run_distributed(_train_ddp, world_size)
    _assert_matches_single_process(results, _ddp_model, _batches(6, 5))


# --- FSDP2 -----------------------------------------------------------------------------

def _fsdp_model() -> torch.nn.Module:
    # 7 and 2 output rows shard unevenly over 2 and 3 ranks; with 3 ranks the
    # last layer's weight and bias have an empty shard on rank 2.
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _train_fsdp(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    batches = _batches(10, 2)
    local = GLOBAL_BATCH // world_size
    results = {}
    for optimizer_name, make_optimizer in OPTIMIZERS.items():
        model = _fsdp_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = make_optimizer(model.parameters())
        norms = _train(model, optimizer, batches, slice(rank * local, (rank + 1) * local))
        # The optimizer states are sharded like their parameters.
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step":
                    assert isinstance(value, DTensor), key
        state = {name: value.full_tensor() for name, value in model.state_dict().items()}
        results[optimizer_name] = (state, norms)
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_optimizers_match_single_process(world_size):
    results = run_distributed(_train_fsdp, world_size)
    _assert_matches_single_process(results, _fsdp_model, _batches(10, 2))


# --- single-process parts of regops.distributed ----------------------------------------

def test_grad_norm_squared_of_plain_tensors_is_the_local_norm():
    grads = [[torch.randn(5, 3)], [torch.randn(7), torch.randn(())]]
    squared = regops.distributed.grad_norm_squared(grads, lambda groups: sum((t.double() ** 2).sum()
                                                                            for ts in groups for t in ts))
    expected = sum((t.double() ** 2).sum() for ts in grads for t in ts)
    torch.testing.assert_close(squared, expected)


def test_local_tensor_of_a_plain_tensor_is_itself():
    tensor = torch.randn(3)
    assert regops.distributed.local_tensor(tensor) is tensor
    assert regops.distributed.world_size() == 1
