"""Drop-in modules for torch.nn."""

from regops.nn.dropout import Dropout

__all__ = ["Dropout"]
