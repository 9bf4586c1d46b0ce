"""``lrfx.compress`` end to end, ``lrfx.recalibrate_bn``, and the ``lrfx compress`` CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _rewrite_models import small_cnn
from torch import nn

import lrfx
from lrfx.cli import main
from lrfx.contrib.data import batches, load_digits_tensors
from lrfx.modules import Factored

N_TRAIN = 1400


def _digits_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


@pytest.fixture(scope="module")
def trained(digits: dict[str, torch.Tensor]) -> nn.Sequential:
    """A small CNN with BN trained on digits for 4 epochs (about a second on one thread)."""
    torch.manual_seed(0)
    model = _digits_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(4):
        model.train()
        for xb, yb in batches(digits["x_train"], digits["y_train"], 64, shuffle=True, seed=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def calibration(digits: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    x = digits["x_train"]
    return [x[i : i + 128] for i in range(0, 512, 128)]


def _accuracy(model: nn.Module, digits: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        pred = model(digits["x_test"]).argmax(1)
    return 100.0 * float((pred == digits["y_test"]).float().mean())


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


# --- lrfx.compress --------------------------------------------------------------------------------


def test_compress_returns_a_graph_with_a_report(
    trained: nn.Module, calibration: list[torch.Tensor]
) -> None:
    x = calibration[0][:1]
    gm = lrfx.compress(trained, x, macs=0.5, calibration=calibration)
    assert isinstance(gm, torch.fx.GraphModule)
    extra = gm.meta["lrfx"].extra
    report = extra["report"]
    assert isinstance(report, lrfx.CompressionReport)
    total = lrfx.count_macs(trained, x)
    assert report.macs_before == total
    assert report.macs_after <= report.budget["target"] == int(0.5 * total)
    assert report.macs_after >= 0.95 * report.budget["target"]  # few layers: coarse steps
    assert report.macs_after == lrfx.count_macs(gm, x) == extra["plan"].macs
    assert report.budget["metric"] == "macs" and report.budget["fraction"] == pytest.approx(0.5)
    assert report.whitened and report.allocator == "lc" and report.scheme == "auto"
    assert report.params_after < report.params_before
    assert "input_stats" not in extra
    assert report.layers
    for row in report.layers:
        assert row["scheme"] in ("channel", "spatial", "tucker2", "svd")
        assert row["rank"] is not None
        assert 0.0 <= row["error"] <= 1.0
        assert row["macs_after"] < row["macs_before"]
        assert isinstance(gm.get_submodule(row["layer"]), Factored)
    table = report.table()
    assert "whitened" in table and report.layers[0]["layer"] in table
    d = report.to_dict()
    assert json.loads(json.dumps(d))["macs_after"] == report.macs_after
    assert len(d["layers"]) == len(report.layers)


def test_compress_leaves_the_model_alone(
    trained: nn.Module, calibration: list[torch.Tensor]
) -> None:
    before = copy.deepcopy(trained.state_dict())
    trained.train()  # a model in training mode stays in training mode
    try:
        lrfx.compress(trained, calibration[0][:1], macs=0.5, calibration=calibration)
        assert trained.training and all(m.training for m in trained.modules())
    finally:
        trained.eval()
    after = trained.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not any(isinstance(m, Factored) for m in trained.modules())


def test_calibration_recalibrates_bn(trained: nn.Module, calibration: list[torch.Tensor]) -> None:
    x = calibration[0][:1]
    kept = lrfx.compress(trained, x, macs=0.5, calibration=calibration, recalibrate=False)
    recal = lrfx.compress(trained, x, macs=0.5, calibration=calibration)
    p_kept, p_recal = kept.meta["lrfx"].extra["plan"], recal.meta["lrfx"].extra["plan"]
    assert p_kept.layers == p_recal.layers  # the same ranks; only the recorded config differs
    assert p_kept.settings["config"]["recalibrate"] is False
    assert p_recal.settings["config"]["recalibrate"] is True
    for a, b, orig in zip(_bn_stats(kept), _bn_stats(recal), _bn_stats(trained), strict=True):
        assert torch.equal(a, orig)  # recalibrate=False: the model's own statistics
        assert not torch.allclose(a, b)
    assert not recal.training


def test_accuracy_after_compress_and_recalibration(
    trained: nn.Module, calibration: list[torch.Tensor], digits: dict[str, torch.Tensor]
) -> None:
    x = calibration[0][:1]
    dense = _accuracy(trained, digits)
    assert dense >= 95.0
    for f in (0.5, 0.3):
        plain = lrfx.compress(trained, x, macs=f)
        acc_plain = _accuracy(plain, digits)
        assert lrfx.recalibrate_bn(plain, calibration) == 3
        acc_plain_recal = _accuracy(plain, digits)
        white = lrfx.compress(trained, x, macs=f, calibration=calibration)
        acc_white = _accuracy(white, digits)
        assert acc_white > acc_plain, (f, acc_white, acc_plain)
        if f == 0.5:
            assert acc_white >= dense - 2.0, (acc_white, dense)
            assert acc_white >= acc_plain - 1.0
            assert acc_white >= acc_plain_recal - 1.5, (acc_white, acc_plain_recal)


@pytest.mark.parametrize("alloc", ["lc", "energy", "global_sigma", "uniform"])
def test_compress_every_allocator_and_params_budget(trained: nn.Module, alloc: str) -> None:
    x = torch.randn(2, 1, 8, 8)
    for kw in ({"macs": 0.6}, {"params": 0.6}):
        gm = lrfx.compress(trained, x, allocator=alloc, **kw)
        report = gm.meta["lrfx"].extra["report"]
        assert report.allocator == alloc and not report.whitened
        metric, frac = next(iter(kw.items()))
        total = report.macs_before if metric == "macs" else report.params_before
        got = report.macs_after if metric == "macs" else report.params_after
        assert got <= int(frac * total)
        assert gm(x).shape == (2, 10)


def test_compress_full_budget_is_exact(trained: nn.Module) -> None:
    x = torch.randn(3, 1, 8, 8)
    gm = lrfx.compress(trained, x, macs=1.0)
    assert not gm.meta["lrfx"].extra["report"].layers
    with torch.no_grad():
        torch.testing.assert_close(gm(x), trained(x))


def test_compress_round_to(trained: nn.Module) -> None:
    gm = lrfx.compress(trained, torch.randn(1, 1, 8, 8), macs=0.5, round_to=8, scheme="channel")
    plan = gm.meta["lrfx"].extra["plan"]
    assert plan.factored and all(lp.rank % 8 == 0 for lp in plan.factored.values())
    assert {lp.scheme for lp in plan.factored.values()} <= {"channel", "svd"}


def test_calibration_of_the_wrong_shape_names_the_node() -> None:
    with pytest.raises(lrfx.ShapeError, match="conv1") as info:
        lrfx.compress(small_cnn(), torch.randn(1, 3, 16, 16), macs=0.5,
                      calibration=[torch.randn(2, 4, 16, 16)])
    assert info.value.node == "conv1"
    assert isinstance(info.value, lrfx.LrfxError)


def test_empty_calibration_is_an_error() -> None:
    with pytest.raises(lrfx.LrfxError, match="calibration"):
        lrfx.compress(small_cnn(), torch.randn(1, 3, 16, 16), macs=0.5, calibration=[])


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                                             nn.MaxPool2d(2))],
    ids=["relu", "depthwise"],
)
def test_nothing_to_factor_returns_an_equivalent_graph(model: nn.Module) -> None:
    x = torch.randn(2, 4, 8, 8)
    gm = lrfx.compress(model, x, macs=1.0)
    report = gm.meta["lrfx"].extra["report"]
    assert report.layers == ()
    assert report.macs_after == report.macs_before
    assert not any(isinstance(m, Factored) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


# --- recalibrate_bn -------------------------------------------------------------------------------


def _single_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Dropout(0.5), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3),
                         nn.ReLU())


def test_recalibrate_bn_sets_the_data_statistics() -> None:
    model = _single_bn()
    conv, bn = model[1], model[2]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    x = torch.randn(16, 3, 10, 10) * 2 + 1
    with torch.no_grad():
        z = conv(x)  # the BN's input; Dropout must be off while recalibrating
    assert lrfx.recalibrate_bn(model, [x]) == 1
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, z.var((0, 2, 3), unbiased=True))
    assert int(bn.num_batches_tracked) == 1
    # two equal batches: the exact average, not a momentum blend
    x2 = torch.randn(16, 3, 10, 10)
    with torch.no_grad():
        z2 = conv(x2)
    lrfx.recalibrate_bn(model, [x, x2])
    torch.testing.assert_close(bn.running_mean, (z.mean((0, 2, 3)) + z2.mean((0, 2, 3))) / 2)
    assert int(bn.num_batches_tracked) == 2


def test_recalibrate_bn_restores_flags_and_momentum() -> None:
    model = _single_bn()
    model.eval()
    model[0].train()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    lrfx.recalibrate_bn(model, [torch.randn(4, 3, 8, 8), (torch.randn(4, 3, 8, 8),)])
    assert [m.training for m in model.modules()] == flags
    assert model[2].momentum == 0.3
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    # even when a batch fails
    with pytest.raises(RuntimeError):
        lrfx.recalibrate_bn(model, [torch.randn(4, 5, 8, 8)])
    assert [m.training for m in model.modules()] == flags
    assert model[2].momentum == 0.3


def test_recalibrate_bn_counts_and_edge_cases() -> None:
    assert lrfx.recalibrate_bn(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)]) == 0
    assert lrfx.recalibrate_bn(small_cnn(), [torch.randn(2, 3, 16, 16)]) == 1
    with pytest.raises(lrfx.LrfxError, match="at least one batch"):
        lrfx.recalibrate_bn(_single_bn(), [])
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert lrfx.recalibrate_bn(untracked, [torch.randn(2, 3, 8, 8)]) == 0


# --- the CLI --------------------------------------------------------------------------------------

SPEC = "_rewrite_models:small_cnn"


def test_cli_compress_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["compress", SPEC, "--macs", "0.5", "--input", "1x3x16x16", "-o", str(out),
               "--no-progress"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "weights.safetensors", "model.pt2", "report.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["macs_after"] <= report["budget"]["target"] == int(0.5 * report["macs_before"])
    assert report["layers"] and all({"layer", "scheme", "rank", "error"} <= set(r)
                                    for r in report["layers"])
    plan = lrfx.RankPlan.from_json((out / "plan.json").read_text())
    assert {k for k, lp in plan.items() if not lp.dense} == {r["layer"] for r in report["layers"]}
    printed = capsys.readouterr().out
    assert "MACs" in printed and f"wrote {out}" in printed
    program = torch.export.load(out / "model.pt2")
    x = torch.randn(1, 3, 16, 16)
    reloaded = lrfx.load(out, small_cnn(), x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reloaded(x))


def test_cli_compress_with_digits_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    path = tmp_path / "net.pt"
    torch.save(model, path)
    out = tmp_path / "out"
    rc = main(["compress", str(path), "--macs", "0.5", "--input", "1x1x8x8", "-o", str(out),
               "--calibration", "digits", "--calibration-size", "256", "--allocator", "energy",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["whitened"] is True and report["allocator"] == "energy"
    assert report["macs_after"] <= report["budget"]["target"]
    assert (out / "model.pt2").is_file() and (out / "weights.safetensors").is_file()


@pytest.mark.parametrize(
    "budget",
    [["--macs", "0"], ["--macs", "-0.5"], ["--macs", "1.5"], ["--params", "1e-9"],
     ["--macs", "0.5", "--params", "0.5"], []],
    ids=["zero", "negative", "above-1", "unreachable", "both", "neither"],
)
def test_cli_compress_bad_budget_exits_2(
    budget: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = main(["compress", SPEC, *budget, "--input", "1x3x16x16", "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("lrfx compress: error:")  # after progress lines
    assert "budget" in err or "fraction above 1" in err
    assert not out.exists()


def test_cli_compress_unknown_calibration_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["compress", SPEC, "--macs", "0.5", "--input", "1x3x16x16", "-o", str(tmp_path),
               "--calibration", "imagenet"])
    assert rc == 2
    assert "unknown calibration data 'imagenet'" in capsys.readouterr().err
