"""regops: fused regularization kernels for PyTorch.

Dropout that returns a 1-bit mask (or regenerates it), batch normalization,
layer norm and RMSNorm fused with dropout and a residual add, DropPath, and
penalized SGD/AdamW updates, each with hand-written CUDA, Triton, C++ CPU and
pure-torch reference backends.
"""

from importlib import metadata as _metadata

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from regops import _C  # noqa: F401  (registers the operators)
except ImportError as _error:  # not built, or built against another torch
    raise ImportError(
        f"regops' compiled extension regops._C could not be loaded ({_error}). Build it from the source tree "
        "with `make build` (or `pip install --no-build-isolation -e .`; REGOPS_CUDA=0 skips the CUDA kernels), "
        "or install regops with `pip install --no-build-isolation regops-<version>.tar.gz`, against the torch "
        f"that runs here (torch {torch.__version__})."
    ) from _error

from regops._backend import BACKENDS, available_backends, get_backend, set_backend, use_backend
from regops.ops.batch_norm import (batch_norm, batch_norm_backward_elementwise, batch_norm_backward_reduce,
                                   batch_norm_elementwise, batch_norm_stats)
from regops.ops.drop_path import drop_path, drop_path_add
from regops.ops.dropout import dropout, dropout_backward, dropout_with_mask, philox4x32_10, unpack_mask
from regops.ops.layer_norm import dropout_add_layer_norm, dropout_add_rms_norm, layer_norm, rms_norm
from regops.ops.optim import multi_tensor_norm
from regops import nn, optim  # noqa: E402
from regops.convert import convert  # noqa: E402
from regops import distributed  # noqa: E402
from regops import reference  # noqa: E402  (the pure-torch oracle of every op)

try:
    __version__ = _metadata.version("regops")  # declared once, in pyproject.toml
except _metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_backward_elementwise",
    "batch_norm_backward_reduce",
    "batch_norm_elementwise",
    "batch_norm_stats",
    "convert",
    "distributed",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "dropout_backward",
    "dropout_with_mask",
    "get_backend",
    "layer_norm",
    "multi_tensor_norm",
    "nn",
    "optim",
    "philox4x32_10",
    "reference",
    "rms_norm",
    "set_backend",
    "unpack_mask",
    "use_backend",
]
