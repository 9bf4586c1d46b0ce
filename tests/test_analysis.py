"""Analysis: MAC acceptance on the torchvision zoo and per-layer records on hand-built models."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import get_model_weights

import lrfx
from lrfx.cost import ConvGeometry, LinearGeometry

FlopMacs = Callable[..., int]

# --- acceptance: the zoo against the published GMACs and FlopCounterMode -------------------------

ZOO = [
    "resnet18",
    "resnet50",
    "vgg16",
    "mobilenet_v2",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
]
ATTENTION = {"vit_b_16", "swin_t"}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_macs_match_published_ops(name: str, flop_macs: FlopMacs) -> None:
    weights = get_model_weights(name).DEFAULT
    crop = weights.transforms.keywords["crop_size"]
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, crop, crop)
    with torch.no_grad():
        macs = lrfx.count_macs(model, x)
        published = weights.meta["_ops"] * 1e9
        assert abs(macs - published) <= 0.005 * published, (macs, published)
        if name not in ATTENTION:
            # conv/linear only: FlopCounterMode counts exactly what lrfx counts
            assert macs == flop_macs(model, x)


# --- per-layer records on a small hand-built CNN -------------------------------------------------


def test_small_cnn_layers(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 8, 8)
    a = lrfx.analyze(small_cnn, x)
    assert a.names == ["conv1", "conv2", "fc"]
    assert [r.kind for r in a] == ["conv2d", "conv2d", "linear"]
    assert [r.weight_shape for r in a] == [(8, 3, 3, 3), (16, 8, 3, 3), (10, 16)]
    conv1_macs = 2 * 8 * 8 * 8 * 3 * 9  # batch * H'W' * N * C * k
    conv2_macs = 2 * 4 * 4 * 16 * 8 * 9
    fc_macs = 2 * 16 * 10
    assert [r.macs for r in a] == [conv1_macs, conv2_macs, fc_macs] == [27648, 36864, 320]
    assert [r.params for r in a] == [8 * 27 + 8, 16 * 72, 16 * 10 + 10]
    assert a.total_macs == conv1_macs + conv2_macs + fc_macs
    assert a.total_params == sum(p.numel() for p in small_cnn.parameters())  # BN included
    assert sum(r.share for r in a) == pytest.approx(1.0, abs=1e-12)
    assert a["conv2"].share == pytest.approx(conv2_macs / a.total_macs)
    assert a.input_shapes == ((2, 3, 8, 8),)
    assert a.model == "SmallCNN"
    assert a.leaves == ()
    assert len(a) == 3 and "fc" in a and "bn1" not in a
    (g,) = a["conv2"].calls
    assert isinstance(g, ConvGeometry)
    assert (g.in_spatial, g.out_spatial, g.stride, g.padding, g.batch, g.bias) == (
        (8, 8), (4, 4), (2, 2), (1, 1), 2, False,
    )
    assert a["conv1"].schemes == ("channel", "spatial", "tucker2", "cp")
    assert a["fc"].schemes == ("svd",)
    assert a["fc"].calls == (LinearGeometry(16, 10, rows=2, bias=True),)
    assert a["conv1"].max_rank("channel") == 8
    assert a["conv1"].max_rank("tucker2") == (3, 8)
    with pytest.raises(KeyError, match="nope"):
        a["nope"]


def test_count_macs_equals_analyze_total(small_cnn: nn.Module, flop_macs: FlopMacs) -> None:
    x = torch.randn(2, 3, 8, 8)
    assert lrfx.count_macs(small_cnn, x) == lrfx.analyze(small_cnn, x, spectra=False).total_macs
    assert lrfx.count_macs(small_cnn, x) == flop_macs(small_cnn, x)


def test_run_analysis_on_a_traced_module(small_cnn: nn.Module) -> None:
    gm = lrfx.trace(small_cnn)
    a = lrfx.run_analysis(gm, torch.randn(1, 3, 8, 8), spectra=False)
    assert a.total_macs == (8 * 8 * 8 * 27) + (4 * 4 * 16 * 72) + 160
    assert gm.meta["lrfx"].provided >= {"graph", "shapes", "layers"}
    assert "spectra" not in gm.meta["lrfx"].provided
    node = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert node.meta["lrfx"].macs == 8 * 8 * 8 * 27
    assert tuple(node.meta["tensor_meta"].shape) == (1, 8, 8, 8)


# --- functional layers with module-owned weights -------------------------------------------------


class FConv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(6, 6 // groups, 3, 3))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1, groups=self.groups)


class FLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fconv = FConv()
        self.gconv = FConv(groups=2)
        self.flin = FLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gconv(torch.relu(self.fconv(x)))  # (2, 6, 2, 2)
        return self.flin(y.permute(0, 2, 3, 1))  # linear over (2, 2, 2, 6)


def test_functional_layers_with_module_owned_weights(flop_macs: FlopMacs) -> None:
    model = Functional()
    x = torch.randn(2, 6, 8, 8)
    a = lrfx.analyze(model, x)
    assert a.names == ["fconv", "gconv", "flin"]
    assert [r.kind for r in a] == ["conv2d", "conv2d", "linear"]
    assert a["fconv"].macs == 2 * 4 * 4 * 6 * 6 * 9
    assert a["fconv"].params == 6 * 6 * 9 + 6
    assert a["gconv"].macs == 2 * 2 * 2 * 6 * 3 * 9
    assert a["gconv"].calls[0].groups == 2  # type: ignore[union-attr]
    assert a["gconv"].schemes == ("channel",)
    assert a["flin"].macs == 2 * 2 * 2 * 6 * 5
    assert a["flin"].params == 30
    assert a["flin"].weight_shape == (5, 6)
    assert a["fconv"].factorable and a["flin"].spectra
    assert a.total_macs == flop_macs(model, x)


def test_functional_conv_positional_arguments() -> None:
    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.weight, None, 2, 2, 2, 2)  # stride, padding, dilation, groups

    x = torch.randn(1, 4, 9, 9)
    (rec,) = lrfx.analyze(Positional(), x).layers
    (g,) = rec.calls
    assert isinstance(g, ConvGeometry)
    assert (g.stride, g.padding, g.dilation, g.groups) == ((2, 2), (2, 2), (2, 2), 2)
    assert g.out_spatial == (5, 5)  # (9 + 4 - 4 - 1) // 2 + 1
    assert rec.macs == 25 * 4 * 2 * 9
    assert rec.name == "weight"


def test_computed_weight_is_counted_but_not_factorable() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.w * 2)

    (rec,) = lrfx.analyze(Computed(), torch.randn(5, 3)).layers
    assert rec.kind == "linear"
    assert rec.macs == 5 * 3 * 4
    assert not rec.factorable
    assert "computed" in rec.note


# --- matmul-like ops -----------------------------------------------------------------------------


class Products(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 7))

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a: (2, 16, 5)
        b = torch.matmul(a, self.w)  # (2, 16, 7)
        c = a @ self.w
        d = a.matmul(self.w)
        e = torch.einsum("bij,bjk->bik", a.transpose(1, 2), b)  # (2, 5, 7)
        return b.sum() + c.sum() + d.sum() + e.sum()


def test_matmul_operator_and_einsum(flop_macs: FlopMacs) -> None:
    model = Products()
    a = torch.randn(2, 16, 5)
    an = lrfx.analyze(model, a)
    assert [r.kind for r in an] == ["matmul", "matmul", "matmul", "einsum"]
    assert [r.macs for r in an] == [2 * 16 * 5 * 7] * 3 + [2 * 5 * 16 * 7]
    for r in an:
        assert r.params == 0 and not r.factorable and r.calls == ()
    assert an.total_macs == flop_macs(model, a)


class BatchedProducts(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a: (2, 3, 5), b: (2, 5, 7)
        c = torch.bmm(a, b)  # (2, 3, 7)
        d = a.bmm(b)
        e = torch.baddbmm(c, a, b)
        f = torch.addmm(c[0], a[0], b[0])
        g = torch.mm(a[1], b[1])
        return c.sum() + d.sum() + e.sum() + f.sum() + g.sum()


def test_bmm_baddbmm_addmm_mm(flop_macs: FlopMacs) -> None:
    model = BatchedProducts()
    a, b = torch.randn(2, 3, 5), torch.randn(2, 5, 7)
    an = lrfx.analyze(model, (a, b))
    assert [r.kind for r in an] == ["bmm", "bmm", "baddbmm", "addmm", "mm"]
    assert [r.macs for r in an] == [2 * 3 * 5 * 7] * 3 + [3 * 5 * 7] * 2
    assert an.total_macs == flop_macs(model, a, b)


def test_bmm_family_is_recorded() -> None:
    # what the bug above does not affect: every product is found, with its kind
    an = lrfx.analyze(BatchedProducts(), (torch.randn(2, 3, 5), torch.randn(2, 5, 7)))
    assert [r.kind for r in an] == ["bmm", "bmm", "baddbmm", "addmm", "mm"]
    assert all(r.macs > 0 and r.params == 0 for r in an)


# --- attention -----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        self.mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, kdim=kdim, vdim=vdim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.mha(q, k, v)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("kdim", "vdim"), [(None, None), (5, 7)])
def test_multihead_attention(
    batch_first: bool, kdim: int | None, vdim: int | None, flop_macs: FlopMacs
) -> None:
    b, length, s, e = 2, 4, 6, 12
    kd, vd = kdim or e, vdim or e
    model = Attention(batch_first, kdim, vdim)
    if batch_first:
        q, k, v = torch.randn(b, length, e), torch.randn(b, s, kd), torch.randn(b, s, vd)
    else:
        q, k, v = torch.randn(length, b, e), torch.randn(s, b, kd), torch.randn(s, b, vd)
    an = lrfx.analyze(model, (q, k, v))
    assert an.names == [
        "mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.attention", "mha.out_proj",
    ]
    macs = {r.name: r.macs for r in an}
    assert macs["mha.q_proj"] == b * length * e * e == 1152
    assert macs["mha.k_proj"] == b * s * kd * e
    assert macs["mha.v_proj"] == b * s * vd * e
    assert macs["mha.attention"] == 2 * b * length * s * e == 1152  # QK^T and AV
    assert macs["mha.out_proj"] == b * length * e * e
    params = {r.name: r.params for r in an}
    assert params["mha.q_proj"] == e * e + e
    assert params["mha.k_proj"] == kd * e + e
    assert params["mha.v_proj"] == vd * e + e
    assert params["mha.out_proj"] == e * e + e
    assert params["mha.attention"] == 0
    assert an["mha.k_proj"].weight_shape == (e, kd)
    assert an["mha.attention"].kind == "attention" and not an["mha.attention"].factorable
    assert an.total_params == sum(p.numel() for p in model.parameters())
    assert an.total_macs == flop_macs(model, q, k, v)  # grad enabled: no fused fast path


def test_scaled_dot_product_attention() -> None:
    class SDPA(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 5)
    (rec,) = lrfx.analyze(SDPA(), (q, k, v)).layers
    assert rec.kind == "attention"
    assert rec.macs == 2 * 4 * 6 * 9 * (8 + 5)  # QK^T: L*S*E, AV: L*S*Ev, per batch*head
    assert rec.params == 0


# --- layers inside leaves ------------------------------------------------------------------------


def test_layers_inside_a_leaf(gated_net: nn.Module, flop_macs: FlopMacs) -> None:
    x = torch.randn(3, 4)
    a = lrfx.analyze(gated_net, x)
    assert a.names == ["pre", "gate.a", "post"]  # gate.b is never called
    rec = a["gate.a"]
    assert rec.inside_leaf == "gate"
    assert rec.kind == "linear"
    assert rec.macs == 3 * 8 * 16
    assert rec.params == 8 * 16 + 16
    assert rec.weight_shape == (16, 8)
    assert rec.factorable and "rows" in rec.spectra
    assert a["pre"].inside_leaf is None
    assert [leaf.name for leaf in a.leaves] == ["gate"]
    assert a.total_macs == 3 * 4 * 8 + 3 * 8 * 16 + 3 * 16 * 2 == flop_macs(gated_net, x)


def test_matmul_inside_a_leaf_is_measured() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(16, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.abs().sum() >= 0:
                return self.fc(x) @ self.w
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = Mixer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(x)

    a = lrfx.analyze(Net(), torch.randn(3, 8))
    assert a.names == ["mix.fc", "mix.<other>"]
    assert a["mix.fc"].macs == 3 * 8 * 16
    assert a["mix.<other>"].macs == 3 * 16 * 4
    assert a["mix.<other>"].inside_leaf == "mix"
    assert a.total_macs == 3 * 8 * 16 + 3 * 16 * 4


def test_transformer_encoder_leaf_is_analyzed_inside() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(x)

    b, t, e, ff = 2, 5, 16, 32
    with torch.no_grad():  # the leaf must still be counted whole (no fused fast path)
        a = lrfx.analyze(Encoder().eval(), torch.randn(b, t, e))
    per_layer = 4 * b * t * e * e + 2 * b * t * t * e + 2 * b * t * e * ff
    assert a.total_macs == 2 * per_layer
    assert all(r.inside_leaf == "enc" for r in a)
    assert a["enc.layers.1.self_attn.q_proj"].macs == b * t * e * e
    assert a["enc.layers.0.linear1"].macs == b * t * e * ff
    assert not any(r.name.endswith("<other>") for r in a)


# --- shared modules ------------------------------------------------------------------------------


def test_shared_module_called_twice(shared_net: nn.Module) -> None:
    a = lrfx.analyze(shared_net, torch.randn(4, 6))
    (rec,) = a.layers
    assert rec.name == "fc"
    assert len(rec.calls) == 2
    assert rec.to_dict()["calls"] == 2
    assert rec.macs == 2 * (4 * 6 * 6)
    assert rec.params == 6 * 6 + 6
    assert a.total_macs == rec.macs
    assert a.total_params == 42


# --- bad input and degenerate models -------------------------------------------------------------


def test_wrong_channel_count_raises_shape_error_naming_the_node(small_cnn: nn.Module) -> None:
    with pytest.raises(lrfx.ShapeError) as info:
        lrfx.analyze(small_cnn, torch.randn(1, 4, 8, 8))
    assert info.value.node == "conv1"
    assert "'conv1'" in str(info.value)
    assert "(1, 4, 8, 8)" in str(info.value)


def test_wrong_flattened_size_raises_shape_error_naming_the_node() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.classifier = nn.Linear(4 * 6 * 6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.conv(x), 1))

    lrfx.analyze(Flat(), torch.randn(1, 3, 6, 6))  # fits
    with pytest.raises(lrfx.ShapeError, match="classifier") as info:
        lrfx.analyze(Flat(), torch.randn(1, 3, 7, 7))
    assert info.value.node == "classifier"
    assert isinstance(info.value, lrfx.LrfxError)


def test_bad_example_inputs_type() -> None:
    with pytest.raises(lrfx.LrfxError, match="example_inputs"):
        lrfx.analyze(nn.Linear(2, 2), {"x": torch.zeros(1, 2)})


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU(), nn.Tanh()), nn.Sequential(nn.BatchNorm1d(3), nn.Softmax(-1))],
    ids=["no-params", "bn-only"],
)
def test_model_without_layers_gives_empty_analysis(model: nn.Module) -> None:
    a = lrfx.analyze(model, torch.randn(2, 3))
    assert a.layers == ()
    assert a.total_macs == 0
    assert a.total_params == sum(p.numel() for p in model.parameters())
    assert a.factorable == ()
    d = json.loads(a.to_json())
    assert d["layers"] == [] and d["total_macs"] == 0
    assert "total: 0 MACs" in a.table()


def test_analysis_never_changes_the_model(small_cnn: nn.Module) -> None:
    small_cnn.train()
    small_cnn.conv2.eval()  # a mixed state must survive too
    before = copy.deepcopy(small_cnn.state_dict())
    lrfx.analyze(small_cnn, torch.randn(4, 3, 8, 8))
    after = small_cnn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert int(small_cnn.bn1.num_batches_tracked) == 0
    assert small_cnn.training and small_cnn.bn1.training
    assert not small_cnn.conv2.training


def test_run_analysis_leaves_graph_module_state_alone() -> None:
    class BNGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.abs().sum() >= 0:
                return self.bn(self.fc(x))
            return x

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), BNGate()).train()
    gm = lrfx.trace(model)
    assert [leaf.name for leaf in gm.meta["lrfx"].leaves] == ["2"]
    before = copy.deepcopy(gm.state_dict())
    a = lrfx.run_analysis(gm, torch.randn(8, 4) * 5 + 3)
    assert a["2.fc"].inside_leaf == "2"
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in gm.modules())


# --- reports -------------------------------------------------------------------------------------


def test_to_json_and_table(small_cnn: nn.Module, gated_net: nn.Module) -> None:
    a = lrfx.analyze(small_cnn, torch.randn(2, 3, 8, 8))
    d = json.loads(a.to_json())
    assert d["total_macs"] == a.total_macs == 27648 + 36864 + 320
    assert d["total_params"] == a.total_params
    assert d["model"] == "SmallCNN"
    assert d["input_shapes"] == [[2, 3, 8, 8]]
    assert [layer["name"] for layer in d["layers"]] == ["conv1", "conv2", "fc"]
    conv1 = d["layers"][0]
    assert conv1["weight_shape"] == [8, 3, 3, 3]
    assert conv1["macs"] == 27648 and conv1["calls"] == 1
    assert set(conv1["rank_at_energy"]) == {"channel", "spatial", "tucker2"}
    assert "singular_values" not in conv1
    full = json.loads(a.to_json(spectra=True, indent=None))
    sv = full["layers"][2]["singular_values"]["rows"]
    assert len(sv) == 1 and len(sv[0]) == 10
    assert sv[0] == sorted(sv[0], reverse=True)

    table = a.table()
    for name in ("conv1", "conv2", "fc"):
        assert any(line.startswith(name) for line in table.splitlines())
    total_line = table.splitlines()[-1]
    assert total_line.startswith("total:")
    assert f"{a.total_macs:,} MACs" in total_line
    assert f"{a.total_params:,} parameters" in total_line
    assert "3 factorable layers" in total_line

    g = lrfx.analyze(gated_net, torch.randn(3, 4))
    assert "leaf module gate" in g.table()
    assert json.loads(g.to_json())["leaves"][0]["name"] == "gate"
    assert json.loads(g.to_json())["layers"][1]["inside_leaf"] == "gate"
