"""Tensors of more than 2^31 elements on the CPU: every index, byte offset and
Philox counter must be computed in 64 bits. A 32-bit index would wrap and
write the wrong element (or out of bounds), so the samples are taken near
2^31 and past it, and compared with the reference rule recomputed for just
those indices.

Marked slow (4 GiB tensors, about a minute here); `pytest -m slow` runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import regops
from regops import reference

pytestmark = pytest.mark.slow

# The CPU kernels everywhere; the CUDA kernels where there is a GPU (the
# results come back to the host to be checked).
BACKEND_DEVICES = [("cpu", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available()
                                      and "cuda" in regops.available_backends() else [])

HUGE = 2**31 + 17  # past the int32 range, and not a multiple of 4, 8 or 128
_MASK32 = 0xFFFFFFFF


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _needs_memory(gib: float):
    if _available_bytes() < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free memory, {_available_bytes() / 2**30:.1f} GiB available")


def sample_indices(numel: int, count: int = 4000, seed: int = 0) -> torch.Tensor:
    """Both ends, both sides of 2^31 and 2^32 / 4 counters, and random indices."""
    edges = [0, 1, 7, 8, 127, 128, 2**31 - 129, 2**31 - 8, 2**31 - 1, 2**31, 2**31 + 1, 2**31 + 8, numel - 17,
             numel - 9, numel - 2, numel - 1]
    random = torch.randint(0, numel, (count,), generator=torch.Generator().manual_seed(seed))
    indices = torch.cat([torch.tensor([i for i in edges if 0 <= i < numel]), random])
    return indices.unique()


def keep_at(indices: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """The dropout random rule (reference.dropout_keep) for chosen flat
    indices only: element i takes word i % 4 of Philox at counter offset + i // 4."""
    seed %= 2**64
    counters = offset + indices // 4
    zeros = torch.zeros_like(counters)
    words = torch.stack(reference.philox4x32_10([counters & _MASK32, counters >> 32, zeros, zeros],
                                                (seed & _MASK32, seed >> 32)), dim=1)
    word = words.gather(1, (indices % 4).unsqueeze(1)).squeeze(1)
    return word >= reference.dropout_threshold(p)


def patterned(numel: int, dtype: torch.dtype, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """A huge tensor of ones with random values at the sampled indices."""
    x = torch.ones(numel, dtype=dtype)
    x[indices] = torch.randn(indices.numel(), generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_dropout_past_2_31_elements(dtype, backend, device):
    _needs_memory(10)
    p, seed, offset = 0.3, 0x5EED_0F_D00D, (1 << 32) - 5
    indices = sample_indices(HUGE)
    x = patterned(HUGE, dtype, indices, seed=1)
    with regops.use_backend(backend):
        y, mask = regops.dropout_with_mask(x.to(device), p, seed=seed, offset=offset)
    y, mask = y.cpu(), mask.cpu()
    assert y.numel() == HUGE and mask.numel() == reference.mask_bytes(HUGE)
    keep = keep_at(indices, p, seed, offset)
    assert torch.equal(y[indices], reference.dropout_apply(x[indices], keep, p))
    # The mask bits of the sampled elements, and the zero padding past the end.
    bits = (mask[indices // 8].to(torch.int64) >> (indices % 8)) & 1
    assert torch.equal(bits.bool(), keep)
    assert (mask[(HUGE + 7) // 8:] == 0).all()
    assert mask[HUGE // 8].item() >> (HUGE % 8) == 0
    # Every element is written: the ones became 1 / (1 - p) or +0, so outside
    # the samples nothing else may appear (a wrapped index would leave ones or
    # garbage). Counted on the bit patterns with numpy, in chunks that bound
    # the temporaries (torch's elementwise compare and bool sum take minutes
    # over 2^31 elements here).
    scale = reference.dropout_apply(torch.ones(1, dtype=dtype), torch.ones(1, dtype=torch.bool), p)
    scale_bits = int(scale.view(torch.int16))
    odd = 0
    for chunk in y.view(torch.int16).split(1 << 24):
        bits = chunk.numpy()
        odd += np.count_nonzero(bits) - np.count_nonzero(bits == scale_bits)
    assert odd <= indices.numel()
    samples = x[indices].clone()
    del x

    # The backward reads the same mask: grad = y itself.
    with regops.use_backend(backend):
        grad_input = regops.dropout_backward(y.to(device), mask.to(device), p).cpu()
    assert torch.equal(grad_input[indices], reference.dropout_apply(y[indices], keep, p))
    del grad_input

    # In place, with no mask stored: applied a second time to y.
    y_on_device = y.to(device)
    with regops.use_backend(backend):
        out = regops.dropout(y_on_device, p, inplace=True, seed=seed, offset=offset)
    assert out is y_on_device
    y = out.cpu()
    twice = reference.dropout_apply(reference.dropout_apply(samples, keep, p), keep, p)
    assert torch.equal(y[indices], twice)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_batch_norm_past_2_31_elements(backend, device):
    """(N=2, C=1, L=2^30 + 9): one channel of 2^31 + 18 values, so the
    element count per channel and every index past the first image exceed
    int32. Statistics against float64 sums taken in chunks, a sample of the
    output against the normalization formula."""
    if not hasattr(regops, "batch_norm"):
        pytest.skip("regops.batch_norm is not in this build")
    _needs_memory(10)
    length = 2**30 + 9
    # A random tile repeated (cheap to build), with a different tail per image.
    tile = torch.randn(4096, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    x = torch.empty(2, 1, length, dtype=torch.bfloat16)
    for n in range(2):
        flat = x[n, 0]
        whole = length // 4096 * 4096
        flat[:whole].view(-1, 4096).copy_(tile * (n + 1))
        flat[whole:] = 5.0 * (n + 1)
    total, total_sq, count = 0.0, 0.0, x.numel()
    for chunk in x.view(-1).split(1 << 27):
        c = chunk.double()
        total += c.sum().item()
        total_sq += c.square().sum().item()
    mean = total / count
    var = total_sq / count - mean * mean
    running_mean, running_var = torch.zeros(1, device=device), torch.ones(1, device=device)
    with regops.use_backend(backend):
        y = regops.batch_norm(x.to(device), running_mean, running_var, None, None, True, 1.0, 1e-5).cpu()
    running_mean, running_var = running_mean.cpu(), running_var.cpu()
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(running_mean.double(), torch.tensor([mean], dtype=torch.float64), atol=1e-4, rtol=1e-4)
    unbiased = var * count / (count - 1)
    torch.testing.assert_close(running_var.double(), torch.tensor([unbiased], dtype=torch.float64), atol=1e-4,
                               rtol=1e-4)
    indices = sample_indices(x.numel())
    flat_x, flat_y = x.view(-1)[indices].double(), y.view(-1)[indices].double()
    expected = (flat_x - mean) / (var + 1e-5) ** 0.5
    # bfloat16 output: 2^-8 relative, plus the float32 statistics.
    torch.testing.assert_close(flat_y, expected, atol=2e-2, rtol=1e-2)
