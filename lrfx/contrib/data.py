"""Small real datasets that need no download: Fashion-MNIST (Debian package) and sklearn digits.

Example:
    >>> x, y = load_digits_tensors()
    >>> x.shape, y.shape
    (torch.Size([1797, 1, 8, 8]), torch.Size([1797]))
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from lrfx.errors import LrfxError

__all__ = [
    "FASHION_MNIST_DIR",
    "batches",
    "load_digits_tensors",
    "load_fashion_mnist",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files (override with the
#: ``LRFX_FASHION_MNIST`` environment variable).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Per-pixel mean and standard deviation of the Fashion-MNIST training images.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise LrfxError(f"{str(path)!r} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    t = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return t.reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``(n, 1, 28, 28)`` float32 and labels ``(n,)`` int64.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000).
        root: Directory holding the IDX files (default: :data:`FASHION_MNIST_DIR`).
        normalize: Standardize with the training set's mean and std.

    Raises:
        LrfxError: The files are missing; the message says how to install them.
    """
    if split not in ("train", "test"):
        raise LrfxError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root or os.environ.get("LRFX_FASHION_MNIST") or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    files = [base / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3),
                                                                       ("labels", 1))]
    for f in files:
        if not f.exists() and not f.with_suffix("").exists():
            raise LrfxError(
                f"Fashion-MNIST file {str(f)!r} not found; install it with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or point the "
                "LRFX_FASHION_MNIST environment variable at a directory holding the IDX files"
            )
    images, labels = (_read_idx(f if f.exists() else f.with_suffix("")) for f in files)
    x = images.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, labels.long()


def load_digits_tensors(normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 images of 8x8, shipped with sklearn) as tensors."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise LrfxError("the digits set needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if normalize:
        x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def batches(
    x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 128, *,
    shuffle: bool = False, seed: int = 0,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield mini-batches of ``x`` (and ``y``), optionally shuffled with a fixed seed."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start,
                                                                                start + batch_size)
        yield x[idx] if y is None else (x[idx], y[idx])
