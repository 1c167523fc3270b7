"""The whole benchmark suite on the current device (`make bench`).

Measures the device's copy bandwidth first, then runs every op benchmark
(each module's suite(device, quick)), prints one markdown summary, appends
machine-readable rows to benchmarks/results/<op>.jsonl and draws one PNG per
op (GB/s against size, a line per provider).

  python benchmarks/run.py            # full sizes
  python benchmarks/run.py --quick    # tiny sizes: checks that the scripts work
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, Row, argument_parser, copy_bandwidth, device_name, emit, pyplot, save_figure

# Op benchmarks in the order they run; each module defines suite(device, quick).
SUITES = ["bench_dropout", "bench_batch_norm", "bench_layer_norm", "bench_optim", "mnist"]


def plot(rows: list[Row], op: str, path: str) -> None:
    plt = pyplot()
    cases = sorted({(r.case, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, (case, dtype) in zip(axes[0], cases):
        selected = [r for r in rows if (r.case, r.dtype) == (case, dtype)]
        for provider in sorted({r.provider for r in selected}):
            # Bytes moved per call, not the size label: labels differ per op
            # ("16M", "32x64x28x28", "resnet50 25.6M/161").
            points = sorted((r.bytes_moved, r.gbps) for r in selected if r.provider == provider)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes moved per call")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {case} {dtype}")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI runs this)")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--only", default=None, help="comma-separated suites, e.g. bench_dropout")
    parser.add_argument("--out", default=None, help="folder for the summary and plots (default: results folder)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_dir = args.out or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)

    bandwidth = copy_bandwidth(device)
    print(f"device: {device_name(device)}; copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    summary = [f"# regops benchmarks on {device_name(device)}\n",
               f"torch {torch.__version__}, copy bandwidth {bandwidth:.1f} GB/s, "
               f"`python benchmarks/run.py{' --quick' if args.quick else ''}`\n"]
    names = args.only.split(",") if args.only else SUITES
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"benchmarks.{name}":
                print(f"(no {name} benchmark in this tree)")
                continue
            raise
        if not hasattr(module, "suite"):
            continue
        start = time.perf_counter()
        rows = module.suite(device, args.quick)
        if not rows:
            continue
        op = rows[0].op
        table = emit(rows, op, device, record=not args.no_record,
                     command=f"python benchmarks/run.py{' --quick' if args.quick else ''}")
        summary += [f"\n## {op} ({time.perf_counter() - start:.0f} s)\n", table, ""]
        if not args.quick and any(r.gbps for r in rows):  # mnist rows time steps, they move no counted bytes
            plot(rows, op, os.path.join(out_dir, f"{op}-{device.type}.png"))
    if not args.no_record or args.out:
        with open(os.path.join(out_dir, f"summary-{device.type}.md"), "w") as f:
            f.write("\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
