"""Drop-in modules for torch.nn."""

from regops.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from regops.nn.drop_path import DropPath
from regops.nn.dropout import Dropout
from regops.nn.layer_norm import DropoutAddLayerNorm, DropoutAddRMSNorm, LayerNorm, RMSNorm
from regops.nn.sync_batch_norm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DropPath", "Dropout", "DropoutAddLayerNorm",
           "DropoutAddRMSNorm", "LayerNorm", "RMSNorm", "SyncBatchNorm"]
