"""Checks that only a CUDA device can make (skipped without one; `make
gpu-check` runs them): no op waits for the device in its forward, backward or
optimizer step (torch.cuda.set_sync_debug_mode("error") turns any host sync
into an error), and a whole training step of the MNIST model captured in a
CUDA graph replays correctly: new dropout masks on every replay with
seed=None, the optimizer reading a tensor lr at replay time, and nothing the
graph reads living in a pinned host buffer that a later allocation can
reuse."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import regops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.mnist import SimpleCNNWithReg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA-only checks (host syncs, CUDA graphs): no CUDA device here")

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in regops.available_backends()]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    with regops.use_backend(request.param):
        yield request.param


@contextlib.contextmanager
def no_host_sync():
    """Any synchronizing CUDA call inside raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---- no host sync -------------------------------------------------------------------------

@pytest.mark.parametrize("recompute_mask", [False, True])
def test_dropout_forward_and_backward_make_no_host_sync(backend, recompute_mask):
    x = torch.randn(4099, device="cuda", requires_grad=True)
    grad = torch.randn(4099, device="cuda")
    regops.dropout(x, 0.3, recompute_mask=recompute_mask).backward(grad)  # first call: lazy initialization
    with no_host_sync():
        y = regops.dropout(x, 0.3, recompute_mask=recompute_mask)
        y.backward(grad)
        y_fixed, mask = regops.dropout_with_mask(x.detach(), 0.3, seed=1234)
        regops.dropout(x.detach().clone(), 0.3, inplace=True)
    assert mask.numel() == (4099 + 7) // 8


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_forward_and_backward_make_no_host_sync(backend, channels_last):
    module = regops.nn.BatchNorm2d(6).cuda()
    x = torch.randn(4, 6, 5, 7, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    module(x).sum().backward()
    with no_host_sync():
        module(x).sum().backward()
        module.eval()
        module(x).sum().backward()


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    ("SGD", dict(lr=0.01, l1=1e-4, l1_mode="proximal", max_grad_norm=1.0)),
    ("AdamW", dict(lr=1e-3, weight_decay=0.01)),
    ("AdamW", dict(lr=1e-3, amsgrad=True, max_grad_norm=1.0)),
    ("AdamW", dict(lr="tensor", weight_decay=0.01)),
])
def test_optimizer_step_makes_no_host_sync(backend, name, kwargs):
    kwargs = dict(kwargs)
    if kwargs["lr"] == "tensor":
        kwargs["lr"] = torch.tensor(1e-3, device="cuda")
    params = [torch.randn(shape, device="cuda", requires_grad=True) for shape in [(33, 7), (1,), (70001,)]]
    optimizer = getattr(regops.optim, name)(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # the first step creates the state
    with no_host_sync():
        optimizer.step()
        regops.multi_tensor_norm([p.grad for p in params])


# ---- CUDA graphs -------------------------------------------------------------------------

def _dropout_masks(model: torch.nn.Module) -> list[torch.Tensor]:
    """Static tensors that each replay fills with the dropout modules' masks."""
    masks = []
    for module in model.modules():
        if isinstance(module, regops.nn.Dropout):
            mask = torch.empty(0, dtype=torch.bool, device="cuda")
            masks.append(mask)

            def record(_module, _input, output, mask=mask):
                mask.resize_(output.shape)
                mask.copy_(output == 0)

            module.register_forward_hook(record)
    return masks


def _optimizer(name: str, lr_kind: str, params):
    lr = {"sgd": 0.01, "adamw": 1e-3}[name]
    if lr_kind == "tensor":
        lr = torch.tensor(lr, device="cuda")
    if name == "sgd":
        return regops.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4), lr
    return regops.optim.AdamW(params, lr=lr, weight_decay=0.01), lr


@pytest.mark.parametrize("name,lr_kind", [("sgd", "float"), ("adamw", "float"), ("adamw", "tensor")])
def test_whole_training_step_replays_from_a_cuda_graph(backend, name, lr_kind):
    torch.manual_seed(0)
    model = regops.convert(SimpleCNNWithReg()).cuda()
    masks = _dropout_masks(model)
    assert masks, "the model has a regops dropout"
    params = list(model.parameters())
    optimizer, lr = _optimizer(name, lr_kind, params)
    data = torch.randn(64, 1, 28, 28, device="cuda")
    target = torch.randint(0, 10, (64,), device="cuda")

    def train_step():
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        return loss

    # Warm up on a side stream (state, workspaces, Triton compiles), as the
    # CUDA-graph recipe of the torch documentation does.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            train_step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step()

    steps_before = [float(optimizer.state[p]["step"]) for p in params] if name == "adamw" else None
    seen_masks = []
    for replay in range(4):
        if replay == 2:
            # Pinned host memory allocated and overwritten between replays: a
            # graph that read a pinned table would now read garbage.
            garbage = [torch.full((1 << 16,), -1, dtype=torch.int64).pin_memory() for _ in range(8)]
            for buffer in garbage:
                buffer.to("cuda", non_blocking=True)
        before = [p.detach().clone() for p in params]
        data.copy_(torch.randn_like(data))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss).item()
        assert all(torch.isfinite(p).all() for p in params)
        assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the replay updated the parameters"
        seen_masks.append([m.clone() for m in masks])
    for earlier, later in zip(seen_masks, seen_masks[1:]):
        assert any(not torch.equal(a, b) for a, b in zip(earlier, later)), "seed=None gives new masks every replay"
    if name == "adamw":
        steps_after = [float(optimizer.state[p]["step"]) for p in params]
        assert steps_after == [s + 4 for s in steps_before]

    if lr_kind == "tensor":
        # The graph reads lr at replay time: with lr = 0 and the decay it
        # scales, the parameters stay where they are.
        lr.zero_()
        before = [p.detach().clone() for p in params]
        graph.replay()
        torch.cuda.synchronize()
        for a, p in zip(before, params):
            torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
