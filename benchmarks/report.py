"""Regenerates the README's performance section from benchmarks/results/*.jsonl:
for each device and op, the latest recorded run, with its date, device,
versions and the exact command that produced it.

  python benchmarks/report.py          # rewrite README.md between the markers
  python benchmarks/report.py --print  # print the section instead
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
COLUMNS = [("case", "case"), ("size", "size"), ("dtype", "dtype"), ("provider", "provider"), ("ms", "median ms"),
           ("gbps", "GB/s"), ("pct_copy", "% copy BW"), ("ratio_to_best_torch", "vs best torch"),
           ("saved_bytes_per_element", "saved B/elem")]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "ms":
        return f"{value:.3f}"
    if key == "gbps":
        return f"{value:.1f}"
    if key == "pct_copy":
        return f"{value:.0f}%"
    if key == "ratio_to_best_torch":
        return f"{value:.2f}x"
    if key == "saved_bytes_per_element":
        return f"{value:.3g}"
    return str(value)


def latest_runs(results_dir: str) -> dict[tuple[str, str], list[dict]]:
    """(device name, op) -> the rows of the newest run."""
    runs: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    runs.setdefault((row["device_name"], row["op"]), {}).setdefault(row["date"], []).append(row)
    return {key: by_date[max(by_date)] for key, by_date in runs.items()}


def section(results_dir: str) -> str:
    latest = latest_runs(results_dir)
    if not latest:
        return "No benchmark results recorded yet: run `make bench`.\n"
    parts = []
    for (device, op), rows in sorted(latest.items()):
        meta = rows[0]
        parts.append(f"### {op} on {device}\n")
        parts.append(f"{meta['date'][:10]}, torch {meta['torch']}, commit {meta.get('commit') or '?'}, "
                     f"command: `{meta.get('command', '')}`\n")
        parts.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
        parts.append("|" + "---|" * len(COLUMNS))
        for row in rows:
            parts.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args(argv)
    text = section(args.results)
    if args.print:
        print(text)
        return 0
    with open(args.readme) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        print(f"README has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
