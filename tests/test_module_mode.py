"""Module mode: models whose top level cannot be traced keep their class, and everything works.

Also: factored layers that look like the dense layer they replace, tied weights, and layers whose
forward transforms the weight (weight standardization, parametrizations, weight norm).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

import lrfx
import lrfx.io
from lrfx.modules import Factored


class Gate(nn.Module):
    """Untraceable even with values (a proxy is not a Tensor): a leaf, analyzed with hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("Gate takes a tensor")
        return self.fc(x)


class Classifier(nn.Module):
    """Top-level forward branches on data; has a method of its own and an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.head = nn.Linear(32, 10)
        self.labels = [f"class {i}" for i in range(10)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.relu(self.stem(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, _, _ = x.shape  # FX cannot unpack a Proxy: the top level is untraceable
        if c != 3:
            raise ValueError("expects RGB images")
        return self.head(self.gate(self.features(x)))

    def predict(self, x: torch.Tensor) -> list[str]:
        return [self.labels[i] for i in self(x).argmax(-1).tolist()]


def _full_rank_plan(a: lrfx.Analysis) -> dict[str, lrfx.LayerPlan]:
    out = {}
    for rec in a.factorable:
        scheme = "svd" if rec.kind == "linear" else "channel"
        out[rec.name] = lrfx.LayerPlan(scheme, rec.max_rank(scheme))
    return out


@pytest.fixture(name="clf")
def _clf() -> tuple[nn.Module, torch.Tensor]:
    return Classifier().eval(), torch.randn(2, 3, 12, 12)


def test_untraceable_top_level_uses_module_mode_and_keeps_the_class(clf) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    a = lrfx.analyze(model, x)
    assert a.mode == "module" and "control flow" in a.mode_reason
    assert [leaf.name for leaf in a.leaves] == ["gate"] and a["gate.fc"].inside_leaf == "gate"
    assert "captured in module mode" in a.table()
    assert {"stem", "body.0", "body.2", "gate.fc", "head"} <= {r.name for r in a.factorable}
    out = lrfx.compress(model, x, macs=0.5)
    assert type(out) is Classifier and not isinstance(out, fx.GraphModule)
    assert out is not model
    report = lrfx.facts_of(out).report
    assert report is not None and report.mode == "module"
    assert report.macs_after <= 0.5 * report.macs_before
    assert "module mode" in report.table()
    assert any(isinstance(m, Factored) for m in out.modules())
    assert not any(isinstance(m, Factored) for m in model.modules())  # the user's model: intact
    assert len(out.predict(x)) == 2  # its own methods still work
    with pytest.raises(ValueError, match="RGB"):  # and its own checks
        out(torch.randn(2, 1, 12, 12))


def test_module_mode_full_rank_is_exact_and_matches_fx_figures(clf) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    a = lrfx.analyze(model, x, spectra=False)
    full = lrfx.apply(model, _full_rank_plan(a), x)
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full.features(x), model.features(x), rtol=1e-4, atol=1e-5)
    # MACs are those of the same layers FX counts for the traceable part
    fx_macs = lrfx.analyze(model.body, torch.randn(2, 16, 12, 12), spectra=False).total_macs
    assert a["body.0"].macs + a["body.2"].macs == fx_macs


def test_module_mode_result_trains_in_place(clf) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    out = lrfx.compress(model, x, macs=0.5)
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    before = out(x).detach()
    loss = F.cross_entropy(out(x), torch.tensor([1, 2]))
    loss.backward()
    factored = [m for m in out.modules() if isinstance(m, Factored)]
    assert factored and all(m[0].weight.grad is not None for m in factored)
    opt.step()
    assert not torch.allclose(out(x), before)


def test_module_mode_save_load_roundtrip(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    out = lrfx.compress(model, x, macs=0.5)
    d = lrfx.save(out, tmp_path / "saved")
    manifest = lrfx.io.read_manifest(d)
    assert manifest["mode"] == "module" and manifest["model_class"].endswith("Classifier")
    assert "Factored" in (d / "model_code.py").read_text()
    loaded = lrfx.load(d, model, x)
    assert type(loaded) is Classifier
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)


def test_load_rebuilds_a_model_whose_forward_branches_on_its_weights(tmp_path: Path) -> None:
    class WeightGated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc.weight.abs().sum() > 0:  # all zeros would skip both layers
                return self.fc2(torch.relu(self.fc(x)))
            return x

    model, x = WeightGated().eval(), torch.randn(3, 8)
    out = lrfx.compress(model, x, macs=0.6)
    loaded = lrfx.load(lrfx.save(out, tmp_path / "w"), model, x)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)


def test_module_mode_exports_pt2_and_onnx(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    out = lrfx.compress(model, x, macs=0.5)
    with torch.no_grad():
        ref = out(x)
    f = lrfx.export(out, tmp_path / "m.pt2", x)
    torch.testing.assert_close(torch.export.load(f).module()(x), ref, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    f = lrfx.export(out, tmp_path / "m.onnx", x, format="onnx")
    sess = ort.InferenceSession(str(f))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(lrfx.LrfxError, match="module mode"):
        lrfx.export(out, tmp_path / "m.py", x, format="python")


def test_export_of_data_dependent_model_fails_clearly(tmp_path: Path) -> None:
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    x = torch.ones(2, 8)
    out = lrfx.compress(Checked(), x, macs=0.6)
    with pytest.raises(lrfx.LrfxError, match=r"torch\.export cannot export Checked"):
        lrfx.export(out, tmp_path / "m.pt2", x)


def test_module_mode_is_forced_and_fx_mode_refuses(clf) -> None:  # type: ignore[no-untyped-def]
    model, x = clf
    with pytest.raises(lrfx.TraceError):
        lrfx.analyze(model, x, mode="fx")
    a = lrfx.analyze(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), torch.randn(2, 4),
                     mode="module")
    assert a.mode == "module" and a.total_macs == 2 * (4 * 8 + 8 * 4)
    with pytest.raises(lrfx.LrfxError, match="mode must be"):
        lrfx.analyze(model, x, mode="graph")


def test_factored_layer_looks_like_the_dense_one() -> None:
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Conv1d(24, 8, 3, stride=2))
    x = torch.randn(2, 16)
    gm = lrfx.apply(nn.Sequential(model[0]), {"0": lrfx.LayerPlan("svd", 16)}, x)
    f = gm.get_submodule("0")
    assert isinstance(f, Factored)
    assert (f.in_features, f.out_features) == (16, 24)
    with torch.no_grad():
        torch.testing.assert_close(f.weight, model[0].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f.bias, model[0].bias)
    assert f.weight.requires_grad  # differentiable while grad is on
    with torch.no_grad():
        w1 = f.weight
        assert f.weight is w1  # cached while the factors do not change
        f[0].weight.mul_(2)
        assert not torch.equal(f.weight, w1)  # ... and recomputed when they do
    with pytest.raises(lrfx.LrfxError, match="cannot be assigned"):
        f.weight = nn.Parameter(torch.zeros(24, 16))
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    y = lrfx.apply(nn.Sequential(conv), {"0": lrfx.LayerPlan("channel", 8)},
                   torch.randn(1, 8, 9, 9)).get_submodule("0")
    assert (y.in_channels, y.out_channels, y.kernel_size, y.stride, y.padding) == \
        (8, 16, (3, 3), (2, 2), (1, 1))
    assert y.bias is None and y.weight.shape == conv.weight.shape


def test_tied_weights_stay_dense_and_tied() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.mid = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 40, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.relu(self.mid(self.embed(ids))))

    model, ids = TiedLM().eval(), torch.randint(0, 40, (2, 5))
    a = lrfx.analyze(model, ids)
    assert not a["lm_head"].factorable and "tied to embed.weight" in a["lm_head"].note
    out = lrfx.compress(model, ids, params=0.9)
    assert out.get_submodule("lm_head").weight is out.get_submodule("embed").weight


# --- weight-transform layers ----------------------------------------------------------------------


class StdConv2d(nn.Conv2d):
    """Weight standardization (BiT / NFNet style): the forward transforms the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, m = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - m) / torch.sqrt(v + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Standardize(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v, m = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - m) / torch.sqrt(v + 1e-6)


class ScaledOut(nn.Conv2d):
    """Changes its output besides the conv: cannot be folded into factors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)

    def conv(i: int, o: int) -> nn.Module:
        if kind == "std":
            return StdConv2d(i, o, 3, padding=1)
        c = nn.Conv2d(i, o, 3, padding=1)
        if kind == "parametrize":
            parametrize.register_parametrization(c, "weight", Standardize())
        elif kind == "weight_norm":
            c = torch.nn.utils.parametrizations.weight_norm(c)
        elif kind == "scaled":
            c = ScaledOut(i, o, 3, padding=1)
        return c

    return nn.Sequential(conv(3, 32), nn.ReLU(), conv(32, 64), nn.ReLU(), conv(64, 64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("kind", ["std", "parametrize", "weight_norm"])
def test_weight_transform_layers_factor_the_effective_weight(kind: str) -> None:
    model, x = _net(kind), torch.randn(2, 3, 16, 16)
    a = lrfx.analyze(model, x)
    convs = ["0", "2", "4"]
    assert all(a[c].factorable for c in convs)
    assert sum(a[c].macs for c in convs) / a.total_macs > 0.99  # the share does not collapse
    full = lrfx.apply(model, _full_rank_plan(a), x)
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-4)
    out = lrfx.compress(model, x, macs=0.5)
    report = lrfx.facts_of(out).report
    assert report is not None and report.macs_after <= 0.5 * report.macs_before


def test_weight_standardization_subclass_equals_its_parametrization() -> None:
    x = torch.randn(2, 3, 16, 16)
    a, b = _net("std"), _net("parametrize")
    assert lrfx.analyze(a, x)["2"].folded
    ca, cb = lrfx.compress(a, x, macs=0.5), lrfx.compress(b, x, macs=0.5)
    with torch.no_grad():
        torch.testing.assert_close(ca(x), cb(x), rtol=1e-4, atol=1e-5)


def test_weight_transform_layer_inside_an_untraceable_leaf() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StdConv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > -1e9 else x  # untraceable: a leaf

    model, x = nn.Sequential(nn.Conv2d(3, 8, 1), Block()).eval(), torch.randn(1, 3, 8, 8)
    a = lrfx.analyze(model, x, mode="fx")
    assert a["1.conv"].folded and a["1.conv"].inside_leaf == "1"
    full = lrfx.apply(model, _full_rank_plan(a), x, mode="fx")
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-4)


def test_unfoldable_weight_transform_layer_is_left_dense_with_the_reason() -> None:
    model, x = _net("scaled"), torch.randn(2, 3, 16, 16)
    a = lrfx.analyze(model, x)
    assert not a["2"].factorable
    assert "changes its input or output" in a["2"].note and "ScaledOut" in a["2"].note
    assert a["8"].factorable
    with pytest.raises(lrfx.BudgetInfeasibleError):
        lrfx.compress(model, x, macs=0.5)  # only the tiny head is left to factor
