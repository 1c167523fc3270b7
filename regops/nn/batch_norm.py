"""regops.nn.BatchNorm1d/2d/3d: drop-ins for torch's modules on the fused
regops kernels, with an optional fused ReLU and residual add
(``bn(x, residual=z)`` computes ``act(bn(x) + z)``).

They subclass torch's ``_BatchNorm``, so parameters, buffers (including
``num_batches_tracked``), ``reset_parameters``, ``momentum=None`` (a
cumulative moving average) and state_dicts are torch's own, and a state_dict
loads both ways between torch and regops modules. ``_BatchNorm`` here is the
base a synchronized batch norm can subclass: it only replaces ``forward``.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from regops.ops.batch_norm import batch_norm, check_activation


class _BatchNorm(_TorchBatchNorm):
    """torch's ``_BatchNorm`` running regops.batch_norm, plus ``activation``
    (``bias=False``: an affine weight without a bias, as torch's)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True,
                 activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation = check_activation(activation)

    def _momentum_and_training(self) -> tuple[float | torch.Tensor, bool]:
        """The factor the running statistics move by and whether batch
        statistics are used, as torch's _BatchNorm.forward decides. With
        momentum=None (a cumulative average) the factor 1 / num_batches_tracked
        stays a tensor, so torch.compile traces it instead of specializing."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.to(torch.float64)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return factor, use_batch_stats

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(bn(input) + residual): ``residual`` (the input's shape and
        dtype) is added before the activation in the same pass."""
        self._check_input_dim(input)
        factor, use_batch_stats = self._momentum_and_training()
        # Buffers are updated only when they are tracked and the module trains.
        keep_running = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if keep_running else None,
                          self.running_var if keep_running else None, self.weight, self.bias, use_batch_stats,
                          factor, self.eps, activation=self.activation, residual=residual)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: input (N, C, H, W)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: input (N, C, D, H, W)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
