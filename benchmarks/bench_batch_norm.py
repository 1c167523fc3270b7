"""Batch-norm benchmark: training forward, backward and forward+backward, NCHW
and channels_last (NHWC), on ResNet-like shapes.

Providers: regops (the backends this machine offers: cpu, or cuda and
triton), torch eager (torch.nn.functional.batch_norm: cuDNN or the native
kernels, whichever torch picks) and torch.compile of the same function.

Bytes moved, the same minimal formula for every provider (n elements of e
bytes; read x once per pass the algorithm needs, write the output once):
  forward           statistics pass reads x, normalize reads x, writes y: 3 e n
  backward          reduction reads dy and x; elementwise reads dy, x, writes dx: 5 e n
  forward+backward  the sum of both:                                    8 e n

Every provider is checked against float64 torch before it is timed.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (DTYPES, Row, TORCH_PROVIDERS, argument_parser, copy_bandwidth, emit, fill_ratios,
                               format_size, time_fn)

import regops
from regops._backend import resolve_op

EPS = 1e-5
MOMENTUM = 0.1
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
CASES = ("forward", "backward", "forward+backward")
PASS_BYTES = {"forward": 3, "backward": 5, "forward+backward": 8}  # times e * n
# (dtype, atol, rtol) of the check against float64 torch.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2), torch.float16: (8e-3, 8e-3)}


def _regops_backends(device: torch.device) -> list[str]:
    available = regops.available_backends()
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if b in available]
    return ["cpu"]


def _torch_batch_norm(x, running_mean, running_var, weight, bias):
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)


def _regops_batch_norm(x, running_mean, running_var, weight, bias):
    return regops.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)


def _inputs(shape, dtype, layout, device):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    channels = shape[1]
    weight = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    return x, dy, weight, bias


def _check(name, fn, x, dy, weight, bias):
    """fn(x, running_mean, running_var, weight, bias) against float64 torch:
    output, grad_input, grad_weight, grad_bias and running statistics."""
    atol, rtol = TOLERANCE[x.dtype]
    channels = x.shape[1]
    stats = [torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)]
    ref_stats = [s.double() for s in stats]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], stats[0], stats[1], leaves[1], leaves[2])
    ref = _torch_batch_norm(ref_leaves[0], ref_stats[0], ref_stats[1], ref_leaves[1], ref_leaves[2])
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    count = x.numel() // channels
    checks = [("output", y, ref, 1.0), ("grad_input", grads[0], ref_grads[0], 4.0),
              ("grad_weight", grads[1], ref_grads[1], count ** 0.5), ("grad_bias", grads[2], ref_grads[2], count ** 0.5),
              ("running_mean", stats[0], ref_stats[0], 1.0), ("running_var", stats[1], ref_stats[1], 1.0)]
    for what, actual, expected, scale in checks:
        try:
            torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol)
        except AssertionError as error:
            raise AssertionError(f"{name} batch_norm {what} differs from torch for {tuple(x.shape)} {x.dtype}: "
                                 f"{error}") from None


def run(device: torch.device, shapes: list[tuple[int, ...]], dtypes: list[str], layouts: list[str],
        cases=CASES) -> list[Row]:
    device = torch.device(device)
    copy_gbps = copy_bandwidth(device)
    rows: list[Row] = []
    compiled = torch.compile(_torch_batch_norm)
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            e = torch.finfo(dtype).bits // 8
            numel = 1
            for size in shape:
                numel *= size
            for layout_name in layouts:
                x, dy, weight, bias = _inputs(shape, dtype, LAYOUTS[layout_name], device)
                channels = shape[1]
                running_mean = torch.zeros(channels, device=device)
                running_var = torch.ones(channels, device=device)
                x_leaf = x.clone().requires_grad_()
                w_leaf, b_leaf = weight.clone().requires_grad_(), bias.clone().requires_grad_()
                shape_text = "x".join(map(str, shape))

                def add(case, provider, fn):
                    ms = time_fn(fn, device)
                    rows.append(Row("batch_norm", f"{case} {layout_name}", format_size(numel), dtype_name, provider, ms,
                                    PASS_BYTES[case] * e * numel, device=device.type, note=shape_text).finish(copy_gbps))

                def fwd_bwd(fn):
                    def step():
                        y = fn(x_leaf, running_mean, running_var, w_leaf, b_leaf)
                        torch.autograd.grad(y, (x_leaf, w_leaf, b_leaf), dy)
                    return step

                for backend in _regops_backends(device):
                    provider = f"regops-{backend}"
                    with regops.use_backend(backend):
                        _check(provider, _regops_batch_norm, x, dy, weight, bias)
                        forward = resolve_op(backend, "batch_norm_forward", x.device.type)
                        backward = resolve_op(backend, "batch_norm_backward", x.device.type)
                        if "forward" in cases:
                            add("forward", provider, lambda: _regops_batch_norm(x, running_mean, running_var, weight, bias))
                        if "backward" in cases:
                            _, mean, invstd, _ = forward(x, weight, bias, None, None, True, EPS, False)
                            add("backward", provider, lambda: backward(dy, x, weight, bias, mean, invstd, True, False))
                        if "forward+backward" in cases:
                            add("forward+backward", provider, fwd_bwd(_regops_batch_norm))

                for provider, fn in (("torch", _torch_batch_norm), ("torch.compile", compiled)):
                    _check(provider, fn, x, dy, weight, bias)
                    if "forward" in cases:
                        add("forward", provider, lambda fn=fn: fn(x, running_mean, running_var, weight, bias))
                    if "backward" in cases and provider == "torch":
                        _, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                                           True, MOMENTUM, EPS)
                        add("backward", provider, lambda: torch.ops.aten.native_batch_norm_backward(
                            dy, x, weight, running_mean, running_var, mean, invstd, True, EPS, [True, True, True]))
                    if "forward+backward" in cases:
                        add("forward+backward", provider, fwd_bwd(fn))
                del x, dy, x_leaf
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    fill_ratios(rows, TORCH_PROVIDERS)
    return rows


def default_shapes(device: torch.device, quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(4, 8, 8, 8)]
    if device.type == "cuda":
        # ResNet-50 stages at batch 256 (distinct element counts, one per stage).
        return [(256, 64, 56, 56), (256, 128, 28, 28), (256, 256, 14, 14), (256, 512, 7, 7)]
    return [(32, 64, 28, 28)]


def suite(device: torch.device, quick: bool) -> list[Row]:
    """The default sweep, for benchmarks/run.py."""
    device = torch.device(device)
    dtypes = ["float32"] if quick else ["float32", "bfloat16"]
    return run(device, default_shapes(device, quick), dtypes, list(LAYOUTS))


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.lower().split("x"))


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated NxCxHxW shapes, e.g. 32x64x28x28,32x128x14x14")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true", help="a tiny shape, to check the script runs")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); on a shared machine 1 gives steadier times")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [_parse_shape(s) for s in args.shapes.split(",")] if args.shapes else default_shapes(device, args.quick)
    rows = run(device, shapes, args.dtypes.split(","), args.layouts.split(","), tuple(args.cases.split(",")))
    emit(rows, "batch_norm", device, record=not args.no_record)


if __name__ == "__main__":
    main()
