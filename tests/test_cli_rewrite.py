"""The CLI's rewrite commands, in-process: ``lrfx apply``, ``lrfx export``, ``lrfx analyze --json``.

The model is given as ``_rewrite_models:small_cnn`` (a factory in this directory, which pytest
puts on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _rewrite_models import small_cnn

import lrfx
from lrfx.cli import main

SPEC = "_rewrite_models:small_cnn"
PLAN_JSON = {
    "format": "lrfx.RankPlan",
    "version": 1,
    "layers": {
        "conv1": {"scheme": "dense"},
        "conv2": {"scheme": "spatial", "rank": 4},
        "fc": {"scheme": "svd", "rank": 3},
    },
}


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(PLAN_JSON, indent=1))
    return f


def _apply(plan_file: Path, out: Path) -> int:
    return main(["apply", SPEC, str(plan_file), "-o", str(out), "--input", "1x3x16x16"])


def test_apply_writes_the_output_directory(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _apply(plan_file, out) == 0
    printed = capsys.readouterr().out
    for layer in ("conv2", "fc"):
        assert layer in printed
    assert "MACs " in printed and f"wrote {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model_code.py", "plan.json", "report.json", "report.md",
        "report_costs.png", "weights.safetensors"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == SPEC
    assert manifest["input_shapes"] == [[1, 3, 16, 16]]
    saved = lrfx.RankPlan.from_json((out / "plan.json").read_text())
    assert {k: (lp.scheme, lp.rank) for k, lp in saved.items()} == {
        "conv1": ("dense", None), "conv2": ("spatial", 4), "fc": ("svd", 3)
    }
    assert saved["conv2"].weight_shape == (16, 8, 3, 3)
    # the same rewrite done through the Python API gives the same model
    x = torch.randn(2, 3, 16, 16)
    ref = lrfx.apply(small_cnn(), lrfx.RankPlan.from_json(json.dumps(PLAN_JSON)), x[:1])
    loaded = lrfx.load(out, small_cnn(), x[:1])
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    assert manifest["macs_after"] == ref.meta["lrfx"].extra["macs_after"] == saved.macs


def test_export_onnx_from_the_directory_runs_in_onnxruntime(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    out = tmp_path / "out"
    assert _apply(plan_file, out) == 0
    assert main(["export", str(out), "--format", "onnx"]) == 0
    onnx_file = out / "model.onnx"
    assert onnx_file.is_file()
    assert f"wrote {onnx_file}" in capsys.readouterr().out
    x = torch.randn(1, 3, 16, 16)
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_0": x.numpy()})
    ref = lrfx.apply(small_cnn(), lrfx.RankPlan.from_json(json.dumps(PLAN_JSON)), x)
    with torch.no_grad():
        assert float((torch.from_numpy(got) - ref(x)).abs().max()) < 1e-4


def test_export_pt2_to_a_chosen_file(plan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _apply(plan_file, out) == 0
    target = tmp_path / "elsewhere" / "small.pt2"
    assert main(["export", str(out), "--format", "pt2", "-o", str(target)]) == 0
    ep = torch.export.load(str(target))
    x = torch.randn(1, 3, 16, 16)
    ref = lrfx.load(out, small_cnn(), x)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), ref(x))


def test_analyze_json_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "analysis.json"
    code = main(["analyze", SPEC, "--input", "1x3x16x16", "--json", str(target)])
    assert code == 0
    data = json.loads(target.read_text())
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "fc"]
    assert data["input_shapes"] == [[1, 3, 16, 16]]
    assert data["total_macs"] == lrfx.count_macs(small_cnn(), torch.randn(1, 3, 16, 16))
    conv2 = data["layers"][1]
    assert conv2["weight_shape"] == [16, 8, 3, 3]
    assert "channel" in conv2["schemes"] and "rank_at_energy" in conv2
    assert f"wrote {target}" in capsys.readouterr().out


def test_analyze_a_torchvision_model_to_json(tmp_path: Path) -> None:
    target = tmp_path / "sq.json"
    argv = ["analyze", "torchvision:squeezenet1_0", "--input", "1x3x64x64", "--no-spectra",
            "--json", str(target)]
    assert main(argv) == 0
    data = json.loads(target.read_text())
    assert data["model"] and len(data["layers"]) == 26
    assert all("rank_at_energy" not in layer for layer in data["layers"])


@pytest.mark.parametrize("command", ["analyze", "apply"])
@pytest.mark.parametrize("spec", ["no_such_model", "no_such_pkg.models:build",
                                  "torchvision:resnet_nineteen", "_rewrite_models:nothing_here"])
def test_bad_model_spec_exits_2_and_says_how_to_name_a_model(
    command: str, spec: str, plan_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [command, spec]
    if command == "apply":
        argv += [str(plan_file), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrfx {command}: error:")
    assert "torchvision:NAME" in err and "package.module:factory" in err
    assert not (tmp_path / "out").exists()


def test_apply_with_a_plan_for_another_model_exits_2_naming_the_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "resnet_plan.json"
    plan.write_text(json.dumps({"format": "lrfx.RankPlan", "version": 1,
                                "layers": {"layer1.0.conv1": {"scheme": "channel", "rank": 8}}}))
    out = tmp_path / "out"
    assert main(["apply", SPEC, str(plan), "-o", str(out), "--input", "1x3x16x16"]) == 2
    err = capsys.readouterr().err
    assert "layer1.0.conv1" in err
    assert not out.exists()


def test_apply_and_export_usage_errors(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a factory has no documented input size: --input is needed
    assert main(["apply", SPEC, str(plan_file), "-o", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    # a plan file that does not exist
    assert main(["apply", SPEC, str(tmp_path / "missing.json"), "-o", str(tmp_path / "o"),
                 "--input", "1x3x16x16"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # exporting a directory lrfx did not write
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "onnx"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    # an unknown format is an argparse usage error (exit 2 as well)
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "empty"), "--format", "tflite"])
    assert info.value.code == 2


def test_prune_removes_channels_saves_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", SPEC, "--percent", "0.5", "-o", str(out), "--input", "1x3x16x16"]) == 0
    printed = capsys.readouterr().out
    assert "conv1" in printed and "8 -> 4" in printed
    assert "kept whole (no BatchNorm scale): conv2" in printed
    saved = lrfx.RankPlan.from_json((out / "plan.json").read_text())
    assert set(saved.channels) == {"conv1"} and len(saved["conv1"].keep) == 4  # type: ignore
    x = torch.randn(2, 3, 16, 16)
    loaded = lrfx.load(out, small_cnn(), x[:1])
    assert loaded.conv1.weight.shape == (4, 3, 3, 3) and loaded.conv2.weight.shape == (16, 4, 3, 3)
    assert loaded(x).shape == (2, 10)
    assert main(["export", str(out), "--format", "onnx"]) == 0
    assert (out / "model.onnx").exists()
    assert main(["prune", SPEC, "-o", str(tmp_path / "x"), "--input", "1x3x16x16"]) == 2
    assert "one of --macs, --params, --percent" in capsys.readouterr().err
