"""Dropout + residual add + LayerNorm / RMSNorm benchmark: forward, backward
and forward+backward.

Providers: regops (the backends this machine offers; "-recompute" is the
first one with recompute_mask=True), torch eager (F.dropout, the add and
F.layer_norm / F.rms_norm as separate ops) and torch.compile of the same
function.

Bytes moved, one minimal formula for every provider (rows x hidden = n
elements of e bytes; the weight, bias and 8 bytes of statistics per row are
left out):
  forward           read x and the residual, write y and the 1-bit mask: n * (3e + 1/8)
  backward          read dy, h and the mask, write dx and dresidual:     n * (4e + 1/8)
  forward+backward  the sum of both:                                      n * (7e + 1/4)
Saved bytes per element: what autograd keeps for the backward, measured with
saved-tensor hooks (torch keeps the byte mask and h; regops h and a bit, or h
alone with recompute_mask=True).

Every provider is checked before it is timed: regops against torch's composite
with the same mask, torch's composite for a plausible share of kept elements.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Row, copy_bandwidth, emit, fill_ratios, saved_bytes_per_element, time_fn

import regops
from regops import reference

P = 0.1
TORCH_PROVIDERS = ("torch", "torch.compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORMS = ("layer_norm", "rms_norm")


def _regops_providers(device: torch.device) -> list[tuple[str, str, bool]]:
    """(provider name, backend, recompute_mask)."""
    available = regops.available_backends()
    names = [b for b in ("cuda", "triton") if b in available] if device.type == "cuda" else ["cpu"]
    return [(f"regops-{b}", b, False) for b in names] + [(f"regops-{names[0]}-recompute", names[0], True)]


def _regops_fn(norm: str, recompute: bool):
    def fn(x, residual, weight, bias, **kwargs):
        if norm == "rms_norm":
            return regops.dropout_add_rms_norm(x, residual, weight, P, 1e-5, recompute_mask=recompute, **kwargs)
        return regops.dropout_add_layer_norm(x, residual, weight, bias, P, 1e-5, recompute_mask=recompute, **kwargs)
    return fn


def _torch_fn(norm: str):
    def fn(x, residual, weight, bias):
        h = F.dropout(x, P, training=True) + residual
        if norm == "rms_norm":
            return F.rms_norm(h, (h.shape[-1],), weight, 1e-5)
        return F.layer_norm(h, (h.shape[-1],), weight, bias, 1e-5)
    return fn


def _check_regops(norm, backend, x, residual, weight, bias) -> None:
    with regops.use_backend(backend):
        out, mask = _regops_fn(norm, False)(x, residual, weight, bias, return_dropout_mask=True, seed=5)
    keep = regops.unpack_mask(mask, x.shape)
    h = reference.dropout_apply(x, keep, P).float() + residual.float()
    if norm == "rms_norm":
        expected = F.rms_norm(h, (h.shape[-1],), weight.float(), 1e-5)
    else:
        expected = F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), 1e-5)
    tolerance = 1e-4 if x.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def run(device: torch.device, shapes: list[tuple[int, int]], dtypes: list[str], norms=NORMS,
        cases=("forward", "backward", "forward+backward")) -> list[Row]:
    device = torch.device(device)
    copy_gbps = copy_bandwidth(device)
    rows: list[Row] = []
    for norm in norms:
        compiled = torch.compile(_torch_fn(norm))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            e = torch.finfo(dtype).bits // 8
            for n_rows, hidden in shapes:
                n = n_rows * hidden
                x = torch.randn(n_rows, hidden, device=device, dtype=dtype)
                residual = torch.randn_like(x)
                weight = torch.randn(hidden, device=device, dtype=dtype)
                bias = torch.randn(hidden, device=device, dtype=dtype)
                grad = torch.randn_like(x)
                leaves = [t.clone().requires_grad_(True) for t in (x, residual, weight, bias)]
                bytes_for = {"forward": n * (3 * e + 0.125), "backward": n * (4 * e + 0.125),
                             "forward+backward": n * (7 * e + 0.25)}

                def add(case, provider, fn, saved=None):
                    ms = time_fn(fn, device)
                    rows.append(Row("layer_norm", case, f"{norm} {n_rows}x{hidden}", dtype_name, provider, ms,
                                    bytes_for[case], device=device.type, saved_bytes_per_element=saved)
                                .finish(copy_gbps))

                def measure(provider, fn):
                    if "forward" in cases:
                        add("forward", provider, lambda: fn(x, residual, weight, bias))
                    # A compiled backward donates its buffers: it cannot be replayed on one graph.
                    if "backward" in cases and provider != "torch.compile":
                        out = fn(*leaves)
                        add("backward", provider, lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True))
                        del out
                    if "forward+backward" in cases:
                        def step():
                            torch.autograd.grad(fn(*leaves), leaves, grad, allow_unused=True)
                        saved = saved_bytes_per_element(lambda: fn(*leaves), n, exclude=tuple(leaves))
                        add("forward+backward", provider, step, saved)

                for provider, backend, recompute in _regops_providers(device):
                    _check_regops(norm, backend, x, residual, weight, bias)
                    with regops.use_backend(backend):
                        measure(provider, _regops_fn(norm, recompute))
                for provider, fn in (("torch", _torch_fn(norm)), ("torch.compile", compiled)):
                    kept = (F.dropout(torch.ones(n, device=device), P) != 0).float().mean().item()
                    if abs(kept - (1 - P)) > 0.05:
                        raise AssertionError(f"{provider} dropout kept {kept:.3f} of the elements")
                    measure(provider, fn)
                del x, residual, grad, leaves
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    fill_ratios(rows, TORCH_PROVIDERS)
    return rows


GPU_SHAPES = [(4096, 768), (8192, 1024), (4096, 4096), (2048, 8192), (1024, 16384)]
CPU_SHAPES = [(1024, 768), (512, 1024), (128, 4096), (32, 16384)]


def default_shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(64, 96)]
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def suite(device: torch.device, quick: bool) -> list[Row]:
    """The default sweep, for benchmarks/run.py."""
    return run(device, default_shapes(device, quick), ["float32"] if quick else ["float32", "bfloat16"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated rows x hidden, e.g. 4096x768,1024x16384")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = default_shapes(device, args.quick)
    rows = run(device, shapes, args.dtypes.split(","), args.norms.split(","))
    emit(rows, "layer_norm", device, record=not args.no_record)


if __name__ == "__main__":
    main()
