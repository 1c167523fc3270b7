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

import dataclasses
import os
import statistics
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (DTYPES, Row, TORCH_PROVIDERS, argument_parser, copy_bandwidth, emit, fill_ratios,
                               row_cells, run_metadata, saved_bytes_per_element, time_fn)

import regops
from regops import reference

P = 0.1
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
    # Every torch.compile here compiles the code of _torch_fn's fn: one entry
    # per (norm, dtype, grad mode, static or dynamic shape), more than dynamo's
    # default limit of 8, above which it would silently run fn eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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


def interleaved(device: torch.device, shapes, dtypes, norms, rounds: int) -> tuple[list[Row], dict]:
    """The sweep run ``rounds`` times (so every provider's samples are spread
    over the whole run, interleaved with the others'): each row's median ms
    over the rounds, and per row the (min, max) ms and the (min, max) of the
    per-round ratio torch eager ms / this ms."""
    per_round = [run(device, shapes, dtypes, norms) for _ in range(rounds)]
    copy_gbps = copy_bandwidth(device)
    merged, spread = [], {}
    for group in zip(*per_round):
        samples = sorted(r.ms for r in group)
        row = dataclasses.replace(group[0], ms=statistics.median(samples), ratio_to_best_torch=None).finish(copy_gbps)
        merged.append(row)
        spread[_key(row)] = {"ms": (samples[0], samples[-1]), "vs_torch": []}
    for round_rows in per_round:
        eager = {_key(r)[:4]: r.ms for r in round_rows if r.provider == "torch"}
        for r in round_rows:
            if _key(r)[:4] in eager:
                spread[_key(r)]["vs_torch"].append(eager[_key(r)[:4]] / r.ms)
    fill_ratios(merged, TORCH_PROVIDERS)
    return merged, spread


def _key(row: Row) -> tuple:
    return row.op, row.case, row.size, row.dtype, row.provider


def spread_table(rows: list[Row], spread: dict, rounds: int) -> str:
    """Medians over the rounds with their spread, and the ratio to torch eager."""
    eager = {_key(r)[:4]: r.ms for r in rows if r.provider == "torch"}
    lines = [f"| case | size | dtype | provider | median ms ({rounds} rounds) | min-max ms | GB/s | % copy BW | "
             "vs torch eager (medians) | vs torch eager (per round, min-max) | vs best torch | saved B/elem |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        low, high = spread[_key(r)]["ms"]
        ratios = spread[_key(r)]["vs_torch"]
        vs_eager = f"{eager[_key(r)[:4]] / r.ms:.2f}x" if _key(r)[:4] in eager else "-"
        per_round = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"
        pct, best, saved = row_cells(r)
        lines.append(f"| {r.case} | {r.size} | {r.dtype} | {r.provider} | {r.ms:.3f} | {low:.3f}-{high:.3f} | "
                     f"{r.gbps:.1f} | {pct} | {vs_eager} | {per_round} | {best} | {saved} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated rows x hidden, e.g. 4096x768,1024x16384")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--rounds", type=int, default=1, help="run the sweep this many times and report each "
                        "row's median and spread over the rounds")
    parser.add_argument("--table", default=None, help="with --rounds: also write the table of medians and spreads "
                        "to this markdown file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = default_shapes(device, args.quick)
    if args.rounds == 1:
        rows = run(device, shapes, args.dtypes.split(","), args.norms.split(","))
        emit(rows, "layer_norm", device, record=not args.no_record)
        return
    rows, spread = interleaved(device, shapes, args.dtypes.split(","), args.norms.split(","), args.rounds)
    emit(rows, "layer_norm", device, record=not args.no_record)
    meta = run_metadata(device)
    command = " ".join(["python benchmarks/bench_layer_norm.py"] + list(argv if argv is not None else sys.argv[1:]))
    text = (f"# dropout + add + LayerNorm / RMSNorm on {meta['device_name']}\n\n"
            f"torch {meta['torch']}, commit {meta.get('commit', '')}, copy bandwidth "
            f"{copy_bandwidth(device):.1f} GB/s, `{command}`"
            f"; p = {P}; bytes: the formulas of this script's docstring\n\n{spread_table(rows, spread, args.rounds)}\n")
    print("\n" + text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
