"""Dropout benchmark: forward, backward and forward+backward.

Providers: regops (the backends this machine offers; "regops-recompute" is
the cuda/cpu backend with recompute_mask=True), torch eager
(torch.nn.functional.dropout) and torch.compile of the same function.

Bytes moved, the same minimal formula for every provider (element size e):
  forward           read x, write y, write the 1-bit mask: n * (2e + 1/8)
  backward          read grad, read the mask, write grad_x: n * (2e + 1/8)
  forward+backward  the sum of both:                        n * (4e + 1/4)
Saved bytes per element: what autograd keeps for the backward, measured with
saved-tensor hooks (torch keeps a bool mask; regops a bit, or nothing).

Every provider is checked before it is timed: regops outputs must equal
x * keep * scale for the mask it returned, torch's must keep a plausible share.
"""

from __future__ import annotations

import math
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (DTYPES, Row, TORCH_PROVIDERS, argument_parser, copy_bandwidth, emit, fill_ratios,
                               format_size, parse_size, saved_bytes_per_element, time_fn)

import regops
from regops import reference

P = 0.5


def _regops_providers(device: torch.device) -> list[tuple[str, str, bool]]:
    """(provider name, backend, recompute_mask)."""
    available = regops.available_backends()
    if device.type == "cuda":
        names = [b for b in ("cuda", "triton") if b in available]
    else:
        names = ["cpu"]
    providers = [(f"regops-{b}", b, False) for b in names]
    providers.append((f"regops-{names[0]}-recompute", names[0], True))
    return providers


def _check_regops(x: torch.Tensor, backend: str) -> None:
    with regops.use_backend(backend):
        y, mask = regops.dropout_with_mask(x, P, seed=1234)
        keep = regops.unpack_mask(mask, like=x)
        expected = reference.dropout_apply(x, keep, P)
        if not torch.equal(y, expected):
            raise AssertionError(f"regops-{backend} dropout output differs from x * keep * scale")
        grad = torch.randn_like(x)
        if not torch.equal(regops.dropout_backward(grad, mask, P), reference.dropout_apply(grad, keep, P)):
            raise AssertionError(f"regops-{backend} dropout backward differs from grad * keep * scale")
        kept = keep.float().mean().item()
    _check_share(kept, x.numel(), f"regops-{backend}")


def _check_share(kept: float, n: int, who: str) -> None:
    bound = 6 * math.sqrt(P * (1 - P) / n) + 1e-9
    if abs(kept - (1 - P)) > bound:
        raise AssertionError(f"{who} kept {kept:.5f} of the elements, expected {1 - P} +- {bound:.5f}")


def _torch_dropout(x):
    return torch.nn.functional.dropout(x, P, training=True)


def run(device: torch.device, sizes: list[int], dtypes: list[str], *, cases=("forward", "backward", "forward+backward")):
    device = torch.device(device)
    copy_gbps = copy_bandwidth(device)
    rows: list[Row] = []
    compiled = torch.compile(_torch_dropout)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        e = torch.finfo(dtype).bits // 8
        for n in sizes:
            x = torch.randn(n, device=device, dtype=dtype)
            grad = torch.randn_like(x)
            x_leaf = x.clone().requires_grad_(True)
            bytes_for = {"forward": n * (2 * e + 0.125), "backward": n * (2 * e + 0.125),
                         "forward+backward": n * (4 * e + 0.25)}

            def add(case, provider, fn, saved=None):
                ms = time_fn(fn, device)
                rows.append(Row("dropout", case, format_size(n), dtype_name, provider, ms, bytes_for[case],
                                device=device.type, saved_bytes_per_element=saved).finish(copy_gbps))

            for provider, backend, recompute in _regops_providers(device):
                _check_regops(x, backend)
                with regops.use_backend(backend):
                    if not recompute and "forward" in cases:
                        add("forward", provider, lambda: regops.dropout_with_mask(x, P))
                    if not recompute and "backward" in cases:
                        _, mask = regops.dropout_with_mask(x, P)
                        add("backward", provider, lambda: regops.dropout_backward(grad, mask, P))
                    if "forward+backward" in cases:
                        def step():
                            y = regops.dropout(x_leaf, P, recompute_mask=recompute)
                            torch.autograd.grad(y, x_leaf, grad)
                        saved = saved_bytes_per_element(lambda: regops.dropout(x_leaf, P, recompute_mask=recompute),
                                                        n, exclude=(x_leaf,))
                        add("forward+backward", provider, step, saved)

            for provider, fn in (("torch", _torch_dropout), ("torch.compile", compiled)):
                y = fn(x)
                _check_share((y != 0).float().mean().item(), n, provider)
                if "forward" in cases:
                    add("forward", provider, lambda: fn(x))
                if "backward" in cases and provider == "torch":
                    y, keep = torch.ops.aten.native_dropout(x, P, True)
                    add("backward", provider, lambda: torch.ops.aten.native_dropout_backward(grad, keep, 1 / (1 - P)))
                if "forward+backward" in cases:
                    def step(fn=fn):
                        y = fn(x_leaf)
                        torch.autograd.grad(y, x_leaf, grad)
                    saved = saved_bytes_per_element(lambda: fn(x_leaf), n, exclude=(x_leaf,))
                    add("forward+backward", provider, step, saved)
            del x, grad, x_leaf
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fill_ratios(rows, TORCH_PROVIDERS)
    return rows


def default_sizes(device: torch.device, quick: bool) -> list[int]:
    if quick:
        return [1 << 16]
    if device.type == "cuda":
        return [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]
    return [1 << 20, 1 << 22, 1 << 24]


def suite(device: torch.device, quick: bool) -> list[Row]:
    """The default sweep, for benchmarks/run.py."""
    return run(device, default_sizes(device, quick), ["float32"] if quick else ["float32", "bfloat16"])


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated element counts, e.g. 1M,16M")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else default_sizes(device, args.quick)
    rows = run(device, sizes, args.dtypes.split(","))
    emit(rows, "dropout", device, record=not args.no_record)


if __name__ == "__main__":
    main()
