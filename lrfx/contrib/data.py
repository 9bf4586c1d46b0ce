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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lrfx.errors import LrfxError

__all__ = [
    "FASHION_MNIST_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "batches",
    "load_digits_tensors",
    "load_fashion_mnist",
    "load_image_folder",
    "load_tensor_file",
    "split_batches",
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


#: Image file suffixes read from a calibration folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

#: ImageNet channel statistics (what torchvision's pretrained models expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image_folder(
    root: str | Path, size: tuple[int, int], channels: int = 3, limit: int | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Images under ``root`` (recursively, sorted by path) as ``(n, channels, *size)`` float32.

    Each image is decoded with ``torchvision.io``, scaled to [0, 1], converted to ``channels``
    (1: grayscale, 3: RGB), resized to ``size`` (shorter side to size, then centre crop), and
    standardized with ``mean``/``std`` when given.

    Raises:
        LrfxError: No image under ``root``, or one that cannot be decoded (named).
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LrfxError(f"no image ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    files = files[:limit] if limit else files
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out = []
    for f in files:
        try:
            img = decode_image(str(f), mode=mode)
        except (RuntimeError, ValueError) as exc:
            raise LrfxError(f"cannot decode image {str(f)!r}: {exc}") from exc
        img = TF.resize(img, list(size) if size[0] != size[1] else [size[0]], antialias=True)
        img = TF.center_crop(img, list(size))
        out.append(img.float().div_(255.0))
    x = torch.stack(out)
    if mean is not None and std is not None:
        x = TF.normalize(x, list(mean), list(std))
    return x


def load_tensor_file(path: str | Path) -> tuple[Any, torch.Tensor | None]:
    """Calibration data from a ``.pt`` / ``.pth`` (``torch.save`` of a tensor, an
    ``(inputs, targets)`` pair or a dict of input tensors) or an ``.npz`` (arrays named
    ``x``/``inputs``/``images`` and optionally ``y``/``targets``/``labels``, or one array).

    Returns:
        ``(inputs, targets or None)``; inputs is a tensor (``N`` first) or a dict of them.

    Raises:
        LrfxError: The file cannot be read or holds something else (says what is expected).
    """
    p = Path(path)
    expect = ("a tensor (N, ...), an (inputs, targets) pair, or a dict of input tensors "
              "(keyword inputs)")
    if p.suffix == ".npz":
        import numpy as np

        try:
            with np.load(p) as z:
                arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        except (OSError, ValueError) as exc:
            raise LrfxError(f"cannot read {str(p)!r} with numpy.load: {exc}") from exc
        xs = [k for k in ("x", "inputs", "images") if k in arrays]
        ys = [k for k in ("y", "targets", "labels") if k in arrays]
        if xs:
            return arrays[xs[0]], arrays[ys[0]] if ys else None
        if len(arrays) == 1:
            return next(iter(arrays.values())), None
        raise LrfxError(f"{str(p)!r} holds arrays {sorted(arrays)}: name the inputs 'x' "
                        "(and the targets 'y')")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LrfxError(f"cannot read {str(p)!r} with torch.load: {exc}") from exc
    if isinstance(obj, torch.Tensor):
        return obj, None
    if (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(t, torch.Tensor) for t in obj)):
        return obj[0], obj[1]
    if isinstance(obj, Mapping) and obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj), None
    raise LrfxError(f"{str(p)!r} must hold {expect}; got {type(obj).__name__}")


def split_batches(x: Any, y: torch.Tensor | None, n: int, batch_size: int) -> list[Any]:
    """The first ``n`` samples of ``x`` (a tensor or a dict of tensors, ``N`` first) in
    batches, paired with ``y`` when given."""
    def part(i: int) -> Any:
        sl = slice(i, min(i + batch_size, n))
        xb = {k: v[sl] for k, v in x.items()} if isinstance(x, Mapping) else x[sl]
        return xb if y is None else (xb, y[sl])

    total = len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
    n = min(n, total)
    return [part(i) for i in range(0, n, batch_size)]
