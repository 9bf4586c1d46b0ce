"""Configuration as data (CompressConfig), exclusions and rank bounds, the report's layers-left-
dense and warnings, calibration from what users have, and the CLI's handling of configs, output
folders and factories in the current directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfx
from lrfx.cli import main
from lrfx.config import CompressConfig
from lrfx.contrib.zoo import resnet20

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return resnet20().eval()


def _plan(gm: nn.Module) -> lrfx.RankPlan:
    return lrfx.facts_of(gm).plan


def _report(gm: nn.Module) -> lrfx.CompressionReport:
    return lrfx.facts_of(gm).report


# --- the config object --------------------------------------------------------------------------


def test_config_round_trips_through_json_and_stores_types_by_name() -> None:
    cfg = CompressConfig(macs=0.4, exclude=("fc", nn.Linear, "layer1.*"),
                         min_rank={"layer3": 4, "*": 2}, max_error=0.5, round_to=4,
                         calibration_inputs=0, settings={"rank_min": 3}, allocator="global_sigma")
    assert cfg.exclude == ("fc", "type:Linear", "layer1.*")
    again = CompressConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["min_rank"] == {"layer3": 4, "*": 2}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"macs": 0.5, "params": 0.5}, "one budget"),
    ({"macs": -1}, "macs budget must be positive"),
    ({"allocator": "lcc"}, "unknown allocator 'lcc'.*did you mean 'lc'"),
    ({"min_rank": 0}, "min_rank must be a positive integer"),
    ({"max_rank": {"fc": 2.5}}, r"max_rank\['fc'\] must be a positive integer"),
    ({"max_error": 1.5}, r"max_error must be a relative error in \[0, 1\]"),
    ({"exclude": [3]}, "exclude: a layer selector"),
    ({"calibration_batches": 0}, "calibration_batches must be a positive integer"),
    ({"calibration_inputs": 2.5}, "calibration_inputs must be"),
])
def test_config_rejects_bad_fields_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(lrfx.LrfxError, match=match):
        CompressConfig(**kwargs)


def test_unknown_config_field_gets_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(lrfx.LrfxError, match=r"unknown config field 'exlude'.*'exclude'"):
        CompressConfig.from_dict({"macs": 0.5, "exlude": ["fc"]})
    bad = tmp_path / "cfg.json"
    bad.write_text("{not json")
    with pytest.raises(lrfx.LrfxError, match=r"cfg.json.*not valid JSON"):
        CompressConfig.of(bad)


def test_keyword_arguments_override_the_config_and_a_budget_replaces_the_other() -> None:
    cfg = CompressConfig(params=0.5, allocator="energy")
    merged = CompressConfig.of(cfg, macs=0.3, allocator=None)
    assert (merged.macs, merged.params, merged.allocator) == (0.3, None, "energy")


# --- exclusions, bounds, the report ------------------------------------------------------------


def test_exclusions_by_name_prefix_glob_and_type_stay_dense(net: nn.Module) -> None:
    gm = lrfx.compress(net, X, macs=0.6, exclude=["conv1", "layer1", "layer2.*.conv2", nn.Linear])
    plan, report = _plan(gm), _report(gm)
    factored = set(plan.factored)
    assert factored, "something must still be factored"
    for name in factored:
        assert name != "conv1" and not name.startswith("layer1.") and name != "fc"
        assert not (name.startswith("layer2.") and name.endswith("conv2"))
    assert report.skipped["fc"] == "excluded by the config ('type:Linear')"
    assert report.skipped["layer1.0.conv1"] == "excluded by the config ('layer1')"
    assert report.skipped["layer2.1.conv2"] == "excluded by the config ('layer2.*.conv2')"
    # excluded layers' cost is fixed: the budget still holds for the whole model
    assert report.macs_after <= 0.6 * report.macs_before
    # the config is stored in the plan and the report, and replays to the same plan
    stored = plan.settings["config"]
    assert stored["exclude"] == ["conv1", "layer1", "layer2.*.conv2", "type:Linear"]
    again = lrfx.compress(net, X, CompressConfig.from_dict(stored))
    assert _plan(again).layers == plan.layers
    assert report.config == stored


def test_an_exclusion_naming_no_layer_is_refused_with_the_closest_names(net: nn.Module) -> None:
    with pytest.raises(lrfx.LrfxError, match=r"exclude: 'layer1.0.conv3'.*'layer1.0.conv1'"):
        lrfx.compress(net, X, macs=0.5, exclude=["layer1.0.conv3"])
    with pytest.raises(lrfx.LrfxError, match=r"min_rank: 'fcc'.*'fc'"):
        lrfx.compress(net, X, macs=0.5, min_rank={"fcc": 2})


def test_an_unmatched_glob_is_a_warning(net: nn.Module,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lrfx"):
        gm = lrfx.compress(net, X, macs=0.6, exclude=["decoder.*"])
    assert any("'decoder.*' matches no factorable layer" in w for w in _report(gm).warnings)
    assert "decoder.*" in caplog.text


def test_rank_bounds_and_error_caps_hold_per_layer(net: nn.Module) -> None:
    gm = lrfx.compress(net, X, macs=0.5, min_rank=4, max_rank={"layer3": 12})
    for name, lp in _plan(gm).factored.items():
        ranks = lp.rank if isinstance(lp.rank, tuple) else (lp.rank,)
        assert min(ranks) >= 4, (name, lp)
        if name.startswith("layer3."):
            assert max(ranks) <= 12, (name, lp)
    gm = lrfx.compress(net, X, macs=0.7, max_error=0.3)
    rows = list(_report(gm))
    assert rows and all(r["error"] <= 0.3 + 1e-12 for r in rows)
    unbounded = lrfx.compress(net, X, macs=0.7)
    assert max(r["error"] for r in _report(unbounded)) > 0.3  # the cap changed something


def test_report_lists_layers_left_dense_with_reasons_and_curves(net: nn.Module) -> None:
    gm = lrfx.compress(net, X, macs=0.6, max_rank=2)
    report = _report(gm)
    factored = {r["layer"] for r in report}
    dense = set(report.skipped)
    assert factored.isdisjoint(dense)
    analysis = lrfx.analyze(net, X, spectra=False)
    assert {r.name for r in analysis.factorable} == factored | dense
    assert all(why for why in report.skipped.values())
    for row in report:
        curve = report.curves[row["layer"]]
        assert curve["scheme"] == row["scheme"]
        main = row["rank"][-1] if isinstance(row["rank"], list) else row["rank"]
        i = curve["rank"].index(main)
        assert curve["error"][i] == pytest.approx(row["error"])
        assert curve["error"] == sorted(curve["error"], reverse=True)  # error falls with rank


def test_near_useless_layers_are_warned_about(net: nn.Module,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lrfx"):
        gm = lrfx.compress(net, X, macs=0.05)
    warnings = _report(gm).warnings
    assert len(warnings) == 1 and "near-uselessness" in warnings[0]
    assert "rank 1" in warnings[0] and "layer3.2.conv2" in warnings[0]
    assert "near-uselessness" in caplog.text
    quiet = lrfx.compress(net, X, CompressConfig(macs=0.05, warn_error=None))
    assert _report(quiet).warnings == ()


# --- calibration from what users have ----------------------------------------------------------


class _Counting(TensorDataset):
    reads = 0

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        type(self).reads += 1
        return super().__getitem__(i)


def test_calibration_from_a_dataloader_of_pairs_is_bounded(net: nn.Module) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    data = _Counting(x, y)
    loader = DataLoader(data, batch_size=8)
    gm = lrfx.compress(net, X, macs=0.5, calibration=loader, calibration_batches=3)
    assert _Counting.reads == 24  # 3 batches of 8, not the 64 samples
    assert _report(gm).whitened
    # the same batches given as plain tensors make the same plan
    plain = lrfx.compress(net, X, macs=0.5, calibration=[x[:8], x[8:16], x[16:24]])
    assert _plan(plain).layers == _plan(gm).layers


def test_calibration_inputs_selector_for_dicts() -> None:
    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(features)))

    torch.manual_seed(0)
    m = Keyed().eval()
    batches = [{"features": torch.randn(8, 16), "labels": torch.zeros(8, dtype=torch.long)}
               for _ in range(2)]
    gm = lrfx.compress(m, {"features": torch.randn(1, 16)}, macs=0.6, calibration=batches)
    assert _report(gm).whitened  # "labels" was recognized as the target and left out
    gm2 = lrfx.compress(m, {"features": torch.randn(1, 16)}, macs=0.6, calibration=batches,
                        calibration_inputs=("features",))
    assert _plan(gm2).layers == _plan(gm).layers


def test_a_bad_calibration_batch_is_named(net: nn.Module) -> None:
    good = torch.randn(4, 3, 32, 32)
    with pytest.raises(lrfx.LrfxError, match=r"calibration batch 1.*shape"):
        lrfx.compress(net, X, macs=0.5, calibration=[good, torch.randn(4, 1, 32, 32)])
    with pytest.raises(lrfx.LrfxError, match="calibration holds no batch"):
        lrfx.compress(net, X, macs=0.5, calibration=iter([]))


# --- CLI ---------------------------------------------------------------------------------------


FACTORY = """
from lrfx.contrib.zoo import resnet20
import torch

def build():
    torch.manual_seed(0)
    return resnet20().eval(), torch.randn(1, 3, 32, 32)
"""


def test_cli_takes_a_config_file_a_factory_from_the_current_directory_and_refuses_a_used_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mynets_cfgtest.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"macs": 0.5, "exclude": ["fc", "layer1"], "min_rank": 2}))
    out = tmp_path / "out"
    rc = main(["compress", "mynets_cfgtest:build", "--config", str(cfg), "-o", str(out),
               "--no-progress", "--format", "python"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert "fc" not in {k for k, v in plan["layers"].items() if v.get("scheme") != "dense"}
    assert plan["settings"]["config"]["exclude"] == ["fc", "layer1"]
    assert "layer3.2.conv2" in printed
    # a used folder is refused, nothing in it touched
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = main(["compress", "mynets_cfgtest:build", "--macs", "0.7", "-o", str(out),
               "--no-progress"])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --force replaces lrfx's files and keeps the user's
    (out / "model.py").write_text("stale")
    rc = main(["compress", "mynets_cfgtest:build", "--macs", "0.7", "-o", str(out),
               "--no-progress", "--force", "--exclude", "type:Linear"])
    assert rc == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model.py").exists()  # stale file of the earlier run is gone
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["config"]["macs"] == 0.7


def test_cli_calibration_from_npz_and_image_folder(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.io import write_png

    (tmp_path / "mynets_cfgtest2.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((16, 3, 32, 32)).astype(np.float32),
             y=rng.integers(0, 10, 16))
    rc = main(["compress", "mynets_cfgtest2:build", "--macs", "0.5", "--calibration",
               str(tmp_path / "cal.npz"), "-o", str(tmp_path / "a"), "--no-progress",
               "--format", "python"])
    assert rc == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["whitened"] is True
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    for i in range(4):
        write_png(torch.randint(0, 256, (3, 40 + i, 48), dtype=torch.uint8),
                  str(images / f"{i}.png"))
    rc = main(["compress", "mynets_cfgtest2:build", "--macs", "0.5", "--calibration",
               str(tmp_path / "images"), "-o", str(tmp_path / "b"), "--no-progress",
               "--format", "python"])
    assert rc == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["whitened"] is True


def test_cli_missing_factory_module_says_where_it_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["compress", "no_such_module_xyz:build", "--macs", "0.5", "-o",
               str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no_such_module_xyz" in err and "current directory" in err and "PYTHONPATH" in err


def test_cli_help_has_no_doubled_percent_and_offers_cp(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    assert "90/95/99%" in text and "%%" not in text
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "cp is plan-only" in " ".join(capsys.readouterr().out.split())
