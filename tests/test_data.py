"""``lrfx.contrib.data``: Fashion-MNIST IDX files (written here, tiny) and scikit-learn's digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

import lrfx
from lrfx.contrib.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    batches,
    load_digits_tensors,
    load_fashion_mnist,
)


def _idx(array: torch.Tensor) -> bytes:
    """IDX bytes: two zero bytes, type 0x08 (ubyte), ndim, big-endian uint32 dims, the data."""
    header = struct.pack(">HBB", 0, 0x08, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def _write(root: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor,
           compress: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for kind, n, arr in (("images", 3, images), ("labels", 1, labels)):
        name = root / f"{prefix}-{kind}-idx{n}-ubyte"
        if compress:
            with gzip.open(f"{name}.gz", "wb") as f:
                f.write(_idx(arr))
        else:
            name.write_bytes(_idx(arr))


@pytest.fixture
def tiny() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.tensor([3, 0, 9, 1, 7], dtype=torch.uint8)
    return images, labels


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(lrfx.LrfxError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(root=tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert "LRFX_FASHION_MNIST" in str(info.value)


def test_missing_labels_only(tmp_path: Path, tiny: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write(tmp_path, "train", *tiny)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(lrfx.LrfxError, match=r"train-labels-idx1-ubyte.*apt-get install"):
        load_fashion_mnist(root=tmp_path)


def test_tiny_idx_pair_loads(tmp_path: Path, tiny: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = tiny
    _write(tmp_path, "train", images, labels)
    x, y = load_fashion_mnist("train", root=tmp_path, normalize=False)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert y.tolist() == [3, 0, 9, 1, 7]
    torch.testing.assert_close(x[:, 0], images.float() / 255.0)
    xn, yn = load_fashion_mnist("train", root=str(tmp_path))
    torch.testing.assert_close(xn, (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)
    assert torch.equal(yn, y)


def test_test_split_and_uncompressed_files(
    tmp_path: Path, tiny: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = tiny
    _write(tmp_path, "t10k", images[:3], labels[:3], compress=False)
    x, y = load_fashion_mnist("test", root=tmp_path, normalize=False)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [3, 0, 9]
    with pytest.raises(lrfx.LrfxError, match="not found"):
        load_fashion_mnist("train", root=tmp_path)  # only the test split is there
    with pytest.raises(lrfx.LrfxError, match="split must be"):
        load_fashion_mnist("val", root=tmp_path)


def test_environment_variable_points_at_the_files(
    tmp_path: Path, tiny: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "fm", "train", *tiny)
    monkeypatch.setenv("LRFX_FASHION_MNIST", str(tmp_path / "fm"))
    x, _ = load_fashion_mnist()
    assert x.shape == (5, 1, 28, 28)


def test_bad_idx_header(tmp_path: Path, tiny: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write(tmp_path, "train", *tiny)
    bad = struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\0" * 8  # float32 type
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bad)
    with pytest.raises(lrfx.LrfxError, match="unsigned-byte IDX"):
        load_fashion_mnist(root=tmp_path)


def test_digits_tensors() -> None:
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-4)
    raw, _ = load_digits_tensors(normalize=False)
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0


def test_batches() -> None:
    x = torch.arange(10).float().reshape(10, 1)
    y = torch.arange(10)
    got = list(batches(x, y, batch_size=4))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    shuffled = list(batches(x, batch_size=3, shuffle=True, seed=1))
    flat = torch.cat(shuffled)[:, 0]
    assert sorted(flat.tolist()) == x[:, 0].tolist() and flat.tolist() != x[:, 0].tolist()
    again = torch.cat(list(batches(x, batch_size=3, shuffle=True, seed=1)))[:, 0]
    assert torch.equal(flat, again)
