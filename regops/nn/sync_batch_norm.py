"""regops.nn.SyncBatchNorm: batch norm over the global batch of a process
group, a drop-in for ``torch.nn.SyncBatchNorm`` on the regops kernels.

Per training step it costs one all-gather in the forward and one all-reduce in
the backward, each of one small tensor whatever the number of channels:

- forward: every rank computes its per-channel (mean, biased variance) with
  ``batch_norm_stats`` and all-gathers (count, mean, variance); each rank then
  merges them with the parallel-variance formula (Chan, Golub and LeVeque),
  weighting ranks by their counts, so unequal and empty local batches are
  exact. The merge is float64 (2C + 1 values per rank) and needs no host
  synchronization.
- backward: every rank computes its per-channel ``(sum(dy), sum(dy * (x -
  mean)))`` with ``batch_norm_backward_reduce`` and all-reduces them
  concatenated; ``batch_norm_backward_elementwise`` then gives grad_input.
  grad_weight and grad_bias are this rank's own sums, as in torch: DDP
  averages them across ranks like every other parameter gradient.

The running statistics move as torch's: towards the global mean and the
unbiased global variance (over the global count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from regops import distributed
from regops.nn.batch_norm import _BatchNorm
from regops.ops.batch_norm import (accumulate_dtype, batch_norm_backward_elementwise, batch_norm_backward_reduce,
                                   batch_norm_elementwise, batch_norm_stats, memory_format)


def _all_gather_rows(local: torch.Tensor, process_group, world_size: int) -> torch.Tensor:
    """(world_size, n): row r is rank r's ``local`` (n,), in one collective."""
    if local.device.type == "cpu" or dist.get_backend(process_group) == dist.Backend.GLOO:
        # gloo, which serves CPU tensors, has no all_gather_into_tensor.
        rows = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(rows, local, group=process_group)
        return torch.stack(rows)
    gathered = local.new_empty((world_size, local.numel()))
    dist.all_gather_into_tensor(gathered, local, group=process_group)
    return gathered


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm whose statistics and gradient sums span the
    ranks of ``process_group``; the collectives run inside forward and
    backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, process_group, world_size,
                activation):
        input = input.contiguous(memory_format=memory_format(input))
        channels = input.shape[1]
        count = input.numel() // channels
        if count > 0:
            mean, var = batch_norm_stats(input)
        else:
            # An empty local batch still joins the collective, with weight 0.
            mean = var = input.new_zeros((channels,), dtype=accumulate_dtype(input))
        local = torch.cat([mean.new_full((1,), count), mean, var]).to(torch.float64)
        gathered = _all_gather_rows(local, process_group, world_size)
        counts, means, variances = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
        total = counts.sum()
        weights = counts / total.clamp(min=1)
        global_mean = (weights * means).sum(0)
        global_var = (weights * (variances + (means - global_mean).square())).sum(0)
        mean = global_mean.to(accumulate_dtype(input))
        invstd = torch.rsqrt(global_var + eps).to(mean.dtype)

        with torch.no_grad():
            # Unchanged by a step in which every rank's batch is empty, as torch.
            updated = total > 0
            if running_mean is not None:
                new_mean = running_mean.double() * (1 - momentum) + global_mean * momentum
                running_mean.copy_(torch.where(updated, new_mean, running_mean.double()))
            if running_var is not None:
                unbiased = global_var * (total / (total - 1).clamp(min=1))
                new_var = running_var.double() * (1 - momentum) + unbiased * momentum
                running_var.copy_(torch.where(updated, new_var, running_var.double()))

        ctx.process_group, ctx.activation, ctx.count = process_group, activation, count
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The fused ReLU's backward recomputes its mask, which needs the bias.
        ctx.save_for_backward(input, weight, bias if activation == "relu" else None, mean, invstd,
                              total.to(mean.dtype))
        if count == 0:
            return torch.empty_like(input)
        return batch_norm_elementwise(input, mean, invstd, weight, bias, activation=activation)

    @staticmethod
    @once_differentiable  # a second derivative raises a clear error instead of returning zeros
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd, total = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=memory_format(input))
        if ctx.count > 0:
            sum_dy, sum_dy_xmu = batch_norm_backward_reduce(grad_output, input, mean, invstd, weight, bias,
                                                            activation=ctx.activation)
        else:
            sum_dy = sum_dy_xmu = mean.new_zeros(mean.shape)
        grad_input = grad_weight = grad_bias = None
        if ctx.weight_dtype is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            if ctx.count > 0:
                # The sums are divided by the global count here, on the device,
                # and passed with count=1: no host synchronization for it.
                channels = mean.numel()
                count = total.clamp(min=1)
                grad_input = batch_norm_backward_elementwise(
                    grad_output, input, mean, invstd, weight, bias, sums[:channels] / count, sums[channels:] / count,
                    1, activation=ctx.activation)
            else:
                grad_input = torch.empty_like(input)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Drop-in for ``torch.nn.SyncBatchNorm``: batch norm over an input
    (N, C, ...) whose statistics span the batches of every rank of
    ``process_group`` (the default group when None), with the regops kernels
    and an optional fused ReLU (``activation="relu"``).

    Training synchronizes when torch.distributed is initialized and the group
    has more than one rank; otherwise (eval, no process group, one rank) this
    is ``regops.nn.BatchNorm*d``. Unlike torch's, it runs on the CPU too (the
    gloo backend) as well as on GPUs (NCCL).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True, activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self):
        """(process group, world size) when this forward synchronizes, else None."""
        if not self.training or not distributed.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        size = distributed.world_size(group)
        return (group, size) if size > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        sync = self._sync_group()
        if sync is None:
            return super().forward(input)
        factor, _ = self._momentum_and_training()
        keep_running = self.track_running_stats
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias,
                                            self.running_mean if keep_running else None,
                                            self.running_var if keep_running else None, factor, self.eps, *sync,
                                            self.activation)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """``module`` with every torch or regops batch norm (``BatchNorm1d/2d/3d``,
        ``torch.nn.SyncBatchNorm``) replaced by a regops SyncBatchNorm sharing
        its parameters and buffers and keeping its ``activation``; returns the
        converted module (a new object only when ``module`` itself is a batch norm)."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            bias=not module.affine or module.bias is not None,
                            activation=getattr(module, "activation", None))
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
