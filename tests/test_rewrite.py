"""The rewrite: ``lrfx.apply`` / the ``factorize`` pass.

Numerical (full rank is exact over random conv geometries, an exactly rank-r weight is exact at
rank r, truncation error is the Eckart-Young value), structural (which nodes and modules, in
which order, with which shapes and state_dict keys), MACs (plan == rewritten graph ==
FlopCounterMode / 2), shared weights, functional layers, attention, leaf modules, bad input.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _rewrite_models import (
    GatedNet,
    SmallCNN,
    Wrap,
    conv_geometries,
    effective_weight,
    flop_macs,
    full_rank,
    make_conv,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import lrfx
from lrfx.modules import Factored, LowRankMultiheadAttention

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def call_modules(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def extra(gm: fx.GraphModule) -> dict[str, object]:
    return dict(gm.meta["lrfx"].extra)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- numerical: full rank is exact ----------------------------------------------------------------


@PROPERTY
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_svd_full_rank_linear_is_exact(
    n: int, m: int, lead: list[int], bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = Wrap(nn.Linear(n, m, bias=bias))
    x = torch.randn(*lead, n)
    r = min(n, m)
    assert lrfx.analyze(model, x, spectra=False)["layer"].max_rank("svd") == r
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan("svd", r)}, x)
    assert isinstance(gm.layer, Factored)
    assert rel_err(gm(x), model(x)) < 1e-5


def _check_conv_full_rank(dims: int, scheme: str, geo: dict[str, object]) -> None:
    conv, x = make_conv(dims, geo)
    model = Wrap(conv)
    r = full_rank(conv, scheme)
    rec = lrfx.analyze(model, x, spectra=False)["layer"]
    assert rec.max_rank(scheme) == r  # lrfx.cost.max_rank agrees with the unfolding's size
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, r)}, x)
    assert isinstance(gm.layer, Factored) and gm.layer.scheme == scheme
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_channel_full_rank_conv_is_exact(dims: int) -> None:
    @PROPERTY
    @given(geo=conv_geometries(dims, grouped=True))
    def check(geo: dict[str, object]) -> None:
        _check_conv_full_rank(dims, "channel", geo)

    check()


@pytest.mark.parametrize("scheme", ["spatial", "tucker2"])
def test_conv2d_full_rank_is_exact(scheme: str) -> None:
    @PROPERTY
    @given(geo=conv_geometries(2, grouped=False, spatial_kernel=scheme == "spatial"))
    def check(geo: dict[str, object]) -> None:
        _check_conv_full_rank(2, scheme, geo)

    check()


class MixedNet(nn.Module):
    """Every scheme in one model, with BN, residual add, Conv1d, and a 3-D Linear input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.block1 = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), bias=False)
        self.block2 = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.seq = nn.Conv1d(12, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.block2(torch.relu(self.block1(x)))
        x = self.down(x).flatten(2)  # (B, 12, L)
        x = self.seq(x).transpose(1, 2)  # (B, L, 6)
        return self.head(x)


MIXED_FULL = {
    "stem": lrfx.LayerPlan("spatial", 9),
    "block1": lrfx.LayerPlan("channel", 8),
    "block2": lrfx.LayerPlan("tucker2", (8, 8)),
    "down": lrfx.LayerPlan("channel", 6),
    "seq": lrfx.LayerPlan("channel", 6),
    "head": lrfx.LayerPlan("svd", 5),
}


def test_whole_model_full_rank_parity() -> None:
    model = MixedNet().eval()
    x = torch.randn(2, 3, 12, 12)
    gm = lrfx.apply(model, MIXED_FULL, x)
    assert all(isinstance(gm.get_submodule(n), Factored) for n in MIXED_FULL)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5
        x2 = torch.randn(3, 3, 12, 12)  # another batch size works too
        assert rel_err(gm(x2), model(x2)) < 1e-5


def test_float64_model_full_rank_is_exact_to_float64_precision() -> None:
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    plan = {"conv1": lrfx.LayerPlan("channel", 8), "conv2": lrfx.LayerPlan("spatial", 24),
            "fc": lrfx.LayerPlan("svd", 10)}
    gm = lrfx.apply(model, plan, x)
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-12


# --- numerical: exact rank r, Eckart-Young --------------------------------------------------------


def _rank_r_weight(scheme: str, shape: tuple[int, ...], r: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(r)
    if scheme == "svd":
        m, n = shape
        return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    n, c, kh, kw = shape
    if scheme == "channel":
        return (torch.randn(n, r, generator=g) @ torch.randn(r, c * kh * kw, generator=g)
                ).reshape(shape)
    assert scheme == "spatial"
    m = torch.randn(c * kh, r, generator=g) @ torch.randn(r, n * kw, generator=g)
    return m.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()


def _unfolding(scheme: str, w: torch.Tensor) -> torch.Tensor:
    if scheme in ("svd", "channel"):
        return w.reshape(w.shape[0], -1)
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def _layer_for(scheme: str) -> tuple[nn.Module, torch.Tensor]:
    if scheme == "svd":
        return nn.Linear(10, 12), torch.randn(4, 10)
    return nn.Conv2d(5, 7, (3, 2), padding=1), torch.randn(2, 5, 8, 8)


@pytest.mark.parametrize("scheme", ["svd", "channel", "spatial"])
def test_exactly_rank_r_weight_is_reproduced_at_rank_r(scheme: str) -> None:
    layer, x = _layer_for(scheme)
    r = 3
    with torch.no_grad():
        layer.weight.copy_(_rank_r_weight(scheme, tuple(layer.weight.shape), r))
    model = Wrap(layer)
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, r)}, x)
    assert gm.layer.rank == r
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5
    assert rel_err(effective_weight(gm.layer), layer.weight) < 1e-5
    # one rank less is visibly not enough: the test above can fail
    gm1 = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, r - 1)}, x)
    with torch.no_grad():
        assert rel_err(gm1(x), model(x)) > 1e-3


@pytest.mark.parametrize("scheme", ["svd", "channel", "spatial"])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_truncation_error_is_eckart_young(scheme: str, r: int) -> None:
    layer, x = _layer_for(scheme)
    model = Wrap(layer)
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, r)}, x)
    w = layer.weight.detach().double()
    err = float((effective_weight(gm.layer) - w).norm())
    s = torch.linalg.svdvals(_unfolding(scheme, w))
    expected = float(s[r:].square().sum().sqrt())
    assert expected > 1e-2 * float(w.norm())  # the truncation really drops something
    assert err == pytest.approx(expected, rel=1e-4)


# --- structural -----------------------------------------------------------------------------------


def test_channel_rewrite_nodes_modules_and_shapes() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    gm = lrfx.apply(model, {"conv2": lrfx.LayerPlan("channel", 5)}, x)
    assert call_modules(gm) == ["conv1", "bn1", "conv2.0", "conv2.1", "pool", "fc"]
    f = gm.conv2
    assert isinstance(f, Factored) and f.scheme == "channel" and f.rank == 5
    a, b = f
    assert isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d)
    assert (a.in_channels, a.out_channels, a.kernel_size) == (8, 5, (3, 3))
    assert (a.stride, a.padding, a.dilation, a.groups) == ((2, 2), (1, 1), (1, 1), 1)
    assert a.bias is None
    assert (b.in_channels, b.out_channels, b.kernel_size, b.stride) == (5, 16, (1, 1), (1, 1))
    assert b.bias is None  # the dense conv2 had no bias
    # the two factor nodes are chained: conv2.0 feeds conv2.1, which feeds what conv2 fed
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    assert nodes["conv2.1"].args[0] is nodes["conv2.0"]
    assert nodes["conv2.0"].args[0].target is torch.relu
    assert [u.target for u in nodes["conv2.1"].users] == [torch.relu]
    # shapes recorded on the rewritten graph
    assert tuple(nodes["conv2.0"].meta["tensor_meta"].shape) == (1, 5, 8, 8)
    assert tuple(nodes["conv2.1"].meta["tensor_meta"].shape) == (1, 16, 8, 8)
    recs = extra(gm)["rewrites"]
    assert [(r.name, r.path, r.nodes) for r in recs] == [("conv2", "conv2", ("conv2_0", "conv2_1"))]


def test_channel_rewrite_keeps_bias_on_the_last_factor_and_documented_state_dict_keys() -> None:
    model = Wrap(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(1, 4, 6, 6)
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan("channel", 2)}, x)
    assert set(gm.state_dict()) == {"layer.0.weight", "layer.1.weight", "layer.1.bias"}
    assert gm.state_dict()["layer.0.weight"].shape == (2, 4, 3, 3)
    assert gm.state_dict()["layer.1.weight"].shape == (6, 2, 1, 1)
    torch.testing.assert_close(gm.state_dict()["layer.1.bias"], model.layer.bias.detach())


def test_spatial_and_tucker2_structure() -> None:
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = Wrap(conv)
    x = torch.randn(1, 4, 11, 13)
    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan("spatial", 3)}, x)
    assert call_modules(gm) == ["layer.0", "layer.1"]
    v, h = gm.layer
    assert (v.in_channels, v.out_channels, v.kernel_size) == (4, 3, (3, 1))
    assert (v.stride, v.padding, v.dilation) == ((2, 1), (1, 0), (1, 1))
    assert (h.in_channels, h.out_channels, h.kernel_size) == (3, 6, (1, 5))
    assert (h.stride, h.padding, h.dilation) == ((1, 1), (0, 2), (1, 2))
    assert v.bias is None and h.bias is not None

    gm = lrfx.apply(model, {"layer": lrfx.LayerPlan("tucker2", (2, 3))}, x)
    assert call_modules(gm) == ["layer.0", "layer.1", "layer.2"]
    first, core, last = gm.layer
    assert gm.layer.rank == (2, 3)
    assert (first.in_channels, first.out_channels, first.kernel_size) == (4, 2, (1, 1))
    assert (core.in_channels, core.out_channels, core.kernel_size) == (2, 3, (3, 5))
    assert (core.stride, core.padding, core.dilation) == ((2, 1), (1, 2), (1, 2))
    assert (last.in_channels, last.out_channels, last.kernel_size) == (3, 6, (1, 1))
    assert first.bias is None and core.bias is None and last.bias is not None
    assert set(gm.state_dict()) == {
        "layer.0.weight", "layer.1.weight", "layer.2.weight", "layer.2.bias"
    }


def test_svd_rewrite_structure_and_unplanned_layers_untouched() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 4)}, x)
    assert call_modules(gm) == ["conv1", "bn1", "conv2", "pool", "fc.0", "fc.1"]
    a, b = gm.fc
    assert (a.in_features, a.out_features, a.bias) == (16, 4, None)
    assert (b.in_features, b.out_features) == (4, 10)
    assert isinstance(gm.conv1, nn.Conv2d) and isinstance(gm.conv2, nn.Conv2d)
    for name in ("conv1", "conv2", "bn1"):
        for k, v in gm.get_submodule(name).state_dict().items():
            assert torch.equal(v, model.get_submodule(name).state_dict()[k]), f"{name}.{k}"


def test_the_users_model_is_never_modified_nor_shared() -> None:
    model = MixedNet().eval()
    x = torch.randn(1, 3, 12, 12)
    before = state_copy(model)
    modules_before = [type(m) for m in model.modules()]
    gm = lrfx.apply(model, {"block1": lrfx.LayerPlan("channel", 2),
                            "head": lrfx.LayerPlan("svd", 2)}, x)
    after = model.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert isinstance(model.block1, nn.Conv2d) and not model.training
    # no tensor of the rewritten module aliases one of the user's model
    theirs = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    ours = {t.data_ptr() for t in gm.state_dict().values() if t.numel()}
    assert not theirs & ours
    # training the rewritten model does not touch the user's weights
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm.train()
    gm(x).square().sum().backward()
    opt.step()
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_a_layer_called_twice_is_factored_once_and_both_calls_use_it() -> None:
    model = CalledTwice()
    x = torch.randn(4, 6)
    gm = lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 6)}, x)
    assert call_modules(gm) == ["fc.0", "fc.1", "fc.0", "fc.1", "out"]
    assert sum(isinstance(m, Factored) for m in gm.modules()) == 1
    assert rel_err(gm(x), model(x)) < 1e-5
    # MACs of both calls are counted, once per call
    plan = extra(gm)["plan"]
    assert plan["fc"].macs == 2 * 4 * 6 * (6 + 6)
    low = lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 2)}, x)
    assert len(list(low.fc.parameters())) == 3  # one set of factors (+ bias)
    assert extra(low)["macs_after"] == 2 * 4 * 2 * (6 + 6) + 4 * 6 * 3


class SharedWeight(nn.Module):
    """Two Linear layers holding the same weight Parameter (tied weights)."""

    def __init__(self, bias_b: bool = True, share_bias: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5, bias=bias_b)
        self.b.weight = self.a.weight
        if share_bias:
            self.b.bias = self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 2.0 * self.b(x)


def _both(r: int) -> dict[str, lrfx.LayerPlan]:
    return {"a": lrfx.LayerPlan("svd", r), "b": lrfx.LayerPlan("svd", r)}


def test_a_shared_weight_stays_shared_after_factoring() -> None:
    model = SharedWeight()
    x = torch.randn(3, 6)
    gm = lrfx.apply(model, _both(3), x)
    assert gm.a[0].weight is gm.b[0].weight
    assert gm.a[1].weight is gm.b[1].weight
    assert gm.a[1].bias is not gm.b[1].bias  # the biases were not shared
    torch.testing.assert_close(gm.b[1].bias, model.b.bias)
    full = lrfx.apply(model, _both(5), x)
    assert rel_err(full(x), model(x)) < 1e-5


def test_shared_weight_with_a_bias_free_second_layer() -> None:
    model = SharedWeight(bias_b=False)
    x = torch.randn(3, 6)
    gm = lrfx.apply(model, _both(5), x)
    assert gm.a[0].weight is gm.b[0].weight
    assert gm.b[1].bias is None
    assert rel_err(gm(x), model(x)) < 1e-5


def test_a_shared_bias_stays_shared_after_factoring() -> None:
    model = SharedWeight(share_bias=True)
    x = torch.randn(3, 6)
    gm = lrfx.apply(model, _both(3), x)
    assert gm.a[0].weight is gm.b[0].weight
    assert gm.a[1].bias is gm.b[1].bias


def test_depthwise_conv_is_not_factorable() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    x = torch.randn(1, 4, 8, 8)
    rec = lrfx.analyze(model, x, spectra=False)["0"]
    assert not rec.factorable and "depthwise" in rec.note
    before = state_copy(model)
    with pytest.raises(lrfx.UnsupportedLayerError, match=r"'0'.*depthwise") as info:
        lrfx.apply(model, {"0": lrfx.LayerPlan("channel", 1)}, x)
    assert info.value.layer == "0"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- functional layers with module-owned weights --------------------------------------------------


class FConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1)


class FLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = FConv()
        self.head = FLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(x)).mean((2, 3)))


@pytest.mark.parametrize("scheme,rank", [("channel", 8), ("spatial", 12), ("tucker2", (4, 8))])
def test_functional_layers_are_rewritten_and_exact_at_full_rank(
    scheme: str, rank: int | tuple[int, int]
) -> None:
    model = FNet()
    x = torch.randn(2, 4, 9, 9)
    a = lrfx.analyze(model, x, spectra=False)
    assert a.names == ["block", "head"]
    plan = {"block": lrfx.LayerPlan(scheme, rank), "head": lrfx.LayerPlan("svd", 5)}
    gm = lrfx.apply(model, plan, x)
    fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.conv2d not in fns and F.linear not in fns
    assert fns.count(operator.add) == 2  # the original biases, added after the factors
    mods = call_modules(gm)
    assert mods[-2:] == ["head_lowrank.0", "head_lowrank.1"]
    assert all(m.startswith("block_lowrank.") for m in mods[:-2])
    assert isinstance(gm.block_lowrank, Factored) and gm.block_lowrank.scheme == scheme
    assert rel_err(gm(x), model(x)) < 1e-5
    assert extra(gm)["macs_after"] == extra(gm)["plan"].macs


def test_functional_rewrite_drops_the_dense_weight() -> None:
    model = FNet()
    x = torch.randn(2, 4, 9, 9)
    plan = {"block": lrfx.LayerPlan("channel", 2), "head": lrfx.LayerPlan("svd", 2)}
    gm = lrfx.apply(model, plan, x)
    assert "block.weight" not in gm.state_dict()
    assert "head.weight" not in gm.state_dict()
    assert sum(p.numel() for p in gm.parameters()) == extra(gm)["plan"].params


# --- MACs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        {"stem": lrfx.LayerPlan("spatial", 3)},
        {"block1": lrfx.LayerPlan("channel", 3), "down": lrfx.LayerPlan("channel", 2)},
        {"block2": lrfx.LayerPlan("tucker2", (2, 5)), "seq": lrfx.LayerPlan("channel", 2)},
        {"head": lrfx.LayerPlan("svd", 2)},
        MIXED_FULL,
    ],
    ids=["spatial", "channel-grouped", "tucker2-conv1d", "svd", "all-full"],
)
def test_macs_of_rewritten_graph_equal_plan_and_flop_counter(
    plan: dict[str, lrfx.LayerPlan]
) -> None:
    model = MixedNet().eval()
    x = torch.randn(2, 3, 12, 12)
    gm = lrfx.apply(model, plan, x)
    predicted = extra(gm)["plan"].macs
    assert extra(gm)["macs_after"] == predicted
    assert lrfx.run_analysis(gm, x, spectra=False).total_macs == predicted
    assert flop_macs(gm, x) == predicted
    assert extra(gm)["macs_before"] == flop_macs(model, x)
    # parameters of the rewritten module match the plan's prediction
    assert sum(p.numel() for p in gm.parameters()) == extra(gm)["plan"].params


def test_macs_equal_hand_computed_values() -> None:
    model = SmallCNN().eval()  # conv1 3->8 @16x16, conv2 8->16 stride 2 -> 8x8, fc 16->10
    x = torch.randn(1, 3, 16, 16)
    r1, r2, rf = 2, 5, 3
    plan = {"conv1": lrfx.LayerPlan("spatial", r1), "conv2": lrfx.LayerPlan("channel", r2),
            "fc": lrfx.LayerPlan("svd", rf)}
    gm = lrfx.apply(model, plan, x)
    conv1 = r1 * 3 * 3 * 16 * 16 + 8 * r1 * 3 * 16 * 16
    conv2 = r2 * (8 * 9 + 16) * 8 * 8
    fc = rf * (16 + 10)
    resolved = extra(gm)["plan"]
    assert (resolved["conv1"].macs, resolved["conv2"].macs, resolved["fc"].macs) == (
        conv1, conv2, fc)
    assert extra(gm)["macs_after"] == conv1 + conv2 + fc
    assert extra(gm)["macs_before"] == 3 * 8 * 9 * 256 + 8 * 16 * 9 * 64 + 160
    report = {row["layer"]: row for row in extra(gm)["report"]}
    assert report["conv2"]["macs_before"] == 8 * 16 * 9 * 64
    assert report["conv2"]["macs_after"] == conv2


# --- attention, ViT, leaf modules -----------------------------------------------------------------


class AttnNet(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, average: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.ff = nn.Linear(16, 16)
        self.need_weights = need_weights
        self.average = average

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        y, w = self.attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                         need_weights=self.need_weights, average_attn_weights=self.average)
        out = self.ff(y)
        return (out, w) if self.need_weights else out


ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _attn_inputs(batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length, batch = 5, 3
    x = torch.randn(batch, length, 16) if batch_first else torch.randn(length, batch, 16)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, -1] = True
    pad[2, -2:] = True
    return x, causal, pad


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_full_rank_parity(batch_first: bool, need_weights: bool) -> None:
    model = AttnNet(batch_first, need_weights).eval()
    x, causal, pad = _attn_inputs(batch_first)
    plan = {f"attn.{p}": lrfx.LayerPlan("svd", 16) for p in ATTN_PARTS}
    gm = lrfx.apply(model, plan, (x, causal, pad))
    assert isinstance(gm.attn, LowRankMultiheadAttention)
    assert all(isinstance(getattr(gm.attn, p), Factored) for p in ATTN_PARTS)
    assert gm.attn.batch_first == batch_first
    float_mask = torch.randn(5, 5)
    per_head = torch.rand(3 * 4, 5, 5) > 0.6
    per_head[..., 0] = False  # every query sees at least one key
    with torch.no_grad():
        for mask, kpm in ((causal, pad), (float_mask, None), (per_head, pad), (None, None)):
            ref, got = model(x, mask, kpm), gm(x, mask, kpm)
            if need_weights:
                assert rel_err(got[0], ref[0]) < 1e-5
                assert rel_err(got[1], ref[1]) < 1e-5
            else:
                assert rel_err(got, ref) < 1e-5
    assert extra(gm)["macs_after"] == extra(gm)["plan"].macs


def test_multihead_attention_per_head_weights_and_low_rank() -> None:
    model = AttnNet(batch_first=True, need_weights=True, average=False).eval()
    x, causal, pad = _attn_inputs(True)
    gm = lrfx.apply(model, {"attn.q_proj": lrfx.LayerPlan("svd", 16),
                            "attn.v_proj": lrfx.LayerPlan("svd", 16)}, (x, causal, pad))
    assert isinstance(gm.attn.k_proj, nn.Linear) and isinstance(gm.attn.q_proj, Factored)
    with torch.no_grad():
        ref, got = model(x, causal, pad), gm(x, causal, pad)
    assert got[1].shape == ref[1].shape == (3, 4, 5, 5)
    assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
    low = lrfx.apply(model, {"attn.q_proj": lrfx.LayerPlan("svd", 2)}, (x, causal, pad))
    assert low.attn.q_proj[0].weight.shape == (2, 16)
    assert extra(low)["macs_after"] == extra(low)["plan"].macs < extra(low)["macs_before"]


def test_cross_attention_with_kdim_vdim() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attn(q, k, v, need_weights=False)[0]

    model = Cross().eval()
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 7, 8), torch.randn(2, 7, 12))
    plan = {"attn.q_proj": lrfx.LayerPlan("svd", 16), "attn.k_proj": lrfx.LayerPlan("svd", 8),
            "attn.v_proj": lrfx.LayerPlan("svd", 12), "attn.out_proj": lrfx.LayerPlan("svd", 16)}
    gm = lrfx.apply(model, plan, inputs)
    assert gm.attn.k_proj[0].weight.shape == (8, 8)
    with torch.no_grad():
        assert rel_err(gm(*inputs), model(*inputs)) < 1e-5


def _small_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initializes the head
    return vit.eval()


def test_small_vision_transformer_full_rank_parity() -> None:
    model = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    a = lrfx.analyze(model, x, spectra=False)
    linear = [r for r in a if r.kind == "linear" and r.factorable]
    names = {r.name for r in linear}
    assert {f"encoder.layers.encoder_layer_{i}.self_attention.{p}"
            for i in range(2) for p in ATTN_PARTS} <= names
    assert {f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3)} <= names
    plan = {r.name: lrfx.LayerPlan("svd", r.max_rank("svd")) for r in linear}
    gm = lrfx.apply(model, plan, x)
    for i in range(2):
        layer = gm.get_submodule(f"encoder.layers.encoder_layer_{i}")
        assert isinstance(layer.self_attention, LowRankMultiheadAttention)
        assert isinstance(layer.get_submodule("mlp.0"), Factored)
        assert isinstance(layer.get_submodule("mlp.3"), Factored)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5


class EncoderLayerNet(nn.Module):
    """A BERT-style block: torch's own nn.TransformerEncoderLayer (batch_first)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("names", [["layer.linear1"], ["layer.self_attn.q_proj"]])
def test_transformer_encoder_layer_parity(names: list[str]) -> None:
    model = EncoderLayerNet().eval()
    x = torch.randn(2, 5, 16)
    gm = lrfx.apply(model, {n: lrfx.LayerPlan("svd", 16) for n in names}, x)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5


def test_layers_inside_an_untraceable_leaf_are_substituted() -> None:
    model = GatedNet()
    x = torch.randn(3, 4)
    a = lrfx.analyze(model, x, spectra=False)
    assert a["gate.a"].inside_leaf == "gate"
    gm = lrfx.apply(model, {"gate.a": lrfx.LayerPlan("svd", 8), "post": lrfx.LayerPlan("svd", 2)},
                    x)
    assert call_modules(gm) == ["pre", "gate", "post.0", "post.1"]  # the leaf stays one node
    assert isinstance(gm.gate.a, Factored) and isinstance(gm.gate.b, nn.Linear)
    assert rel_err(gm(x), model(x)) < 1e-5
    low = lrfx.apply(model, {"gate.a": lrfx.LayerPlan("svd", 3)}, x)
    assert isinstance(low.gate.a, Factored) and low.gate.a.rank == 3
    assert low.gate.a[0].weight.shape == (3, 8) and low.gate.a[1].weight.shape == (16, 3)
    expected = 3 * 4 * 8 + 3 * 3 * (8 + 16) + 3 * 16 * 2  # pre, gate.a at rank 3, post
    assert extra(low)["macs_after"] == extra(low)["plan"].macs == expected
    assert isinstance(model.gate.a, nn.Linear)  # the user's model is untouched


# --- bad input ------------------------------------------------------------------------------------


def test_plan_naming_missing_layers_fails_before_anything_changes() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    before = state_copy(model)
    plan = lrfx.RankPlan({"fc": lrfx.LayerPlan("svd", 2), "layer1.0.conv1":
                          lrfx.LayerPlan("channel", 4)})
    with pytest.raises(lrfx.PlanMismatchError, match=r"layer1\.0\.conv1") as info:
        lrfx.apply(model, plan, x)
    assert info.value.layer == "layer1.0.conv1"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.fc, nn.Linear)


def test_plan_made_for_other_weight_shapes_is_rejected() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    other = lrfx.RankPlan({"conv2": lrfx.LayerPlan("channel", 4, weight_shape=(32, 8, 3, 3))})
    with pytest.raises(lrfx.PlanMismatchError, match=r"conv2.*\(32, 8, 3, 3\).*\(16, 8, 3, 3\)"):
        lrfx.apply(model, other, x)
    # the same plan through JSON (a plan file made for another model)
    with pytest.raises(lrfx.PlanMismatchError, match="conv2"):
        lrfx.apply(model, lrfx.RankPlan.from_json(other.to_json()), x)
    # a plan resolved against one model, applied to a wider one
    resolved = extra(lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 2)}, x))["plan"]
    wider = Wrap(nn.Linear(16, 20))
    wider_plan = lrfx.RankPlan({"layer": resolved["fc"]})
    with pytest.raises(lrfx.PlanMismatchError, match=r"'layer'.*\(10, 16\)"):
        lrfx.apply(wider, wider_plan, torch.randn(1, 16))


@pytest.mark.parametrize("rank", [0, -1, -5, (0, 3), (2, -1)])
def test_non_positive_ranks_are_rejected_when_building_the_layer_plan(rank: object) -> None:
    scheme = "tucker2" if isinstance(rank, tuple) else "channel"
    with pytest.raises(lrfx.LrfxError, match=">= 1"):
        lrfx.LayerPlan(scheme, rank)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,scheme,rank,valid",
    [
        ("fc", "svd", 11, "1..10"),
        ("conv2", "channel", 17, "1..16"),
        ("conv2", "spatial", 25, "1..24"),
        ("conv2", "tucker2", (9, 4), "1..8 and 1..16"),
    ],
)
def test_ranks_above_the_maximum_are_rejected_with_the_valid_range(
    name: str, scheme: str, rank: int | tuple[int, int], valid: str
) -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(lrfx.UnsupportedLayerError, match=valid) as info:
        lrfx.apply(model, {name: lrfx.LayerPlan(scheme, rank)}, x)
    assert info.value.layer == name
    assert "out of range" in str(info.value)


def test_spatial_on_a_linear_layer_names_scheme_and_layer_kind() -> None:
    model = SmallCNN().eval()
    with pytest.raises(lrfx.UnsupportedLayerError) as info:
        lrfx.apply(model, {"fc": lrfx.LayerPlan("spatial", 2)}, torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "'fc'" in msg and "spatial" in msg and "linear" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_in_a_planned_layer_names_it(bad: float) -> None:
    model = SmallCNN().eval()
    with torch.no_grad():
        model.conv2.weight[3, 1, 0, 2] = bad
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(lrfx.LrfxError, match=r"'conv2'.*NaN/Inf"):
        lrfx.apply(model, {"conv2": lrfx.LayerPlan("channel", 4)}, x)
    # a non-finite weight in a layer the plan leaves alone is not an error
    gm = lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 4)}, x)
    assert isinstance(gm.fc, Factored)


def test_plan_inputs_other_than_a_plan_are_rejected(tmp_path: object) -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(lrfx.LrfxError, match="does not exist"):
        lrfx.apply(model, "no/such/plan.json", x)
    with pytest.raises(lrfx.LrfxError, match="plan must be"):
        lrfx.apply(model, 42, x)  # type: ignore[arg-type]
    with pytest.raises(lrfx.LrfxError, match=r"nn\.Module"):
        lrfx.apply(model.state_dict(), {}, x)  # type: ignore[arg-type]


def test_dense_entries_and_empty_plans_change_nothing() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(model, {"conv2": lrfx.LayerPlan("dense")}, x)
    assert not any(isinstance(m, Factored) for m in gm.modules())
    assert torch.equal(gm(x), model(x))
    assert extra(gm)["macs_after"] == extra(gm)["macs_before"] == extra(gm)["plan"].macs
    gm = lrfx.apply(model, lrfx.RankPlan(), x)
    assert torch.equal(gm(x), model(x))


def test_unbatched_inputs_conv_and_attention() -> None:
    conv = Wrap(nn.Conv2d(3, 6, 3, padding=1))
    x = torch.randn(3, 8, 8)  # (C, H, W): no batch dim
    gm = lrfx.apply(conv, {"layer": lrfx.LayerPlan("channel", 2)}, x)
    assert gm(x).shape == (6, 8, 8)
    assert extra(gm)["macs_after"] == extra(gm)["plan"].macs == flop_macs(gm, x) == 2 * 33 * 64

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    model = Attn().eval()
    x = torch.randn(5, 8)  # (L, E)
    gm = lrfx.apply(model, {f"attn.{p}": lrfx.LayerPlan("svd", 8) for p in ATTN_PARTS}, x)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5


def test_layers_inside_requested_leaf_modules_are_substituted() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.block(x).mean((2, 3)))

    model = Net()
    x = torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(model, {"block.conv": lrfx.LayerPlan("channel", 4)}, x, leaf_modules=[Block])
    assert call_modules(gm) == ["block", "fc"]
    assert isinstance(gm.block.conv, Factored)
    assert rel_err(gm(x), model(x)) < 1e-5
    assert extra(gm)["macs_after"] == extra(gm)["plan"].macs == flop_macs(gm, x)


def test_a_rewritten_model_can_be_rewritten_again() -> None:
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(model, {"fc": lrfx.LayerPlan("svd", 8)}, x)
    again = lrfx.apply(gm, {"fc.1": lrfx.LayerPlan("svd", 4)}, x)
    assert isinstance(again.get_submodule("fc.1"), Factored)
    assert extra(again)["macs_after"] == extra(again)["plan"].macs


@pytest.mark.parametrize("scheme", ["channel", "spatial", "tucker2"])
def test_channels_last_models_keep_channels_last_factors(scheme: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last)
    gm = lrfx.compress(net, x, macs=0.6, scheme=scheme)
    factors = [p for n, p in gm.named_parameters() if p.dim() == 4 and "." in n]
    assert factors
    for p in factors:
        if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:  # otherwise both formats coincide
            assert p.is_contiguous(memory_format=torch.channels_last), p.shape
    assert gm(x).is_contiguous(memory_format=torch.channels_last)
    plain = lrfx.compress(net.to(memory_format=torch.contiguous_format), x.contiguous(),
                          macs=0.6, scheme=scheme)
    torch.testing.assert_close(gm(x), plain(x.contiguous()), rtol=1e-4, atol=1e-5)
