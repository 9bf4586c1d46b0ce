"""The report as files: report.md names every layer in full, defines "error", lists the layers
left dense with their reasons and the warnings; the PNGs are real images that grow with the
number of layers; an empty report still writes; the CLI writes them next to report.json."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

import lrfx
from lrfx.contrib.zoo import resnet20
from lrfx.report import CompressionReport

LONG = "encoder." + ".".join(f"block{i}" for i in range(20)) + ".attention.output.dense"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _report(n: int, whitened: bool = False) -> CompressionReport:
    rows, curves = [], {}
    for i in range(n):
        name = LONG if i == 0 else f"layer{i}.conv"
        rows.append({"layer": name, "scheme": "channel", "rank": 4 + i, "macs_before": 1000,
                     "macs_after": 400, "params_before": 100, "params_after": 40,
                     "error": 0.1 + 0.01 * i})
        curves[name] = {"scheme": "channel", "rank": list(range(1, 20)),
                        "error": [1 - r / 20 for r in range(1, 20)]}
    return CompressionReport(layers=tuple(rows), macs_before=1000 * n + 5,
                             macs_after=400 * n + 5, params_before=100 * n,
                             params_after=40 * n, allocator="lc", scheme="auto",
                             whitened=whitened, skipped={"fc": "excluded by the config ('fc')"},
                             curves=curves, warnings=("1 layer(s) compressed to uselessness",),
                             config={"macs": 0.4})


def test_markdown_has_full_names_reasons_warnings_and_the_error_definition(tmp_path: Path
                                                                           ) -> None:
    files = _report(3).write(tmp_path)
    assert {f.name for f in files} >= {"report.json", "report.md", "report_costs.png",
                                       "report_error.png", "report_curves_1.png"}
    md = (tmp_path / "report.md").read_text()
    assert f"`{LONG}`" in md  # never truncated
    assert "excluded by the config ('fc')" in md
    assert "compressed to uselessness" in md
    assert "**error**: predicted relative squared error of the layer's weight" in md
    assert "![report_costs](report_costs.png)" in md
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == {
        "fc": "excluded by the config ('fc')"}
    whitened = _report(2, whitened=True)
    assert "output on the calibration data" in whitened.error_definition()


def test_figures_are_pngs_sized_by_layer_count(tmp_path: Path) -> None:
    _report(3).write(tmp_path / "few")
    _report(60).write(tmp_path / "many")
    small = _png_size(tmp_path / "few" / "report_costs.png")
    big = _png_size(tmp_path / "many" / "report_costs.png")
    assert big[1] > 2 * small[1]  # 60 layers get a taller figure
    curves = sorted(p.name for p in (tmp_path / "many").glob("report_curves_*.png"))
    assert curves == ["report_curves_1.png", "report_curves_2.png", "report_curves_3.png"]


def test_an_empty_report_still_writes(tmp_path: Path) -> None:
    empty = CompressionReport(layers=(), macs_before=10, macs_after=10, params_before=5,
                              params_after=5)
    files = empty.write(tmp_path)
    assert (tmp_path / "report.md").read_text().startswith("# lrfx compression report")
    assert all(f.exists() for f in files)


def test_a_real_report_and_its_table(tmp_path: Path) -> None:
    gm = lrfx.compress(resnet20(), torch.randn(1, 3, 32, 32), macs=0.4, exclude=["fc"])
    report = lrfx.facts_of(gm).report
    assert report is not None
    report.write(tmp_path)
    md = (tmp_path / "report.md").read_text()
    for row in report:
        assert f"`{row['layer']}`" in md
    assert "`fc` | excluded by the config ('fc')" in md
    table = report.table()
    assert "error: predicted relative squared error" in table
    assert "left dense" in table
    _png_size(tmp_path / "report_curves_1.png")
