"""Typed state, typed pass options, and facts that know when they are stale."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _rewrite_models import GatedNet, SmallCNN
from torch import fx, nn

import lrfx
from lrfx.facts import GraphFacts, get_graph_facts, get_node_facts
from lrfx.passes.analysis import (
    CalibrationOptions,
    SpectraOptions,
    annotate_costs,
    collect_input_stats,
    compute_spectra,
    propagate_shapes,
)
from lrfx.passes.rewrite import FactorizeOptions, factorize
from lrfx.pipeline import PassContext, Pipeline, graph_pass, invalidate, mark_weights_changed
from lrfx.report import CompressionReport


def _analyzed(model: nn.Module, x: torch.Tensor, **opts: object) -> fx.GraphModule:
    gm = lrfx.trace(model)
    ctx = PassContext(example_inputs=(x,), options=[SpectraOptions(**opts)])  # type: ignore[arg-type]
    Pipeline([propagate_shapes, annotate_costs, compute_spectra]).run(gm, ctx)
    return gm


def _spectra(gm: fx.GraphModule) -> dict[str, dict[str, object]]:
    out = {}
    for n in gm.graph.nodes:
        f = get_node_facts(n)
        for layer in f.layers if f else ():
            if layer.spectra:
                out[layer.name] = dict(layer.spectra)
    return out


# --- typed graph facts ---------------------------------------------------------------------------


def test_graph_facts_are_typed_fields_and_extra_is_a_read_only_view() -> None:
    fields = {f.name for f in dataclasses.fields(GraphFacts)}
    assert {"leaf_calls", "leaf_macs", "input_stats", "plan", "report", "rewrites",
            "weights_version"} <= fields
    assert "extra" not in fields
    x = torch.randn(2, 3, 16, 16)
    gm = lrfx.compress(SmallCNN(), x, macs=0.6)
    facts = get_graph_facts(gm)
    assert isinstance(facts.report, CompressionReport)
    assert facts.extra["plan"] is facts.plan and facts.extra["report"] is facts.report
    assert facts.extra["macs_after"] == facts.report.macs_after
    with pytest.raises(TypeError):
        facts.extra["plan"] = None  # type: ignore[index]


def test_apply_and_compress_return_the_same_report_type() -> None:
    x = torch.randn(2, 3, 16, 16)
    model = SmallCNN()
    c = lrfx.compress(model, x, macs=0.6)
    a = lrfx.apply(model, c.meta["lrfx"].plan, x)
    rc, ra = c.meta["lrfx"].report, a.meta["lrfx"].report
    assert type(rc) is type(ra) is CompressionReport
    assert [r["layer"] for r in rc] == [r["layer"] for r in ra]
    assert ra.macs_after == rc.macs_after == lrfx.count_macs(a, x)
    assert all(r["error"] is None for r in ra) and all(r["error"] >= 0 for r in rc)
    assert "plan" in ra.table().splitlines()[-1]


# --- typed options -------------------------------------------------------------------------------


def test_passes_declare_and_read_typed_options() -> None:
    assert compute_spectra.options is SpectraOptions
    assert factorize.options is FactorizeOptions
    assert collect_input_stats.options is CalibrationOptions
    ctx = PassContext()
    assert ctx.option(SpectraOptions) == SpectraOptions()
    with pytest.raises(lrfx.PipelineError, match="FactorizeOptions options are required"):
        ctx.option(FactorizeOptions)
    with pytest.raises(lrfx.PipelineError, match="two SpectraOptions"):
        PassContext(options=[SpectraOptions(), SpectraOptions(vectors=True)])
    with pytest.raises(lrfx.PipelineError, match="dataclass instances"):
        PassContext(options=["vectors"])
    with pytest.raises(lrfx.LrfxError, match="precision"):
        SpectraOptions(precision="float16")
    legacy = PassContext(options={"vectors": True, "unrelated": 3})
    assert legacy.option(SpectraOptions) == SpectraOptions(vectors=True)
    replaced = PassContext(options=[SpectraOptions()]).with_options(SpectraOptions(vectors=True))
    assert replaced.option(SpectraOptions).vectors


def test_a_pass_called_with_its_options_object() -> None:
    x = torch.randn(2, 3, 16, 16)
    gm = _analyzed(SmallCNN(), x)
    plan = lrfx.RankPlan({"conv2": lrfx.LayerPlan("channel", 4)}).resolve(
        lrfx.Analysis.from_graph(gm))
    records = factorize(gm, FactorizeOptions(plan=plan))
    assert [r.name for r in records] == ["conv2"]
    with pytest.raises(lrfx.PipelineError, match="PassContext or FactorizeOptions"):
        factorize(gm, SpectraOptions())


# --- invalidation --------------------------------------------------------------------------------


def test_factorize_drops_the_layer_facts_and_keeps_graph_shapes() -> None:
    x = torch.randn(2, 3, 16, 16)
    gm = _analyzed(SmallCNN(), x, vectors=True)
    plan = lrfx.RankPlan({"conv2": lrfx.LayerPlan("channel", 4)}).resolve(
        lrfx.Analysis.from_graph(gm))
    factorize(gm, FactorizeOptions(plan=plan))
    provided = get_graph_facts(gm).provided
    assert "factored" in provided and "shapes" in provided
    assert not {"layers", "spectra"} & provided
    assert all(get_node_facts(n) is None for n in gm.graph.nodes)
    # the new nodes carry shapes computed from the layout, equal to a real propagation
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if "tensor_meta" in n.meta}
    propagate_shapes(gm, PassContext(example_inputs=(x,)))
    for n in gm.graph.nodes:
        if n.name in shapes:
            assert shapes[n.name] == tuple(n.meta["tensor_meta"].shape), n.name
    # a pass that needs spectra after the rewrite is rejected when the pipeline is built
    with pytest.raises(lrfx.PipelineError, match="requires"):
        Pipeline([propagate_shapes, annotate_costs, factorize,
                  graph_pass(requires=["spectra"])(lambda gm, ctx: None)])


def test_substitution_inside_a_leaf_drops_the_shapes_too() -> None:
    x = torch.randn(3, 4)
    gm = lrfx.trace(GatedNet())
    Pipeline([propagate_shapes, annotate_costs]).run(gm, PassContext(example_inputs=(x,)))
    plan = lrfx.RankPlan({"gate.a": lrfx.LayerPlan("svd", 4)}).resolve(
        lrfx.Analysis.from_graph(gm))
    factorize(gm, FactorizeOptions(plan=plan))
    provided = get_graph_facts(gm).provided
    assert "shapes" not in provided and not get_graph_facts(gm).leaf_calls
    assert not any("tensor_meta" in n.meta for n in gm.graph.nodes)


def test_invalidate_drops_derived_facts() -> None:
    gm = _analyzed(SmallCNN(), torch.randn(1, 3, 16, 16))
    dropped = invalidate(gm, ["layers"])
    assert {"layers", "spectra", "input_stats"} <= dropped and "shapes" not in dropped
    assert get_graph_facts(gm).provided == frozenset({"graph", "shapes"})


def test_mark_weights_changed_makes_spectra_stale() -> None:
    x = torch.randn(1, 3, 16, 16)
    gm = _analyzed(SmallCNN(), x)
    before = _spectra(gm)["conv1"]["channel"]
    mark_weights_changed(gm)
    assert get_graph_facts(gm).weights_version == 1
    assert "spectra" not in get_graph_facts(gm).provided and not _spectra(gm)
    with torch.no_grad():
        gm.get_submodule("conv1").weight.data.mul_(2.0)  # invisible to torch's version counter
    annotate_costs(gm, PassContext())
    assert compute_spectra(gm, PassContext()) > 0
    after = _spectra(gm)["conv1"]["channel"]
    torch.testing.assert_close(after.values, 2.0 * before.values)  # type: ignore[attr-defined]


def test_spectra_are_reused_until_a_weight_changes() -> None:
    x = torch.randn(1, 3, 16, 16)
    gm = _analyzed(SmallCNN(), x)
    n_layers = len(_spectra(gm))
    # nothing changed: the second run reuses every spectrum
    assert compute_spectra(gm, PassContext()) == 0
    # an optimizer step bumps the weights' version counters: those spectra are recomputed
    opt = torch.optim.SGD([gm.get_submodule("fc").weight], lr=0.1)
    gm(x).sum().backward()
    opt.step()
    assert compute_spectra(gm, PassContext()) == 1
    # asking for singular vectors recomputes the spectra that lack them
    assert compute_spectra(gm, PassContext(options=[SpectraOptions(vectors=True)])) >= n_layers
    assert all(sp.basis is not None for layer in _spectra(gm).values()  # type: ignore[attr-defined]
               for sp in layer.values())


def test_a_stale_spectrum_is_not_used_by_the_rewrite() -> None:
    x = torch.randn(2, 3, 16, 16)
    model = SmallCNN().eval()
    gm = _analyzed(model, x, vectors=True)
    with torch.no_grad():  # an in-place change after the analysis (bumps the version counter)
        gm.get_submodule("conv2").weight.copy_(torch.randn(16, 8, 3, 3))
    plan = lrfx.RankPlan({"conv2": lrfx.LayerPlan("channel", 3)}).resolve(
        lrfx.Analysis.from_graph(gm))
    dense = gm.get_submodule("conv2").weight.detach().double().clone()
    factorize(gm, FactorizeOptions(plan=plan))
    f = gm.get_submodule("conv2")
    rebuilt = (f[1].weight.double().reshape(16, -1) @ f[0].weight.double().reshape(3, -1))
    u, s, vh = torch.linalg.svd(dense.reshape(16, -1))
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(rebuilt, best, atol=1e-5, rtol=1e-5)


def test_calibrated_spectra_are_computed_once_and_whitened(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import lrfx.passes.analysis.spectra as spectra_mod

    decomposed = []
    real = spectra_mod.decompose_many

    def spy(mats, **kw):  # type: ignore[no-untyped-def]
        decomposed.extend(mats)
        return real(mats, **kw)

    monkeypatch.setattr(spectra_mod, "decompose_many", spy)
    x = torch.randn(4, 3, 16, 16)
    gm = lrfx.trace(SmallCNN().eval())
    ctx = PassContext(example_inputs=(x[:1],), options=[
        SpectraOptions(vectors=True), CalibrationOptions(calibration=[x, x + 1])])
    Pipeline([propagate_shapes, annotate_costs, collect_input_stats, compute_spectra]).run(gm, ctx)
    stats = get_graph_facts(gm).input_stats
    assert stats is not None
    pairs = 0
    for name, layer in _spectra(gm).items():
        for unit, sp in layer.items():
            pairs += 1
            # Tucker-2's input side (mode1) is whitened from the channel statistics
            has_stats = unit in stats[name].grams or (
                unit == "mode1" and "channel" in stats[name].grams)
            assert sp.whitened == has_stats, (name, unit)  # type: ignore[attr-defined]
    # one decomposition per (layer, unfolding): no plain spectrum computed and replaced (the
    # whitened mode1 needs none: it is built from the channel statistics)
    whitened_mode1 = sum(1 for layer in _spectra(gm).values() for unit, sp in layer.items()
                         if unit == "mode1" and sp.whitened)  # type: ignore[attr-defined]
    assert whitened_mode1 > 0
    assert len(decomposed) == pairs - whitened_mode1
    assert any(unit == "mode1" for layer in _spectra(gm).values() for unit in layer)


def test_load_decomposes_nothing_and_reproduces_the_outputs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lrfx import decompositions, schemes

    x = torch.randn(2, 3, 16, 16)
    model = SmallCNN().eval()
    gm = lrfx.compress(model, x, macs=0.5, scheme="auto")
    lrfx.save(gm, tmp_path)

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("load must not decompose")

    monkeypatch.setattr(decompositions, "decompose_many", forbidden)
    monkeypatch.setattr(decompositions, "truncated_svd", forbidden)
    monkeypatch.setattr(schemes.Scheme, "factors", forbidden)
    for cls in (schemes.Svd, schemes.Channel, schemes.Spatial, schemes.Tucker2, schemes.CP):
        monkeypatch.setattr(cls, "factors", forbidden)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    back = lrfx.load(tmp_path, model, x)
    assert not back.training
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert back.meta["lrfx"].plan == gm.meta["lrfx"].plan
