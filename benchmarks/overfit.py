"""Why dropout exists, in one small picture: a wide MLP fits 20 noisy points
exactly and generalizes worse than the same net trained with dropout.

  python benchmarks/overfit.py [--seeds 5] [--out DIR]

Data: y = x + 0.3 * noise at 20 evenly spaced x in [-1, 1]; the test set is
the same x with a fresh draw of noise. Model: MLP 1-300-300-1 with ReLU,
trained 500 full-batch steps of Adam (lr 0.01) on the MSE; three runs from the
same initial weights: no dropout, Dropout(0.5) after each hidden layer with
torch.nn.Dropout, and the same model passed through regops.convert. Prints the
test MSE every 50 steps (recorded every 10) for the first seed, the final test
MSE of every seed, and draws the fitted curves and test-loss curves.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regops  # noqa: E402
from benchmarks.common import ROOT, argument_parser, pyplot, save_figure  # noqa: E402

POINTS, NOISE, STEPS, LR, HIDDEN, EVAL_EVERY = 20, 0.3, 500, 0.01, 300, 10
RUNS = ("no dropout", "torch Dropout(0.5)", "regops Dropout(0.5)")


def make_data(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, POINTS).unsqueeze(1)
    return {"x": x, "train_y": x + NOISE * torch.randn(x.shape, generator=generator),
            "test_y": x + NOISE * torch.randn(x.shape, generator=generator)}


def mlp(dropout: float) -> nn.Sequential:
    layers = [nn.Linear(1, HIDDEN), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(HIDDEN, HIDDEN), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(HIDDEN, 1))
    return nn.Sequential(*layers)


def models(seed: int) -> dict[str, nn.Module]:
    """The three nets, with the same initial weights (the Linear layers are
    created in the same order under the same seed)."""
    torch.manual_seed(seed)
    plain = mlp(0.0)
    torch.manual_seed(seed)
    with_dropout = mlp(0.5)
    return {RUNS[0]: plain, RUNS[1]: with_dropout, RUNS[2]: regops.convert(copy.deepcopy(with_dropout))}


def train(model: nn.Module, data: dict, seed: int) -> list[float]:
    """Test MSE before training and every EVAL_EVERY steps."""
    torch.manual_seed(seed)  # dropout's randomness
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    test_mse = []
    for step in range(STEPS + 1):
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                test_mse.append(float(nn.functional.mse_loss(model(data["x"]), data["test_y"])))
            model.train()
        if step == STEPS:
            break
        loss = nn.functional.mse_loss(model(data["x"]), data["train_y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return test_mse


def plot(curves: dict, fitted: dict, data: dict, path: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.scatter(data["x"], data["train_y"], color="black", label="train points", zorder=3)
    left.scatter(data["x"], data["test_y"], color="grey", marker="x", label="test points", zorder=3)
    grid = torch.linspace(-1, 1, 200)
    for name, values in fitted.items():
        left.plot(grid, values, label=name, linestyle="--" if name.startswith("regops") else "-")
    left.plot(grid, grid, color="black", linewidth=0.5, label="y = x")
    left.set(title="fitted curves after 500 steps", xlabel="x", ylabel="y")
    for name, values in curves.items():
        right.plot(range(0, STEPS + 1, EVAL_EVERY), values, label=name,
                   linestyle="--" if name.startswith("regops") else "-")
    right.axhline(NOISE ** 2, color="black", linewidth=0.5, label="noise variance")
    right.set(title="test MSE", xlabel="step", yscale="log")
    left.legend(fontsize=7), right.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="repetitions with fresh data and weights")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "overfit"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

    final: dict[str, list[float]] = {name: [] for name in RUNS}
    first_curves, fitted = {}, {}
    for seed in range(args.seeds):
        data = make_data(seed)
        for name, model in models(seed).items():
            curve = train(model, data, seed)
            final[name].append(curve[-1])
            if seed == 0:
                first_curves[name] = curve
                model.eval()
                with torch.no_grad():
                    fitted[name] = model(torch.linspace(-1, 1, 200).unsqueeze(1)).squeeze(1)

    print(f"MLP 1-{HIDDEN}-{HIDDEN}-1, {POINTS} points y = x + {NOISE} * noise, Adam lr {LR}, {STEPS} steps\n")
    print("test MSE of seed 0 (recorded every 10 steps):\n")
    print("| step | " + " | ".join(RUNS) + " |\n|---:|" + "---:|" * len(RUNS))
    for index in range(0, STEPS // EVAL_EVERY + 1, 50 // EVAL_EVERY):
        print(f"| {index * EVAL_EVERY} | " + " | ".join(f"{first_curves[n][index]:.4f}" for n in RUNS) + " |")
    print(f"\nfinal test MSE over {args.seeds} seeds (noise variance {NOISE ** 2:.2f}):\n")
    print("| run | mean | min | max |\n|---|---:|---:|---:|")
    for name in RUNS:
        values = final[name]
        print(f"| {name} | {statistics.fmean(values):.4f} | {min(values):.4f} | {max(values):.4f} |")
    for name in RUNS[1:]:
        wins = sum(d < p for d, p in zip(final[name], final[RUNS[0]]))
        print(f"{name} ends below no dropout in {wins} of {args.seeds} seeds")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overfit.json"), "w") as f:
        json.dump({"final_test_mse": final, "test_mse_seed0": first_curves, "eval_every": EVAL_EVERY}, f, indent=1)
    plot(first_curves, fitted, make_data(0), os.path.join(args.out, "overfit.png"))
    print(f"\nwrote {os.path.join(args.out, 'overfit.json')} and {os.path.join(args.out, 'overfit.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
