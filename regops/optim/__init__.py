"""Penalized optimizers: SGD and AdamW with coupled L2, decoupled weight
decay and L1 (subgradient or proximal), each step one fused multi-tensor
update per (device, dtype)."""

from regops.optim.adamw import AdamW
from regops.optim.averaging import swap_averaged
from regops.optim.sgd import SGD

__all__ = ["AdamW", "SGD", "swap_averaged"]
