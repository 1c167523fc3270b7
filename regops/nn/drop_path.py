"""regops.nn.DropPath: timm's DropPath (stochastic depth per sample) with
the regops random rule."""

from __future__ import annotations

import torch

from regops.ops._common import check_probability
from regops.ops.drop_path import drop_path


class DropPath(torch.nn.Module):
    """Drop-in for ``timm.layers.DropPath``: in training, zeroes each sample
    (index along dim 0) with probability ``p`` and scales the kept ones by
    1 / (1 - p) (``scale_by_keep``); the identity in eval. No state."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = check_probability(p, "p")
        self.scale_by_keep = scale_by_keep

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return drop_path(input, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
