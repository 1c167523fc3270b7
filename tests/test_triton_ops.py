"""The Triton ops called directly (torch.ops.regops.triton_*): the native
ops' checks word for word, before any kernel runs, and every launch inside
the device guard."""

from __future__ import annotations

import pytest
import torch

import regops
from conftest import HAS_CUDA


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
    kernels = {"_stats_partial_kernel", "_stats_finalize_kernel", "_normalize_kernel", "_backward_partial_kernel",
               "_gradient_finalize_kernel", "_grad_input_kernel", "_dropout_forward_kernel",
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
