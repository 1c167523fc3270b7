"""regops under torch.distributed: what the optimizers need from DTensor
parameters (FSDP2's ``fully_shard``) and the process-group helpers the
synchronized batch norm shares.

Under DDP every rank holds whole parameters and all-reduced gradients, so the
optimizers need nothing. Under FSDP2 parameters, gradients and optimizer
states are DTensors sharded over a device mesh: the fused kernels update the
local shards (``local_tensor``), and gradient-norm clipping needs the norm of
the whole gradient, which ``grad_norm_squared`` completes with one all-reduce
per sharding layout.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from regops.ops.optim import multi_tensor_norm

if dist.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch build without distributed support has no DTensors either
    DTensor = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(process_group=None) -> int:
    """Ranks in ``process_group`` (the default group when None); 1 outside
    torch.distributed."""
    if not is_initialized():
        return 1
    return dist.get_world_size(process_group)


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates: a DTensor's local shard (a view that
    shares its storage), any other tensor itself."""
    if is_dtensor(tensor):
        return tensor.to_local()
    return tensor


def _sharded_mesh_dims(tensor: torch.Tensor) -> tuple:
    """(mesh, mesh dims the tensor is sharded over) for a DTensor; () for a
    plain tensor, whose norm is complete on every rank."""
    if not is_dtensor(tensor):
        return ()
    dims = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            # The local values are addends of the gradient, not pieces of it:
            # the sum of their squared norms is not the squared norm of the sum.
            raise ValueError(f"cannot clip a gradient with a Partial placement on mesh dim {dim} "
                             f"({tensor.placements}); redistribute it to Shard or Replicate first")
        if placement.is_shard():
            dims.append(dim)
    return (tensor.device_mesh, tuple(dims)) if dims else ()


def local_norm_squared(grads_by_group: list[list[torch.Tensor]]) -> torch.Tensor:
    """Squared L2 norm of local tensors (as stored: still multiplied by
    GradScaler's scale when it passes one; complex ones as real pairs), a
    float32 scalar on the device of the first; one fused multi_tensor_norm
    pass per (device, dtype), no host synchronization."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grads in grads_by_group:
        for grad in grads:
            grad = torch.view_as_real(grad) if grad.is_complex() else grad
            buckets.setdefault((grad.device, grad.dtype), []).append(grad)
    first_device = next(iter(buckets))[0]
    total = None
    for tensors in buckets.values():
        squared = multi_tensor_norm(tensors, squared=True).to(first_device, non_blocking=True)
        total = squared if total is None else total + squared
    return total


def grad_norm_squared(grads_by_group: list[list[torch.Tensor]],
                      local_norm_squared: Callable[[list[list[torch.Tensor]]], torch.Tensor] = local_norm_squared,
                      ) -> torch.Tensor:
    """Squared L2 norm of all gradients of an optimizer, across ranks.

    ``local_norm_squared`` computes the squared norm of local tensors on this
    rank (by default the fused multi-tensor pass). Gradients are grouped by
    how they are sharded; a group's local result is summed over the process
    group of each mesh dim it is sharded over (replicated dims hold the same
    values everywhere and are not summed), so the result equals the norm
    torch.nn.utils.clip_grad_norm_ computes on the unsharded model. Every rank
    must pass the gradients of the same parameters in the same order, as FSDP2
    guarantees, because the all-reduces must match across ranks.
    """
    layouts: dict[tuple, list[torch.Tensor]] = {}
    for grads in grads_by_group:
        for grad in grads:
            layouts.setdefault(_sharded_mesh_dims(grad), []).append(local_tensor(grad))
    total = None
    for layout, tensors in layouts.items():
        squared = local_norm_squared([tensors])
        if layout:
            mesh, dims = layout
            for dim in dims:
                dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        total = squared if total is None else total + squared.to(total.device, non_blocking=True)
    return total
