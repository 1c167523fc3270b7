"""regops.nn.Dropout: torch.nn.Dropout with a 1-bit saved mask."""

from __future__ import annotations

import torch

from regops.ops._common import check_probability
from regops.ops.dropout import dropout


class Dropout(torch.nn.Module):
    """Drop-in for ``torch.nn.Dropout``: zeroes elements with probability ``p``
    in training and scales the rest by 1 / (1 - p); the identity in eval.

    ``recompute_mask=True`` saves no mask for the backward (it is regenerated
    from the seed), trading a second Philox pass for 1/8 byte per element.
    """

    __constants__ = ["p", "inplace"]

    def __init__(self, p: float = 0.5, inplace: bool = False, *, recompute_mask: bool = False) -> None:
        super().__init__()
        self.p = check_probability(p, "p")
        self.inplace = inplace
        self.recompute_mask = recompute_mask

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace, recompute_mask=self.recompute_mask)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
