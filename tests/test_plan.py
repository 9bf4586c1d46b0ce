"""RankPlan: exact JSON round trip, validation of hand-written plans, resolution against a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import lrfx
from lrfx import LayerPlan, RankPlan
from lrfx.plan import FORMAT_VERSION


def docstring_plan() -> RankPlan:
    return RankPlan({
        "layer1.0.conv1": LayerPlan("channel", 16),
        "fc": LayerPlan("svd", 64),
        "layer2.0.conv2": LayerPlan("tucker2", (24, 32)),
    })


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


X = (1, 3, 64, 64)  # layer1 runs at 16x16, layer2 at 8x8


@pytest.fixture(scope="module")
def resnet18_analysis(resnet18: nn.Module) -> lrfx.Analysis:
    return lrfx.analyze(resnet18, torch.randn(X), spectra=False)


# --- data and JSON -------------------------------------------------------------------------------


def test_docstring_plan_round_trips_exactly() -> None:
    plan = docstring_plan()
    text = plan.to_json()
    back = RankPlan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert back["layer2.0.conv2"].rank == (24, 32)
    assert back["fc"].rank == 64
    d = json.loads(text)
    assert d["format"] == "lrfx.RankPlan"
    assert d["version"] == FORMAT_VERSION
    assert d["allocator"] == "manual"
    assert d["layers"]["layer2.0.conv2"] == {"scheme": "tucker2", "rank": [24, 32]}


def test_full_plan_round_trips_through_a_file(tmp_path: Path) -> None:
    plan = RankPlan(
        {
            "a": LayerPlan("channel", 3, weight_shape=(8, 4, 3, 3), macs=100, params=10),
            "b": LayerPlan("dense", weight_shape=(4, 4), macs=16, params=20),
            "c": ("spatial", 2),
            "d": {"scheme": "cp", "rank": 5},
            "e": LayerPlan("tucker2", 4),
        },
        allocator="energy",
        settings={"energy": 0.9, "layers": ("a", "b"), "nested": {"x": [1, 2.5, None, True]}},
        macs=12345,
        params=678,
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    back = RankPlan.from_json(path.read_text())
    assert back == plan
    assert back.to_json() == plan.to_json()
    assert back.to_json(indent=None) == plan.to_json(indent=None)
    assert back["c"] == LayerPlan("spatial", 2)
    assert back["e"].rank == (4, 4)
    assert back["b"].dense and back["b"].rank is None
    assert back.settings["layers"] == ["a", "b"]
    assert (back.allocator, back.macs, back.params) == ("energy", 12345, 678)
    assert set(back.factored) == {"a", "c", "d", "e"}
    assert len(back) == 5 and list(back) == ["a", "b", "c", "d", "e"]
    assert hash(back) == hash(plan)


def test_plan_is_immutable() -> None:
    plan = docstring_plan()
    with pytest.raises(TypeError):
        plan.layers["x"] = LayerPlan("svd", 1)  # type: ignore[index]
    with pytest.raises(AttributeError):
        plan.macs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("scheme", "rank", "match"),
    [
        ("qr", 3, "unknown scheme"),
        ("svd", 0, ">= 1"),
        ("svd", -2, ">= 1"),
        ("channel", (0,), ">= 1"),
        ("tucker2", (0, 3), ">= 1"),
        ("tucker2", (-1, -1), ">= 1"),
        ("tucker2", (1, 2, 3), "two ranks"),
        ("tucker2", (4,), "two ranks"),
        ("svd", (1, 2), "one rank"),
        ("channel", None, "needs a rank"),
        ("dense", 3, "no rank"),
        ("svd", 2.0, "int"),
        ("svd", "3", "int"),
        ("svd", True, "rank"),
        ("tucker2", (2, 2.5), "integers"),
    ],
)
def test_invalid_layer_plans_raise(scheme: str, rank: Any, match: str) -> None:
    with pytest.raises(lrfx.LrfxError, match=match):
        LayerPlan(scheme, rank)
    d: dict[str, Any] = {"scheme": scheme}
    if rank is not None:
        d["rank"] = list(rank) if isinstance(rank, tuple) else rank
    text = json.dumps({"format": "lrfx.RankPlan", "version": 1, "layers": {"conv": d}})
    with pytest.raises(lrfx.LrfxError):
        RankPlan.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        json.dumps({"layers": {}}),  # no format key
        json.dumps({"format": "lrfx.RankPlan", "version": 99, "layers": {}}),
        json.dumps({"format": "lrfx.RankPlan", "layers": []}),
        json.dumps({"format": "lrfx.RankPlan", "layers": {"a": {"scheme": "svd", "rnk": 2}}}),
        json.dumps({"format": "lrfx.RankPlan", "layers": {"": {"scheme": "svd", "rank": 2}}}),
    ],
)
def test_malformed_plan_json_raises(text: str) -> None:
    with pytest.raises(lrfx.LrfxError):
        RankPlan.from_json(text)


def test_bad_plan_settings_raise() -> None:
    with pytest.raises(lrfx.LrfxError, match="finite"):
        RankPlan({}, settings={"e": float("nan")})
    with pytest.raises(lrfx.LrfxError, match="JSON"):
        RankPlan({}, settings={"f": object()})
    with pytest.raises(lrfx.LrfxError):
        RankPlan({"a": 3})  # type: ignore[dict-item]


# --- resolution against a model ------------------------------------------------------------------


def test_resolve_fills_shapes_and_predictions(resnet18_analysis: lrfx.Analysis) -> None:
    a = resnet18_analysis
    resolved = docstring_plan().resolve(a)
    conv1 = resolved["layer1.0.conv1"]
    assert conv1.weight_shape == (64, 64, 3, 3)
    # section 0 channel scheme: r*(C*kh*kw + N)*H'*W', layer1 at 16x16; no bias in resnet convs
    assert conv1.macs == 16 * (64 * 9 + 64) * 16 * 16 == 2621440
    assert conv1.params == 16 * (64 * 9 + 64)
    fc = resolved["fc"]
    assert fc.weight_shape == (1000, 512)
    assert (fc.macs, fc.params) == (64 * (512 + 1000), 64 * (512 + 1000) + 1000)
    t2 = resolved["layer2.0.conv2"]
    assert t2.weight_shape == (128, 128, 3, 3)
    assert t2.macs == 128 * 24 * 64 + 24 * 32 * 9 * 64 + 32 * 128 * 64  # layer2 at 8x8
    assert t2.params == 128 * 24 + 24 * 32 * 9 + 32 * 128
    dense = sum(a[n].macs for n in resolved)
    assert resolved.macs == a.total_macs - dense + conv1.macs + fc.macs + t2.macs
    dense_params = sum(a[n].params for n in resolved)
    assert resolved.params == a.total_params - dense_params + sum(
        lp.params for lp in resolved.values()  # type: ignore[misc]
    )
    # the resolved plan is still data: exact round trip, and resolving again changes nothing
    assert RankPlan.from_json(resolved.to_json()) == resolved
    assert resolved.resolve(a) == resolved
    # the same ranks are kept; the input plan is not modified
    assert [lp.rank for lp in resolved.values()] == [16, 64, (24, 32)]
    assert docstring_plan()["fc"].macs is None


def test_resolve_dense_entry(resnet18_analysis: lrfx.Analysis) -> None:
    a = resnet18_analysis
    resolved = RankPlan({"conv1": LayerPlan("dense")}).resolve(a)
    assert resolved["conv1"].macs == a["conv1"].macs
    assert resolved["conv1"].params == 64 * 3 * 49
    assert resolved.macs == a.total_macs
    assert resolved.params == a.total_params


def test_resolve_shared_layer_counts_every_call(shared_net: nn.Module) -> None:
    a = lrfx.analyze(shared_net, torch.randn(4, 6), spectra=False)
    resolved = RankPlan({"fc": LayerPlan("svd", 2)}).resolve(a)
    assert resolved["fc"].macs == 2 * 4 * 2 * (6 + 6)
    assert resolved["fc"].params == 2 * 12 + 6
    assert resolved.macs == resolved["fc"].macs


def test_resolve_layer_called_at_two_sizes() -> None:
    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.c(x), self.c(x[:, :, ::2, ::2])

    a = lrfx.analyze(Pyramid(), torch.randn(1, 3, 8, 8), spectra=False)
    assert a["c"].macs == 3 * 27 * (64 + 16)
    resolved = RankPlan({"c": LayerPlan("channel", 2)}).resolve(a)
    assert resolved["c"].macs == 2 * (27 + 3) * (64 + 16)  # every call at its own size
    assert resolved["c"].params == 2 * (27 + 3) + 3


def test_unknown_layer_raises_plan_mismatch(resnet18_analysis: lrfx.Analysis) -> None:
    with pytest.raises(lrfx.PlanMismatchError, match=r"layer9\.0\.conv1") as info:
        RankPlan({"layer9.0.conv1": LayerPlan("channel", 4)}).resolve(resnet18_analysis)
    assert info.value.layer == "layer9.0.conv1"
    assert "similar names" in str(info.value)  # hints at layer1.0.conv1 and friends


def test_recorded_weight_shape_mismatch_raises(resnet18_analysis: lrfx.Analysis) -> None:
    plan = RankPlan({"conv1": LayerPlan("channel", 4, weight_shape=(64, 3, 5, 5))})
    with pytest.raises(lrfx.PlanMismatchError, match="conv1") as info:
        plan.resolve(resnet18_analysis)
    assert info.value.layer == "conv1"
    assert "(64, 3, 5, 5)" in str(info.value) and "(64, 3, 7, 7)" in str(info.value)


def test_spatial_on_linear_raises_unsupported(resnet18_analysis: lrfx.Analysis) -> None:
    with pytest.raises(lrfx.UnsupportedLayerError) as info:
        RankPlan({"fc": LayerPlan("spatial", 4)}).resolve(resnet18_analysis)
    msg = str(info.value)
    assert info.value.layer == "fc"
    assert "'fc'" in msg and "spatial" in msg and "linear" in msg


@pytest.mark.parametrize(
    ("layer", "lp", "valid"),
    [
        ("fc", LayerPlan("svd", 513), "1..512"),
        ("layer1.0.conv1", LayerPlan("channel", 65), "1..64"),
        ("layer1.0.conv1", LayerPlan("tucker2", (65, 3)), "1..64 and 1..64"),
        ("conv1", LayerPlan("cp", 148), "1..147"),  # 3 * 7 * 7
        ("conv1", LayerPlan("spatial", 22), "1..21"),  # min(C*kh, N*kw) = min(21, 448)
    ],
)
def test_rank_above_max_raises_with_valid_range(
    resnet18_analysis: lrfx.Analysis, layer: str, lp: LayerPlan, valid: str
) -> None:
    with pytest.raises(lrfx.UnsupportedLayerError, match=layer) as info:
        RankPlan({layer: lp}).resolve(resnet18_analysis)
    assert f"valid ranks: {valid}" in str(info.value)


def test_rank_at_max_is_accepted(resnet18_analysis: lrfx.Analysis) -> None:
    resolved = RankPlan({"fc": LayerPlan("svd", 512)}).resolve(resnet18_analysis)
    assert resolved["fc"].macs == 512 * 1512


def test_scheme_on_layer_without_weight_raises() -> None:
    class MM(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    a = lrfx.analyze(MM(), (torch.randn(3, 4), torch.randn(4, 5)), spectra=False)
    (name,) = a.names
    with pytest.raises(lrfx.UnsupportedLayerError, match=name):
        RankPlan({name: LayerPlan("svd", 2)}).resolve(a)


def test_validate_without_inputs_checks_names_and_shapes(resnet18: nn.Module) -> None:
    plan = docstring_plan()
    assert plan.validate(resnet18) is plan
    shaped = RankPlan({"fc": LayerPlan("svd", 8, weight_shape=(1000, 512))})
    assert shaped.validate(resnet18) is shaped
    with pytest.raises(lrfx.PlanMismatchError, match="layer9"):
        RankPlan({"layer9": LayerPlan("svd", 8)}).validate(resnet18)
    with pytest.raises(lrfx.PlanMismatchError, match=r"\(10, 512\)"):
        RankPlan({"fc": LayerPlan("svd", 8, weight_shape=(10, 512))}).validate(resnet18)


def test_validate_with_inputs_resolves(
    resnet18: nn.Module, resnet18_analysis: lrfx.Analysis
) -> None:
    plan = docstring_plan()
    assert plan.validate(resnet18, torch.randn(X)) == plan.resolve(resnet18_analysis)
    with pytest.raises(lrfx.UnsupportedLayerError):
        RankPlan({"fc": LayerPlan("svd", 600)}).validate(resnet18, torch.randn(X))


def test_validate_without_inputs_accepts_every_layer_analyze_names() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x)[0]

    model = Attn()
    a = lrfx.analyze(model, torch.randn(2, 3, 8), spectra=False)
    plan = RankPlan({"mha.q_proj": LayerPlan("svd", 2)})
    plan.resolve(a)  # fine
    plan.validate(model)
