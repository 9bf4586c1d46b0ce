"""Exports with dynamic dimensions: a compressed CNN with a dynamic batch and a compressed
transformer with dynamic batch and sequence, in pt2 (torch.export) and ONNX (onnxruntime), each
checked at two sizes against the model itself; static exports stay static; bad ``dynamic=``
values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lrfx
from lrfx.contrib.zoo import resnet20

ort = pytest.importorskip("onnxruntime")


def _run(path: Path, fmt: str, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = ({session.get_inputs()[0].name: inputs.numpy()} if isinstance(inputs, torch.Tensor)
                else {k: v.numpy() for k, v in inputs.items()})
        return torch.from_numpy(session.run(None, feed)[0])
    module = torch.export.load(str(path)).module()
    out = module(inputs) if isinstance(inputs, torch.Tensor) else module(**inputs)
    if isinstance(out, dict):
        out = out["last_hidden_state"]
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return lrfx.compress(resnet20(in_channels=1).eval(), torch.randn(1, 1, 28, 28), macs=0.5)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_dynamic_batch_runs_at_batch_1_and_8(cnn: nn.Module, tmp_path: Path, fmt: str) -> None:
    path = lrfx.export(cnn, tmp_path / f"m.{fmt}", torch.randn(1, 1, 28, 28), format=fmt,
                       dynamic="batch")
    for b in (1, 8):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            want = cnn(x)
        got = _run(path, fmt, x)
        assert got.shape == (b, 10)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_static_export_keeps_its_batch(cnn: nn.Module, tmp_path: Path) -> None:
    path = lrfx.export(cnn, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28), format="onnx")
    with pytest.raises(Exception, match=r"(?i)dimension|shape|index"):
        _run(path, "onnx", torch.randn(8, 1, 28, 28))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_transformer_with_dynamic_batch_and_sequence(tmp_path: Path, fmt: str) -> None:
    from lrfx.contrib.hf import tiny

    bert, inputs = tiny("bert")
    small = lrfx.compress(bert, inputs, macs=0.7)
    path = lrfx.export(small, tmp_path / f"b.{fmt}", inputs, format=fmt,
                       dynamic=("batch", "sequence"))
    for b, t in ((1, 5), (3, 11)):
        x = {"input_ids": torch.randint(0, 100, (b, t)),
             "attention_mask": torch.ones(b, t, dtype=torch.long)}
        with torch.no_grad():
            want = small(**x).last_hidden_state
        got = _run(path, fmt, x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).reshape(2, 4, 8)  # only batch 2 fits


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_dimension_the_code_fixes_is_named(tmp_path: Path, fmt: str) -> None:
    m = _FixedBatch()
    gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 4)}, torch.randn(8, 8))
    with pytest.raises(lrfx.LrfxError, match=r"dynamic.*input_0\[0\] \(batch\) = 8"):
        lrfx.export(gm, tmp_path / f"f.{fmt}", torch.randn(8, 8), format=fmt, dynamic="batch")
    assert not (tmp_path / f"f.{fmt}").exists()


@pytest.mark.parametrize(("dynamic", "match"), [
    ({"images": {0: "batch"}}, "no tensor input named 'images'"),
    ({"input_0": {5: "batch"}}, "dim 5 does not exist"),
    ({"input_0": [0]}, "must map dims to names"),
    ("width", "use True or 'batch'"),
    (("batch", "width"), "'width' is not 'batch' or 'sequence'"),
    (3, "dynamic must be None, True"),
])
def test_bad_dynamic_values_are_named(cnn: nn.Module, tmp_path: Path, dynamic: object,
                                      match: str) -> None:
    with pytest.raises(lrfx.LrfxError, match=match):
        lrfx.export(cnn, tmp_path / "m.pt2", torch.randn(1, 1, 28, 28), dynamic=dynamic)
    with pytest.raises(lrfx.LrfxError, match="pt2 and onnx"):
        lrfx.export(cnn, tmp_path / "m.ts", torch.randn(1, 1, 28, 28), format="torchscript",
                    dynamic=True)


def test_cli_compress_and_export_with_a_dynamic_batch(tmp_path: Path) -> None:
    from lrfx.cli import main

    out = tmp_path / "out"
    rc = main(["compress", "torchvision:resnet18", "--macs", "0.5", "--input", "1x3x32x32",
               "--format", "onnx", "--dynamic", "batch", "-o", str(out), "--no-progress"])
    assert rc == 0
    for b in (1, 8):
        y = _run(out / "model.onnx", "onnx", torch.randn(b, 3, 32, 32))
        assert y.shape == (b, 1000)
    rc = main(["export", str(out), "--format", "pt2", "--dynamic", "batch"])
    assert rc == 0
    assert _run(out / "model.pt2", "pt2", torch.randn(8, 3, 32, 32)).shape == (8, 1000)


def test_load_returns_the_mode_it_was_saved_in(cnn: nn.Module, tmp_path: Path) -> None:
    fresh = resnet20(in_channels=1)  # a new model is in training mode
    assert fresh.training and not cnn.training
    lrfx.save(cnn, tmp_path / "eval")
    assert not lrfx.load(tmp_path / "eval", fresh, torch.randn(1, 1, 28, 28)).training
    trained = lrfx.load(tmp_path / "eval", fresh, torch.randn(1, 1, 28, 28)).train()
    lrfx.save(trained, tmp_path / "train")
    assert lrfx.load(tmp_path / "train", fresh.eval(), torch.randn(1, 1, 28, 28)).training
