"""regops.nn.SyncBatchNorm on 2 and 3 gloo ranks: the forward, every
gradient and the running statistics equal torch's batch norm over the
concatenated batch (unequal and empty local batches included), with one
all-gather per forward and one all-reduce per backward; the single-process
fallback and convert_sync_batchnorm."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import regops
from _distributed import run_distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 2  # the running statistics move twice
TOLERANCES = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}

# Local batch sizes per rank (unequal, one empty), the per-sample shape
# (C, ...), layout, dtype and module options.
CASES = {
    2: [
        dict(sizes=[4, 3], sample=(5, 3, 2), layout=torch.channels_last, dtype=torch.float32, activation="relu",
             affine=True, momentum=0.1, track=True),
        dict(sizes=[3, 3], sample=(7,), layout=torch.contiguous_format, dtype=torch.float32, activation=None,
             affine=False, momentum=None, track=True),
        dict(sizes=[2, 5], sample=(3, 7), layout=torch.contiguous_format, dtype=torch.float16, activation="relu",
             affine=True, momentum=0.2, track=True),
        # The same building blocks on the other backends.
        dict(sizes=[3, 2], sample=(3, 2, 3), layout=torch.channels_last, dtype=torch.float32, activation="relu",
             affine=True, momentum=0.1, track=True, backend="reference"),
    ] + ([dict(sizes=[2, 3], sample=(3, 5), layout=torch.contiguous_format, dtype=torch.float32, activation="relu",
               affine=True, momentum=0.1, track=True, backend="triton")]
         if "triton" in regops.available_backends() else [])
      # The CUDA kernels on the ranks' CPU tensors, under the simulation.
      + ([dict(sizes=[4, 3], sample=(5, 3, 2), layout=torch.channels_last, dtype=torch.float32, activation="relu",
               affine=True, momentum=0.1, track=True, backend="cuda"),
          dict(sizes=[2, 5], sample=(3, 7), layout=torch.contiguous_format, dtype=torch.float16, activation=None,
               affine=True, momentum=0.2, track=True, backend="cuda")]
         if regops._backend.cuda_simulated() else []),
    3: [
        dict(sizes=[2, 0, 5], sample=(3, 4), layout=torch.contiguous_format, dtype=torch.float32,
             activation="relu", affine=True, momentum=0.1, track=True),
        dict(sizes=[1, 2, 3], sample=(2, 2, 3, 2), layout=torch.channels_last_3d, dtype=torch.float32,
             activation=None, affine=True, momentum=0.3, track=True),
        dict(sizes=[3, 1, 2], sample=(5,), layout=torch.contiguous_format, dtype=torch.float32, activation=None,
             affine=True, momentum=0.1, track=False),
    ],
}


def _layout(tensor, layout):
    if layout == torch.contiguous_format or (layout == torch.channels_last and tensor.dim() == 4) or \
            (layout == torch.channels_last_3d and tensor.dim() == 5):
        return tensor.contiguous(memory_format=layout)
    raise AssertionError(f"layout {layout} does not fit a {tensor.dim()}-D tensor")


def _case_data(case: dict, index: int):
    """Per step: the global input (channel-dependent offset and scale) and the
    global output gradient; and the module's initial weight and bias."""
    generator = torch.Generator().manual_seed(100 + index)
    channels = case["sample"][0]
    view = (1, channels) + (1,) * (len(case["sample"]) - 1)
    steps = []
    for _ in range(STEPS):
        shape = (sum(case["sizes"]),) + case["sample"]
        x = torch.randn(shape, generator=generator) * (1 + 3 * torch.rand(view, generator=generator))
        x = x + 4 * torch.randn(view, generator=generator)
        steps.append((x.to(case["dtype"]), torch.randn(shape, generator=generator).to(case["dtype"])))
    weight, bias = torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)
    return steps, weight, bias


def _count_collectives():
    """Wraps torch.distributed's all_gather(_into_tensor) and all_reduce in
    this process (a rank of the harness) with call counters."""
    counts = {"all_gather": 0, "all_reduce": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    dist.all_gather = counting("all_gather", dist.all_gather)
    dist.all_gather_into_tensor = counting("all_gather", dist.all_gather_into_tensor)
    dist.all_reduce = counting("all_reduce", dist.all_reduce)
    return counts


def _run_sync_batch_norm(rank, world_size):
    """Every case of CASES[world_size] on this rank's rows; returns per case
    the local outputs and gradients per step and the final buffers."""
    counts = _count_collectives()
    results = []
    for index, case in enumerate(CASES[world_size]):
        steps, weight, bias = _case_data(case, index)
        module = regops.nn.SyncBatchNorm(case["sample"][0], momentum=case["momentum"], affine=case["affine"],
                                         track_running_stats=case["track"], activation=case["activation"])
        if case["affine"]:
            with torch.no_grad():
                module.weight.copy_(weight)
                module.bias.copy_(bias)
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        backend = regops.use_backend(case["backend"]) if "backend" in case else contextlib.nullcontext()
        with backend:
            per_step = _steps(module, steps, rows, case, counts)
        results.append(dict(steps=per_step, buffers={name: value.clone() for name, value in module.named_buffers()}))
    return results


def _steps(module, steps, rows, case, counts):
    """Forward and backward of every step on this rank's ``rows``."""
    per_step = []
    for x, grad in steps:
        local = _layout(x[rows].clone(), case["layout"]).requires_grad_()
        before = dict(counts)
        output = module(local)
        output.backward(_layout(grad[rows].clone(), case["layout"]))
        collectives = {name: counts[name] - before[name] for name in counts}
        per_step.append(dict(output=output.detach(), grad_input=local.grad,
                             grad_weight=None if module.weight is None else module.weight.grad.clone(),
                             grad_bias=None if module.bias is None else module.bias.grad.clone(),
                             collectives=collectives,
                             output_keeps_layout=output.is_contiguous(memory_format=case["layout"])))
        module.zero_grad()
    return per_step


def _reference(case: dict, index: int):
    """torch's batch norm over the concatenated batch, in float64."""
    steps, weight, bias = _case_data(case, index)
    channels = case["sample"][0]
    running_mean = torch.zeros(channels, dtype=torch.float64) if case["track"] else None
    running_var = torch.ones(channels, dtype=torch.float64) if case["track"] else None
    expected = []
    for step, (x, grad) in enumerate(steps):
        x64 = x.double().requires_grad_()
        w64 = weight.double().requires_grad_() if case["affine"] else None
        b64 = bias.double().requires_grad_() if case["affine"] else None
        momentum = 1.0 / (step + 1) if case["momentum"] is None else case["momentum"]
        y = F.batch_norm(x64, running_mean, running_var, w64, b64, True, momentum, 1e-5)
        if case["activation"] == "relu":
            y = torch.relu(y)
        inputs = [x64] + ([w64, b64] if case["affine"] else [])
        grads = torch.autograd.grad(y, inputs, grad.double())
        expected.append(dict(output=y.detach(), grad_input=grads[0],
                             grad_weight=grads[1] if case["affine"] else None,
                             grad_bias=grads[2] if case["affine"] else None))
    return expected, running_mean, running_var


def _check(what, actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype],
                               msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_batch_norm_matches_batch_norm_over_the_global_batch(world_size):
    results = run_distributed(_run_sync_batch_norm, world_size)
    for index, case in enumerate(CASES[world_size]):
        expected, running_mean, running_var = _reference(case, index)
        dtype = case["dtype"]
        for step, reference in enumerate(expected):
            per_rank = [result[index]["steps"][step] for result in results]
            name = f"case {index} {case['sizes']} step {step}"
            _check(f"{name} output", torch.cat([r["output"] for r in per_rank]), reference["output"], dtype)
            _check(f"{name} grad_input", torch.cat([r["grad_input"] for r in per_rank]), reference["grad_input"],
                   dtype)
            if case["affine"]:
                # Each rank holds its own share; DDP sums (averages) them.
                _check(f"{name} grad_weight", sum(r["grad_weight"] for r in per_rank), reference["grad_weight"],
                       torch.float32 if dtype == torch.float32 else dtype)
                _check(f"{name} grad_bias", sum(r["grad_bias"] for r in per_rank), reference["grad_bias"],
                       torch.float32 if dtype == torch.float32 else dtype)
            for rank, r in enumerate(per_rank):
                assert r["collectives"] == {"all_gather": 1, "all_reduce": 1}, (name, rank, r["collectives"])
                assert r["output_keeps_layout"], (name, rank)
        for rank, result in enumerate(results):
            buffers = result[index]["buffers"]
            if case["track"]:
                _check(f"case {index} rank {rank} running_mean", buffers["running_mean"], running_mean,
                       torch.float32)
                _check(f"case {index} rank {rank} running_var", buffers["running_var"], running_var, torch.float32)
                assert int(buffers["num_batches_tracked"]) == STEPS
            else:
                assert "running_mean" not in buffers


def _run_world_of_one_and_empty_batches(rank, world_size):
    """A group of one rank falls back to plain batch norm (no collective);
    a step where every rank's batch is empty changes no running statistic."""
    counts = _count_collectives()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, generator=generator)
    results = {}
    if world_size == 1:
        sync = regops.nn.SyncBatchNorm(3, activation="relu")
        plain = regops.nn.BatchNorm1d(3, activation="relu")
        results["sync"], results["plain"] = sync(x), plain(x)
        results["buffers"] = (dict(sync.named_buffers()), dict(plain.named_buffers()))
    else:
        module = regops.nn.SyncBatchNorm(3)
        module(x[rank::world_size])
        before = {name: value.clone() for name, value in module.named_buffers()}
        empty = x[:0].clone().requires_grad_()
        output = module(empty)
        output.sum().backward()
        results["empty"] = (output.shape, empty.grad.shape, before, dict(module.named_buffers()))
    results["counts"] = counts
    return results


def test_sync_batch_norm_with_one_rank_is_plain_batch_norm():
    (result,) = run_distributed(_run_world_of_one_and_empty_batches, 1)
    torch.testing.assert_close(result["sync"], result["plain"])
    for name, value in result["buffers"][1].items():
        torch.testing.assert_close(result["buffers"][0][name], value)
    assert result["counts"] == {"all_gather": 0, "all_reduce": 0}


def test_sync_batch_norm_step_with_every_batch_empty_keeps_running_stats():
    for rank, result in enumerate(run_distributed(_run_world_of_one_and_empty_batches, 2)):
        output_shape, grad_shape, before, after = result["empty"]
        assert output_shape == grad_shape == (0, 3, 4)
        torch.testing.assert_close(after["running_mean"], before["running_mean"])
        torch.testing.assert_close(after["running_var"], before["running_var"])
        assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1
        assert not torch.equal(before["running_mean"], torch.zeros(3)), "the first step must move the stats"


# --- single process: no process group ----------------------------------------------------

def test_without_a_process_group_it_is_plain_batch_norm():
    assert not dist.is_initialized()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(5, 4, 3, 3, generator=generator)
    modules = [regops.nn.SyncBatchNorm(4, momentum=None, activation="relu"),
               regops.nn.BatchNorm2d(4, momentum=None, activation="relu")]
    outputs, grads = [], []
    for module in modules:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-1, 2, 4))
        inp = x.clone().requires_grad_()
        outputs.append(module(inp))
        outputs[-1].backward(grad)
        grads.append((inp.grad, module.weight.grad, module.bias.grad))
    torch.testing.assert_close(outputs[0], outputs[1])
    for actual, expected in zip(grads[0], grads[1]):
        torch.testing.assert_close(actual, expected)
    for (name, actual), (_, expected) in zip(modules[0].named_buffers(), modules[1].named_buffers()):
        torch.testing.assert_close(actual, expected, msg=name)
    modules[0].eval()
    torch.testing.assert_close(modules[0](x), F.relu(F.batch_norm(x, modules[1].running_mean, modules[1].running_var,
                                                                  modules[1].weight, modules[1].bias)))


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_activation():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6),
                            regops.nn.BatchNorm1d(6, activation="relu", affine=False)),
        torch.nn.SyncBatchNorm(6, track_running_stats=False))
    model[1].eval()
    originals = [model[1], model[2][2], model[3]]
    tensors = [dict(module.named_parameters()) | dict(module.named_buffers()) for module in originals]
    converted = regops.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert converted is model
    new = [converted[1], converted[2][2], converted[3]]
    for old, module, named in zip(originals, new, tensors):
        assert type(module) is regops.nn.SyncBatchNorm
        assert module.process_group == "group"
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(module, attribute) == getattr(old, attribute), attribute
        current = dict(module.named_parameters()) | dict(module.named_buffers())
        assert current.keys() == named.keys()
        for name, tensor in named.items():
            assert current[name] is tensor, name
    assert new[0].activation is None and new[1].activation == "relu"
    assert type(converted[0]) is torch.nn.Conv2d
    single = regops.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is regops.nn.SyncBatchNorm


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        regops.nn.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        regops.nn.SyncBatchNorm(3, activation="gelu")
