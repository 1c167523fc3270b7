"""The shape classes the CUDA batch-norm forward branches on, proven on the
cuda backend (the SIMT simulation without a GPU): one pass (every value of a
channel, or of a channel tile, fits in one block's registers: statistics and
normalize in one kernel) or two passes (reduce, finalize, normalize), each
with the 16-byte vector path and the scalar path, in both layouts, with few
and many channels and more channels than a grid's y dimension holds. Which
class a shape falls into is read from the launch arithmetic itself
(csrc/include/regops/batch_norm_launch.h, compiled with the host compiler),
so a change of the thresholds cannot silently move every case to one path."""


import pytest
import torch
import torch.nn.functional as F

import regops
from conftest import CUDA_DEVICE, needs_cuda_backend, run_host_program

THREADS, UNROLL, SEGMENT_PASSES = 256, 4, 4  # kThreads, kUnroll, kSegmentPasses of csrc/cuda/batch_norm.cu

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "regops/batch_norm_launch.h"
// argv: threads unroll segment_passes, then (channels_inner batch channel_vectors_or_vectors rows) cases.
int main(int argc, char** argv) {
  const long long threads = std::atoll(argv[1]), unroll = std::atoll(argv[2]), passes = std::atoll(argv[3]);
  for (int i = 4; i + 3 < argc; i += 4) {
    const bool inner = std::atoll(argv[i]) != 0;
    const long long batch = std::atoll(argv[i + 1]), vectors = std::atoll(argv[i + 2]), rows = std::atoll(argv[i + 3]);
    bool fits;
    if (inner) {
      fits = regops::channel_rows_fit_one_pass(regops::channel_launch(vectors, threads), rows, unroll);
    } else {
      fits = regops::rows_fit_one_pass(regops::row_launch(batch, vectors, threads, unroll, passes), vectors, unroll);
    }
    std::printf("%d\n", fits ? 1 : 0);
  }
}
"""

# (shape, layout, dtype, vectorized, one_pass): every class the forward
# branches on. Vector paths need S (NCHW) or C (channels_last) to be a
# multiple of the vector (4 float32, 8 bfloat16). Two-pass cases are just
# past the one-pass limits: a row longer than one group pass (S > 4096 for
# float32 vectors), more rows than groups (65 rows of 16 vectors), more
# channels_last rows than the row threads hold.
NCHW, NHWC = torch.contiguous_format, torch.channels_last
CASES = [
    ((2, 3, 4, 4), NCHW, torch.float32, True, True),
    ((2, 2, 64, 68), NCHW, torch.float32, True, False),
    ((65, 2, 8, 8), NCHW, torch.float32, True, False),
    ((2, 3, 5, 5), NCHW, torch.float32, False, True),
    ((40, 2, 5, 5), NCHW, torch.float32, False, False),
    ((3, 2, 4, 4), NCHW, torch.bfloat16, True, True),
    ((2, 8, 3, 3), NHWC, torch.float32, True, True),
    ((4, 8, 12, 12), NHWC, torch.float32, True, False),
    ((2, 3, 3, 3), NHWC, torch.float32, False, True),
    ((2, 3, 12, 12), NHWC, torch.float32, False, False),
    ((2, 16, 3, 3), NHWC, torch.bfloat16, True, True),
    ((2, 2048, 2, 2), NHWC, torch.float32, True, True),  # many channels: 16 tiles of 128
    ((3, 2048, 4, 4), NHWC, torch.float32, True, False),
    # More channels than grid.y holds; S == 1 makes rows of C (513 tiles on grid.x).
    ((2, 65552, 1, 1), NCHW, torch.float32, True, True),
]


def _vector(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def _launch_arguments(shape, layout, dtype):
    """(channels_inner, batch, vectors, rows) as the host code passes them."""
    batch, channels = shape[0], shape[1]
    spatial = shape[2] * shape[3]
    vec = _vector(dtype)
    if layout == NHWC or spatial == 1:
        vectorized = channels % vec == 0
        channel_vectors = channels // vec if vectorized else channels
        return 1, batch, channel_vectors, batch * spatial
    vectorized = spatial % vec == 0
    return 0, batch, spatial // vec if vectorized else spatial, batch


@pytest.fixture(scope="module")
def one_pass_fits(tmp_path_factory):
    args = [THREADS, UNROLL, SEGMENT_PASSES] + [v for shape, layout, dtype, _, _ in CASES
                                                for v in _launch_arguments(shape, layout, dtype)]
    output = run_host_program(tmp_path_factory, "passes", PROGRAM, args).split()
    return [line == "1" for line in output]


def test_the_cases_cover_every_class(one_pass_fits):
    """Each case falls into the class it names, and every (layout, vector,
    one pass) class has a case."""
    classes = set()
    for (shape, layout, dtype, vectorized, one_pass), fits in zip(CASES, one_pass_fits):
        assert fits == one_pass, f"{shape} {layout} {dtype}: one pass is {fits}, the case says {one_pass}"
        inner = layout == NHWC or shape[2] * shape[3] == 1
        run = shape[1] if inner else shape[2] * shape[3]
        assert (run % _vector(dtype) == 0) == vectorized, (shape, layout, dtype)
        classes.add((inner, vectorized, one_pass))
    assert len(classes) == 8, sorted(classes)


def _torch_float64(x, z, weight, bias, running_mean, running_var, grad):
    leaves = [t.detach().double().requires_grad_() for t in (x, z, weight, bias)]
    rm, rv = running_mean.double().clone(), running_var.double().clone()
    y = torch.relu(F.batch_norm(leaves[0], rm, rv, leaves[2], leaves[3], True, 0.1, 1e-5) + leaves[1])
    return (y, *torch.autograd.grad(y, leaves, grad.double()), rm, rv)


TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2)}


@needs_cuda_backend
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{'nhwc' if c[1] == NHWC else 'nchw'}-"
                         f"{str(c[2])[6:]}-{'vec' if c[3] else 'scalar'}-{'one' if c[4] else 'two'}")
def test_forward_and_backward_match_torch_in_every_class(case):
    """relu(bn(x) + z) in training against torch in float64 (output, running
    statistics and the four gradients), and the same bits on a second run."""
    shape, layout, dtype, _, _ = case
    gen = torch.Generator().manual_seed(shape[0] * 131 + shape[1] + shape[2])
    channels = shape[1]
    view = (1, channels, 1, 1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if shape[0] * shape[2] * shape[3] == 2:  # two values a channel: keep them apart (a tiny variance amplifies
        x[1] = x[0] + x[1].sign() * (1 + x[1].abs())  # float32 rounding beyond any fixed tolerance)
    x = (x + torch.randn(view, generator=gen, dtype=torch.float64) * 5).to(dtype).to(CUDA_DEVICE)
    x = x.contiguous(memory_format=layout)
    z = torch.randn(shape, generator=gen).to(dtype).to(CUDA_DEVICE).contiguous(memory_format=layout)
    grad = torch.randn(shape, generator=gen).to(dtype).to(CUDA_DEVICE).contiguous(memory_format=layout)
    weight = torch.randn(channels, generator=gen).to(CUDA_DEVICE)
    bias = torch.randn(channels, generator=gen).to(CUDA_DEVICE)
    running_mean, running_var = torch.zeros(channels, device=CUDA_DEVICE), torch.ones(channels, device=CUDA_DEVICE)
    expected = _torch_float64(x, z, weight, bias, running_mean, running_var, grad)
    runs = []
    with regops.use_backend("cuda"):
        for _ in range(2 if x.numel() < 100_000 else 1):  # the second run: the same bits
            rm, rv = running_mean.clone(), running_var.clone()
            leaves = [x.clone().requires_grad_(), z.clone().requires_grad_(), weight.clone().requires_grad_(),
                      bias.clone().requires_grad_()]
            y = regops.batch_norm(leaves[0], rm, rv, leaves[2], leaves[3], True, 0.1, 1e-5, activation="relu",
                                  residual=leaves[1])
            runs.append((y, *torch.autograd.grad(y, leaves, grad), rm, rv))
    atol, rtol = TOLERANCES[dtype]
    count = x.numel() // channels
    names = ("output", "grad_input", "grad_residual", "grad_weight", "grad_bias", "running_mean", "running_var")
    scales = (1, 4, 1, count ** 0.5, count ** 0.5, 1, 1)
    for name, got, want, scale in zip(names, runs[0], expected, scales):
        tolerance = TOLERANCES[torch.float32] if name.startswith("running") else (atol, rtol)
        torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=tolerance[0] * scale, rtol=tolerance[1],
                                   msg=lambda m, name=name: f"{name} {case}: {m}")
    assert runs[0][0].is_contiguous(memory_format=layout)
    for name, first, second in zip(names, runs[0], runs[-1]):
        assert torch.equal(first, second), f"{name} {case}: two runs differ"
