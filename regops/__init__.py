"""regops: fused regularization kernels for PyTorch.

Dropout that returns a 1-bit mask (or regenerates it), batch normalization and
penalized SGD/AdamW updates, each with hand-written CUDA, Triton, C++ CPU and
pure-torch reference backends.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from regops import _C  # noqa: F401  (registers the operators)
from regops._backend import BACKENDS, available_backends, get_backend, set_backend, use_backend
from regops.ops.batch_norm import (batch_norm, batch_norm_backward_elementwise, batch_norm_backward_reduce,
                                   batch_norm_elementwise, batch_norm_stats)
from regops.ops.dropout import dropout, dropout_backward, dropout_with_mask, philox4x32_10, unpack_mask
from regops.ops.optim import multi_tensor_norm
from regops import nn, optim  # noqa: E402
from regops.convert import convert  # noqa: E402
from regops import distributed  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "batch_norm",
    "batch_norm_backward_elementwise",
    "batch_norm_backward_reduce",
    "batch_norm_elementwise",
    "batch_norm_stats",
    "convert",
    "distributed",
    "dropout",
    "dropout_backward",
    "dropout_with_mask",
    "get_backend",
    "multi_tensor_norm",
    "nn",
    "optim",
    "philox4x32_10",
    "set_backend",
    "unpack_mask",
    "use_backend",
]
