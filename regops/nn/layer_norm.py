"""regops.nn.LayerNorm and RMSNorm (drop-ins for torch's, which they
subclass, so parameters and state_dicts are torch's own), and the fused
DropoutAddLayerNorm / DropoutAddRMSNorm of a transformer block: ``norm(dropout(x)
+ residual)``, whose state_dicts are those of ``torch.nn.LayerNorm(hidden)``
and ``torch.nn.RMSNorm(hidden)``."""

from __future__ import annotations

import torch

from regops.ops._common import check_probability
from regops.ops.layer_norm import dropout_add_layer_norm, dropout_add_rms_norm, layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` on the regops kernels."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` on the regops kernels."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


class DropoutAddLayerNorm(torch.nn.Module):
    """``layer_norm(dropout(x, p) + residual)`` over the last dimension, with
    dropout only in training. ``forward(x, residual=None)`` returns the
    output, or ``(output, h)`` with ``prenorm=True`` (h = dropout(x) +
    residual, the residual stream of the next block; float32 with
    ``residual_in_fp32``). ``recompute_mask=True`` saves no mask for the backward."""

    def __init__(self, hidden_size: int, p: float = 0.0, eps: float = 1e-5, prenorm: bool = False,
                 residual_in_fp32: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True,
                 recompute_mask: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.p, self.eps = int(hidden_size), check_probability(p, "p"), float(eps)
        self.prenorm, self.residual_in_fp32, self.recompute_mask = prenorm, residual_in_fp32, recompute_mask
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(self.hidden_size, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(self.hidden_size, **factory)) if bias else None

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return dropout_add_layer_norm(input, residual, self.weight, self.bias, self.p if self.training else 0.0,
                                      self.eps, prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
                                      recompute_mask=self.recompute_mask)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, p={self.p}, eps={self.eps}, prenorm={self.prenorm}, "
                f"residual_in_fp32={self.residual_in_fp32}")


class DropoutAddRMSNorm(torch.nn.Module):
    """``rms_norm(dropout(x, p) + residual)``, as ``DropoutAddLayerNorm``
    (eps=None: the input dtype's epsilon, as torch.nn.RMSNorm)."""

    def __init__(self, hidden_size: int, p: float = 0.0, eps: float | None = None, prenorm: bool = False,
                 residual_in_fp32: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, recompute_mask: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.p = int(hidden_size), check_probability(p, "p")
        self.eps = None if eps is None else float(eps)
        self.prenorm, self.residual_in_fp32, self.recompute_mask = prenorm, residual_in_fp32, recompute_mask
        self.weight = torch.nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return dropout_add_rms_norm(input, residual, self.weight, self.p if self.training else 0.0, self.eps,
                                    prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
                                    recompute_mask=self.recompute_mask)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, p={self.p}, eps={self.eps}, prenorm={self.prenorm}, "
                f"residual_in_fp32={self.residual_in_fp32}")
