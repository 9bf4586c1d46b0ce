"""Channel dependency groups, channel plans and structural pruning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import lrfx
from lrfx.errors import LrfxError, PlanMismatchError, UnsupportedLayerError
from lrfx.plan import ChannelPlan, LayerPlan, RankPlan

torch.manual_seed(0)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct BN scales and statistics, so pruning decisions and outputs are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.05)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _roles(group: lrfx.passes.analysis.ChannelGroup) -> set[tuple[str, str, int, int]]:
    return {(m.role, m.target, m.offset, m.inner) for m in group.members}


# --- dependency groups: structural --------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.bna = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.bnb = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(torch.relu(self.bna(self.a(x)))))
        x = torch.relu(x + y)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(torch.flatten(x, 1))


def test_residual_group_couples_both_producers_their_norms_and_consumers() -> None:
    groups = lrfx.channel_groups(Residual(), torch.randn(1, 3, 8, 8))
    g = groups["stem"]
    assert groups["b"] is g and g.channels == 8 and g.prunable
    assert _roles(g) == {("out", "stem", 0, 1), ("norm", "bn0", 0, 1), ("in", "a", 0, 1),
                         ("out", "b", 0, 1), ("norm", "bnb", 0, 1), ("in", "fc", 0, 16)}
    inner = groups["a"]
    assert _roles(inner) == {("out", "a", 0, 1), ("norm", "bna", 0, 1), ("in", "b", 0, 1)}
    assert not groups["fc"].prunable and "output" in groups["fc"].reason


class Dense(nn.Module):
    """DenseNet-style: concatenation, BN over the concatenation, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.out = nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        return self.out(torch.relu(self.bn(torch.cat([a, b], 1))))


def test_concatenation_offsets() -> None:
    groups = lrfx.channel_groups(Dense(), torch.randn(1, 3, 6, 6))
    assert _roles(groups["c1"]) == {("out", "c1", 0, 1), ("in", "c2", 0, 1),
                                    ("norm", "bn", 0, 1), ("in", "out", 0, 1)}
    assert _roles(groups["c2"]) == {("out", "c2", 0, 1), ("norm", "bn", 4, 1),
                                    ("in", "out", 4, 1)}


class SE(nn.Module):
    """Depthwise conv + squeeze-excitation (MobileNetV3 / EfficientNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.project(h * s)


def test_depthwise_and_squeeze_excitation() -> None:
    groups = lrfx.channel_groups(SE(), torch.randn(1, 3, 6, 6))
    g = groups["expand"]
    assert groups["fc2"] is g and g.prunable
    assert _roles(g) == {("out", "expand", 0, 1), ("depthwise", "dw", 0, 1), ("in", "fc1", 0, 1),
                         ("out", "fc2", 0, 1), ("in", "project", 0, 1)}


class ChannelLast(nn.Module):
    """ConvNeXt style: depthwise conv, permute to channels-last, LayerNorm, Linear, layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(nn.functional.gelu(self.up(self.ln(y)))).permute(0, 3, 1, 2)
        return self.head(x + self.scale * y)


def test_upsampling_and_spatial_slicing_keep_the_channels() -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
            self.up, self.out = nn.Upsample(scale_factor=2), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.interpolate(self.a(x)[:, :, ::2, ::2], scale_factor=2.0)
            return self.out(self.up(nn.functional.pad(self.b(y), (1, 1, 1, 1))))

    groups = lrfx.channel_groups(Up(), torch.randn(1, 3, 8, 8))
    assert groups["a"].prunable and groups["b"].prunable
    assert _roles(groups["b"]) == {("out", "b", 0, 1), ("in", "out", 0, 1)}


def test_channel_last_layer_norm_and_layer_scale() -> None:
    groups = lrfx.channel_groups(ChannelLast(), torch.randn(1, 3, 5, 5))
    g = groups["stem"]
    assert groups["down"] is g
    assert _roles(g) == {("out", "stem", 0, 1), ("depthwise", "dw", 0, 1), ("norm", "ln", 0, 1),
                         ("in", "up", 0, 1), ("out", "down", 0, 1), ("param", "scale", 0, 1),
                         ("in", "head", 0, 1)}
    assert _roles(groups["up"]) == {("out", "up", 0, 1), ("in", "down", 0, 1)}


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.p = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.p(self.g(self.a(x)))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.c(self.b(y))


def test_unprovable_coupling_is_left_alone_with_the_reason() -> None:
    groups = lrfx.channel_groups(Shuffle(), torch.randn(1, 3, 6, 6))
    assert groups["a"].prunable and groups["a"].blocks == 2  # the grouped conv's two groups
    assert groups["g"].prunable and groups["g"].blocks == 2
    assert not groups["p"].prunable and "view" in groups["p"].reason
    assert groups["b"].prunable  # after the shuffle, channels are followed again
    with pytest.raises(UnsupportedLayerError, match=r"'p'.*view"):
        lrfx.apply(Shuffle(), RankPlan({"p": ChannelPlan("prune", (0, 1))}),
                   torch.randn(1, 3, 6, 6))


class Grouped(nn.Module):
    """RegNet / ResNeXt style: 1x1, grouped 3x3 (4 groups of 3), 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.bna = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.bng = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bng(self.g(torch.relu(self.bna(self.a(x)))))))


def test_grouped_conv_prunes_the_same_channels_in_every_group() -> None:
    model = _randomize_bn(Grouped())
    x = torch.randn(2, 3, 6, 6)
    groups = lrfx.channel_groups(model, x)
    assert groups["a"].blocks == 4 and groups["g"].blocks == 4
    assert _roles(groups["a"]) == {("out", "a", 0, 1), ("norm", "bna", 0, 1), ("in", "g", 0, 1)}
    # channel 1 of each group of 3 inputs, channel 0 of each group of 2 outputs
    plan = RankPlan({"a": ChannelPlan("prune", (0, 2, 3, 5, 6, 8, 9, 11), 12),
                     "g": ChannelPlan("prune", (1, 3, 5, 7), 8)})
    out = lrfx.apply(model, plan, x)
    assert out.g.groups == 4 and out.g.weight.shape == (4, 2, 3, 3)
    torch.testing.assert_close(out.g.weight, model.g.weight[[1, 3, 5, 7]][:, [0, 2]])
    with torch.no_grad():
        torch.testing.assert_close(out(x), _masked(model, groups, plan)(x))
    assert plan.resolve(lrfx.analyze(model, x, spectra=False)).channels
    with pytest.raises(LrfxError, match=r"'a'.*4 groups of 3.*same channels in every group"):
        lrfx.apply(model, RankPlan({"a": ChannelPlan("prune", (0, 1, 2, 3, 4, 5), 12)}), x)
    auto = lrfx.channel_plan(model, x, percent=0.5)
    assert len(auto["a"].keep) % 4 == 0 and auto.macs == lrfx.count_macs(
        lrfx.apply(model, auto, x), x)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(self.shared(self.a(x))))


def test_module_called_twice_is_not_pruned() -> None:
    groups = lrfx.channel_groups(Twice(), torch.randn(1, 3, 4, 4))
    assert "called 2 times" in groups["a"].reason
    assert not groups["shared"].prunable


# --- the plan entry -------------------------------------------------------------------------------


def test_channel_entry_json_round_trip_and_hand_written_mask() -> None:
    plan = RankPlan({"stem": ChannelPlan.from_mask([1, 0, 1, 1, 0, 1, 1, 1]),
                     "fc": LayerPlan("svd", 3)})
    again = RankPlan.from_json(plan.to_json())
    assert again == plan and again["stem"] == ChannelPlan("prune", (0, 2, 3, 5, 6, 7), 8)
    d = json.loads(plan.to_json())
    assert d["layers"]["stem"] == {"scheme": "prune", "keep": [0, 2, 3, 5, 6, 7], "channels": 8}
    d["layers"]["stem"] = {"scheme": "prune", "mask": [0, 1, 1, 1, 1, 1, 1, 1]}
    assert RankPlan.from_dict(d)["stem"].keep == (1, 2, 3, 4, 5, 6, 7)
    assert set(plan.channels) == {"stem"} and set(plan.factored) == {"fc"}


@pytest.mark.parametrize("entry, match", [
    ({"scheme": "prune", "keep": []}, "every channel"),
    ({"scheme": "prune", "mask": [0, 0, 0]}, "every channel"),
    ({"scheme": "prune", "keep": [2, 1]}, "increasing"),
    ({"scheme": "prune", "keep": [0, 9], "channels": 4}, "channel 9"),
    ({"scheme": "prune", "keep": "0,1"}, "list"),
    ({"scheme": "prune", "keep": [0], "rank": 3}, "unknown keys"),
    ({"scheme": "prune", "keep": [0], "mask": [1]}, "not both"),
])
def test_bad_channel_entries_are_refused(entry: dict, match: str) -> None:
    d = RankPlan({}).to_dict()
    d["layers"] = {"stem": entry}
    with pytest.raises(LrfxError, match=match):
        RankPlan.from_dict(d)


def test_bad_plans_name_the_layer_and_change_nothing() -> None:
    model = Residual().eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(PlanMismatchError, match=r"'stem'.*5 channels.*has 8"):
        lrfx.apply(model, RankPlan({"stem": ChannelPlan.from_mask([1, 1, 0, 1, 1])}), x)
    with pytest.raises(LrfxError, match="'bn0'"):
        lrfx.apply(model, RankPlan({"bn0": ChannelPlan("prune", (0,))}), x)
    with pytest.raises(LrfxError, match=r"'stem' and 'b'.*different channels"):
        lrfx.apply(model, RankPlan({"stem": ChannelPlan("prune", (0, 1), 8),
                                    "b": ChannelPlan("prune", (0, 2), 8)}), x)
    with pytest.raises(UnsupportedLayerError, match=r"'fc'.*output"):
        lrfx.apply(model, RankPlan({"fc": ChannelPlan("prune", (0, 1), 5)}), x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- structural pruning: numerical ----------------------------------------------------------------


def _masked(model: nn.Module, groups: lrfx.passes.analysis.ChannelGroups,
            plan: RankPlan) -> nn.Module:
    """The dense model with the plan's removed channels zeroed at every norm of their group (or
    at the producers, for a group without norms): what structural pruning must compute."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, entry in plan.channels.items():
            g = groups[name]
            gone = torch.ones(g.channels, dtype=torch.bool)
            gone[list(entry.keep)] = False
            norms = [m for m in g.members if m.role == "norm"]
            for m in norms or [m for m in g.members if m.role == "out"]:
                mod = masked.get_submodule(m.target)
                idx = gone.nonzero().flatten() + m.offset
                mod.weight[idx] = 0
                if mod.bias is not None:
                    mod.bias[idx] = 0
    return masked


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0",
                                  "regnet_x_400mf"])
def test_pruned_model_equals_masked_model_on_the_zoo(name: str) -> None:
    model = _randomize_bn(getattr(torchvision.models, name)(), seed=1)
    x = torch.randn(2, 3, 64, 64)
    groups = lrfx.channel_groups(model, x)
    plan = lrfx.channel_plan(model, x, macs=0.5)
    assert plan.channels and set(plan.channels) <= {g.name for g in groups.prunable}
    pruned = lrfx.apply(model, plan, x)
    with torch.no_grad():
        want = _masked(model, groups, plan)(x)
        got = pruned(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # predicted costs are exact
    assert plan.macs == lrfx.count_macs(pruned, x) <= 0.5 * lrfx.count_macs(model, x)
    assert plan.params == sum(p.numel() for p in pruned.parameters())
    report = pruned.meta["lrfx"].report
    assert report.macs_after == plan.macs and len(report.pruned) == len(plan.channels)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "mobilenet_v3_small",
                                  "regnet_y_400mf"])
def test_keeping_every_channel_is_the_identity(name: str) -> None:
    model = _randomize_bn(getattr(torchvision.models, name)())
    x = torch.randn(1, 3, 64, 64)
    groups = lrfx.channel_groups(model, x)
    plan = RankPlan({g.name: ChannelPlan("prune", tuple(range(g.channels)), g.channels)
                     for g in groups.prunable})
    out = lrfx.apply(model, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)


def test_which_channels_go_where() -> None:
    model = _randomize_bn(Dense())
    x = torch.randn(1, 3, 6, 6)
    plan = RankPlan({"c1": ChannelPlan("prune", (1, 3), 4), "c2": ChannelPlan("prune", (0, 4), 5)})
    out = lrfx.apply(model, plan, x)
    assert out.c1.weight.shape == (2, 3, 3, 3) and out.c2.weight.shape == (2, 2, 3, 3)
    torch.testing.assert_close(out.c1.weight, model.c1.weight[[1, 3]])
    torch.testing.assert_close(out.c2.weight, model.c2.weight[[0, 4]][:, [1, 3]])
    # the BN after the concatenation keeps c1's 1, 3 and c2's 0, 4 (at offset 4)
    torch.testing.assert_close(out.bn.running_mean, model.bn.running_mean[[1, 3, 4, 8]])
    torch.testing.assert_close(out.out.weight, model.out.weight[:, [1, 3, 4, 8]])
    assert out.bn.num_features == 4 and out.out.in_channels == 4


def test_linear_after_flatten_keeps_each_channels_features() -> None:
    model = _randomize_bn(Residual())
    x = torch.randn(1, 3, 8, 8)
    out = lrfx.apply(model, RankPlan({"stem": ChannelPlan("prune", (2, 5), 8)}), x)
    cols = [c * 16 + j for c in (2, 5) for j in range(16)]
    torch.testing.assert_close(out.fc.weight, model.fc.weight[:, cols])
    assert out.b.weight.shape == (2, 6, 3, 3) and out.a.weight.shape == (6, 2, 3, 3)


def test_channel_last_model_prunes_layer_norm_and_layer_scale() -> None:
    model = ChannelLast().eval()
    x = torch.randn(1, 3, 5, 5)
    out = lrfx.apply(model, RankPlan({"stem": ChannelPlan("prune", (0, 2, 4), 8),
                                      "up": ChannelPlan("prune", tuple(range(0, 16, 2)), 16)}), x)
    assert out.ln.normalized_shape == (3,) and out.scale.shape == (3, 1, 1)
    assert out.dw.groups == 3 and out.up.weight.shape == (8, 3) and out.down.weight.shape == (3, 8)
    assert out(x).shape == model(x).shape


# --- allocation -----------------------------------------------------------------------------------


def test_percent_prunes_the_lowest_scales_globally_and_keeps_a_channel_per_group() -> None:
    model = Residual().eval()
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([0.9, 0.01, 0.8, 0.02, 0.7, 0.6, 0.5, 0.4]))
        model.bnb.weight.copy_(torch.tensor([0.9, 0.03, 0.8, 0.02, 0.7, 0.6, 0.5, 0.4]))
        model.bna.weight.copy_(torch.tensor([0.001, 0.002, 0.003, 0.004, 0.005, 0.006]))
    x = torch.randn(1, 3, 8, 8)
    plan = lrfx.channel_plan(model, x, percent=10 / 14)
    # the residual group's score is the mean over bn0 and bnb; the inner group has the lowest
    assert plan["a"].keep == (5,)  # min_channels: its best channel stays
    assert plan["stem"].keep == (0, 2, 4, 5)
    assert plan.allocator == "slimming" and plan.settings["percent"] == pytest.approx(10 / 14)


def test_budget_is_met_with_the_fewest_channels_pruned() -> None:
    model = _randomize_bn(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    dense = lrfx.count_macs(model, x)
    plan = lrfx.channel_plan(model, x, macs=0.4)
    assert plan.macs <= 0.4 * dense
    # one channel fewer pruned (the same global order, by percent) misses the budget
    k = plan.settings["pruned"]
    n = sum(g.channels for g in lrfx.channel_groups(model, x).prunable)
    fewer = lrfx.channel_plan(model, x, percent=(k - 0.5) / n)
    assert k > 0 and fewer.macs > 0.4 * dense
    looser = lrfx.channel_plan(model, x, macs=0.6)
    assert looser.settings["pruned"] < plan.settings["pruned"] and looser.macs > plan.macs
    with pytest.raises(lrfx.BudgetInfeasibleError, match="macs"):
        lrfx.channel_plan(model, x, macs=0.001)
    with pytest.raises(LrfxError, match="exactly one"):
        lrfx.channel_plan(model, x, macs=0.5, percent=0.5)


def test_model_without_bn_needs_scores() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(LrfxError, match="no BatchNorm"):
        lrfx.channel_plan(model, x, percent=0.5)
    norms = model[0].weight.detach().flatten(1).norm(dim=1)
    plan = lrfx.channel_plan(model, x, percent=0.5, scores={"0": norms})
    assert plan["0"].keep == tuple(sorted(torch.argsort(norms, descending=True)[:4].tolist()))
    with pytest.raises(LrfxError, match=r"3 values.*8 channels"):
        lrfx.channel_plan(model, x, percent=0.5, scores={"0": torch.ones(3)})


# --- round trips ----------------------------------------------------------------------------------


def test_pruned_and_factored_model_saves_loads_and_exports(tmp_path) -> None:
    model = _randomize_bn(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    plan = lrfx.channel_plan(model, x, macs=0.5)
    plan = RankPlan({**plan.layers, "fc": LayerPlan("svd", 16)})
    gm = lrfx.apply(model, plan, x)
    assert type(gm.fc).__name__ == "Factored" and gm.meta["lrfx"].plan.macs == lrfx.count_macs(
        gm, x)
    lrfx.save(gm, tmp_path / "m")
    back = lrfx.load(tmp_path / "m", model, x)
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x))
    assert back.meta["lrfx"].plan == gm.meta["lrfx"].plan
    onnx = pytest.importorskip("onnxruntime")
    path = lrfx.export(gm, tmp_path / "m.onnx", x, format="onnx")
    sess = onnx.InferenceSession(str(path))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), gm(x), rtol=1e-4, atol=1e-4)


def test_mean_normalization_ranks_channels_within_their_layer() -> None:
    model = Residual().eval()
    with torch.no_grad():  # the inner group's scales are all small, but some far less than others
        model.bna.weight.copy_(torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.0001]))
        model.bn0.weight.fill_(1.0)
        model.bnb.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(1, 3, 8, 8)
    raw = lrfx.channel_plan(model, x, percent=4 / 14)
    assert "a" in raw and len(raw["a"].keep) == 2 and "stem" not in raw  # the small layer goes
    norm = lrfx.channel_plan(model, x, percent=4 / 14, normalize="mean")
    # relative to their means (0.025 and 1): 0.004, 0.4 (inner), 0.75 (residual), 0.8 (inner)
    assert norm["a"].keep == (2, 3, 4) and norm["stem"].keep == (1, 2, 3, 4, 5, 6, 7)
    assert norm.settings["normalize"] == "mean"
    with pytest.raises(LrfxError, match="normalize"):
        lrfx.channel_plan(model, x, percent=0.5, normalize="max")
