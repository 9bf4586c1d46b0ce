"""Fine-tune and evaluate: lrfx.evaluate measures accuracy, loss and agreement with the original
(checked by hand), lrfx.fit trains a compressed model on real data (scikit-learn digits) and
improves it, callbacks are called where documented, and every model keeps its train/eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfx
from lrfx.contrib.data import load_digits_tensors


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors()
    return x.flatten(1), y


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


@pytest.fixture(scope="module")
def trained(digits: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    x, y = digits
    m = _mlp()
    lrfx.fit(m, DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True,
                           generator=torch.Generator().manual_seed(0)), epochs=8, lr=3e-3)
    return m.eval()


def test_evaluate_matches_a_hand_computation(trained: nn.Module,
                                             digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    test = [(x[i:i + 100], y[i:i + 100]) for i in range(1400, 1797, 100)]
    ev = lrfx.evaluate(trained, test)
    with torch.no_grad():
        out = trained(x[1400:])
    assert ev.n == 397
    assert ev.accuracy == pytest.approx(float((out.argmax(1) == y[1400:]).float().mean()))
    assert ev.loss == pytest.approx(float(F.cross_entropy(out, y[1400:])), rel=1e-5)
    assert ev.accuracy > 0.9  # a real model, not a constant
    same = lrfx.evaluate(trained, test, reference=trained)
    assert same.agreement == 1.0 and same.cosine == pytest.approx(1.0)
    assert same.relative_error == pytest.approx(0.0, abs=1e-6)


def test_compressed_model_agreement_and_fine_tuning_recovers_accuracy(
        trained: nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    test = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=128)
    small = lrfx.compress(trained, x[:1], macs=0.12, exclude=["4"])
    assert not small.training  # the mode of the model passed in
    before = lrfx.evaluate(small, test, reference=trained)
    assert before.agreement is not None and before.agreement < 1.0
    assert before.relative_error is not None and before.relative_error > 0.01
    result = lrfx.fit(small, train, epochs=3, lr=1e-3)
    assert result.steps == 3 * len(train) and len(result.losses) == 3
    after = lrfx.evaluate(small, test, reference=trained)
    assert not small.training  # fit restored eval mode
    assert after.accuracy is not None and before.accuracy is not None
    assert after.accuracy > before.accuracy  # fine-tuning helps
    assert after.loss is not None and before.loss is not None and after.loss < before.loss
    assert not any(p.grad is None for p in small.parameters() if p.requires_grad)


def test_modes_are_restored_and_dict_batches_work(trained: nn.Module,
                                                   digits: tuple[torch.Tensor, torch.Tensor]
                                                   ) -> None:
    x, y = digits

    class Keyed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = nn.Sequential(inner, nn.Dropout(0.1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner(pixels)

    m = Keyed(_mlp()).train()
    m.inner[1].eval()  # a mixed state must come back as it was
    data = [{"pixels": x[i:i + 50], "labels": y[i:i + 50]} for i in range(0, 200, 50)]
    ev = lrfx.evaluate(m, data)
    assert ev.n == 200 and ev.accuracy is not None
    assert m.training and not m.inner[1].training
    lrfx.fit(m, data, epochs=1)
    assert m.training and not m.inner[1].training


class _Spy:
    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.calls = {"penalty": 0, "after_backward": 0, "after_step": 0, "end_epoch": 0}
        self.grads_seen = 0

    def penalty(self, model: nn.Module) -> torch.Tensor:
        self.calls["penalty"] += 1
        return self.weight * sum(p.pow(2).sum() for p in model.parameters())

    def after_backward(self, model: nn.Module) -> None:
        self.calls["after_backward"] += 1
        self.grads_seen += all(p.grad is not None for p in model.parameters())

    def after_step(self, model: nn.Module) -> None:
        self.calls["after_step"] += 1

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        self.calls["end_epoch"] += 1


def test_callbacks_are_called_and_the_penalty_counts(
        digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    data = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 400, 100)]
    spy = _Spy(0.0)
    plain = lrfx.fit(_mlp(), data, epochs=2, callbacks=[spy])
    assert spy.calls == {"penalty": 8, "after_backward": 8, "after_step": 8, "end_epoch": 2}
    assert spy.grads_seen == 8
    heavy = _Spy(1.0)
    shrunk = _mlp()
    penalized = lrfx.fit(shrunk, data, epochs=2, callbacks=[heavy])
    assert penalized.losses[0] > plain.losses[0] + 1.0  # the loss includes the penalty
    with torch.no_grad():
        norm = sum(float(p.pow(2).sum()) for p in shrunk.parameters())
        assert norm < sum(float(p.pow(2).sum()) for p in _mlp().parameters())  # decay acted


def test_fit_errors_are_clear(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    with pytest.raises(lrfx.LrfxError, match="no targets"):
        lrfx.fit(_mlp(), [x[:10]], epochs=1)
    with pytest.raises(lrfx.LrfxError, match="epochs must be a positive integer"):
        lrfx.fit(_mlp(), [(x[:10], y[:10])], epochs=0)
    bad = [(x[:10] * float("nan"), y[:10])]
    with pytest.raises(lrfx.LrfxError, match=r"loss is nan at epoch 1, step 0.*lower lr"):
        lrfx.fit(_mlp(), bad, epochs=1)
    with pytest.raises(lrfx.LrfxError, match="batch 1 does not fit"):
        lrfx.evaluate(_mlp(), [(x[:10], y[:10]), (torch.randn(4, 32), y[:4])])


def test_cli_finetune_on_labelled_calibration_data(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from lrfx.cli import main

    (tmp_path / "digitnets_ft.py").write_text(
        "import torch\nfrom lrfx.contrib.zoo import resnet20\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return resnet20(in_channels=1).eval(), torch.randn(1, 1, 8, 8)\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["compress", "digitnets_ft:build", "--macs", "0.5", "--calibration", "digits",
               "--finetune", "1", "-o", "out", "--no-progress", "--format", "python"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "fine-tuned 1 epoch(s) on 1,797 samples" in out.out
    assert "no test split is known" in out.out
    rc = main(["compress", "digitnets_ft:build", "--macs", "0.5", "--finetune", "1", "-o", "o2",
               "--no-progress"])
    assert rc == 2 and "--finetune needs --calibration" in capsys.readouterr().err
