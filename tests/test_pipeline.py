"""Passes and pipelines: declared requirements, recorded facts, errors that name the pass."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import lrfx
from lrfx import GraphPass, PassContext, Pipeline, graph_pass
from lrfx.passes.analysis import annotate_costs, compute_spectra, propagate_shapes


@graph_pass(provides=["alpha"])
def make_alpha(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Provides alpha."""
    return "a"


@graph_pass(requires=["alpha"], provides=["beta", "gamma"])
def make_beta(gm: fx.GraphModule, ctx: PassContext) -> int:
    return len(ctx.example_inputs)


@graph_pass(name="needs_delta", requires=["delta"])
def uses_delta(gm: fx.GraphModule, ctx: PassContext) -> None:
    return None


class KaboomError(RuntimeError):
    pass


@graph_pass(requires=["beta"], provides=["omega"])
def explode(gm: fx.GraphModule, ctx: PassContext) -> None:
    raise KaboomError("the pass blew up")


@pytest.fixture
def gm() -> fx.GraphModule:
    return lrfx.trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))


def test_graph_pass_declaration() -> None:
    assert isinstance(make_beta, GraphPass)
    assert make_beta.name == "make_beta"
    assert make_beta.requires == frozenset({"alpha"})
    assert make_beta.provides == frozenset({"beta", "gamma"})
    assert not make_beta.mutates
    assert uses_delta.name == "needs_delta"
    assert make_alpha.__doc__ == "Provides alpha."
    assert propagate_shapes.provides == frozenset({"shapes"})
    assert annotate_costs.requires == frozenset({"shapes"})
    assert compute_spectra.requires == frozenset({"layers"})


def test_pipeline_rejects_unmet_requirement_naming_the_pass() -> None:
    with pytest.raises(lrfx.PipelineError) as info:
        Pipeline([make_alpha, uses_delta])
    msg = str(info.value)
    assert "needs_delta" in msg
    assert "delta" in msg
    assert "position 1" in msg
    assert "make_alpha" in msg  # the earlier passes


def test_pipeline_order_matters() -> None:
    Pipeline([make_alpha, make_beta])  # fine
    with pytest.raises(lrfx.PipelineError, match="make_beta"):
        Pipeline([make_beta, make_alpha])
    with pytest.raises(lrfx.PipelineError, match="annotate_costs"):
        Pipeline([annotate_costs, propagate_shapes])
    Pipeline([uses_delta], initial={"graph", "delta"})  # facts present from the start


def test_pipeline_rejects_non_pass_entries() -> None:
    def plain(gm: fx.GraphModule, ctx: PassContext) -> None:
        return None

    with pytest.raises(lrfx.PipelineError, match="graph_pass"):
        Pipeline([make_alpha, plain])  # type: ignore[list-item]


def test_pipeline_runs_in_order_and_records_provided_facts(gm: fx.GraphModule) -> None:
    pipe = Pipeline([make_alpha, make_beta])
    assert pipe.names == ("make_alpha", "make_beta")
    assert "make_alpha" in repr(pipe)
    results = pipe.run(gm, PassContext(example_inputs=(1, 2, 3)))
    assert results == {"make_alpha": "a", "make_beta": 3}
    assert gm.meta["lrfx"].provided == frozenset({"graph", "alpha", "beta", "gamma"})
    # other graph facts survive
    assert gm.meta["lrfx"].total_params == 4 * 3 + 3


def test_failing_pass_raises_pass_error(gm: fx.GraphModule) -> None:
    pipe = Pipeline([make_alpha, make_beta, explode])
    with pytest.raises(lrfx.PassError) as info:
        pipe.run(gm)
    err = info.value
    assert err.pass_name == "explode"
    assert err.before == ["make_alpha", "make_beta"]
    msg = str(err)
    assert "'explode'" in msg and "make_alpha, make_beta" in msg
    assert "KaboomError" in msg and "the pass blew up" in msg
    assert isinstance(err.__cause__, KaboomError)
    assert str(err.__cause__) == "the pass blew up"
    # the passes that ran recorded their facts; the failed one did not
    provided = gm.meta["lrfx"].provided
    assert {"alpha", "beta", "gamma"} <= provided
    assert "omega" not in provided


def test_first_pass_failing_says_none_ran_before(gm: fx.GraphModule) -> None:
    @graph_pass()
    def first(gm: fx.GraphModule, ctx: PassContext) -> None:
        raise ValueError("bad")

    with pytest.raises(lrfx.PassError, match="none") as info:
        Pipeline([first]).run(gm)
    assert info.value.before == []
    assert isinstance(info.value.__cause__, ValueError)


def test_lrfx_errors_keep_their_type_with_a_note(gm: fx.GraphModule) -> None:
    pipe = Pipeline([propagate_shapes, annotate_costs])
    with pytest.raises(lrfx.ShapeError) as info:
        pipe.run(gm, PassContext(example_inputs=(torch.randn(2, 5),)))
    assert info.value.node == "_0"
    notes = getattr(info.value, "__notes__", [])
    assert any("propagate_shapes" in n for n in notes)


def test_calling_a_pass_directly_checks_requirements(gm: fx.GraphModule) -> None:
    with pytest.raises(lrfx.PipelineError, match="make_beta") as info:
        make_beta(gm)
    assert "alpha" in str(info.value)
    with pytest.raises(lrfx.PipelineError, match="annotate_costs"):
        annotate_costs(gm, PassContext())
    assert "beta" not in gm.meta["lrfx"].provided
    # satisfied: runs and records what it provides
    assert make_alpha(gm) == "a"
    assert make_beta(gm, PassContext(example_inputs=(0,))) == 1
    assert {"alpha", "beta", "gamma"} <= gm.meta["lrfx"].provided


def test_analysis_passes_called_directly(gm: fx.GraphModule) -> None:
    ctx = PassContext(example_inputs=(torch.randn(5, 4),))
    assert propagate_shapes(gm, ctx) is None
    assert annotate_costs(gm, ctx) == 5 * 4 * 3
    assert compute_spectra(gm, ctx) == 1
    assert gm.meta["lrfx"].provided == frozenset({"graph", "shapes", "layers", "spectra"})
    assert gm.meta["lrfx"].input_shapes == ((5, 4),)


def test_passes_do_not_change_the_graph(gm: fx.GraphModule) -> None:
    before = str(gm.graph)
    code = gm.code
    Pipeline([propagate_shapes, annotate_costs, compute_spectra]).run(
        gm, PassContext(example_inputs=(torch.randn(2, 4),))
    )
    assert str(gm.graph) == before
    assert gm.code == code
    assert not any(p.mutates for p in (propagate_shapes, annotate_costs, compute_spectra))


def test_progress_lines_go_to_stderr_off_a_terminal(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With progress on and no terminal: one line per finished loop and step, on stderr only."""
    from lrfx import progress

    monkeypatch.setattr(progress, "QUIET", 0.0)
    with progress.step("work", progress=True), progress.progress_bar("items", 3) as advance:
        for _ in range(3):
            advance()
    with progress.step("quiet", progress=False):
        pass
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("lrfx: items 3/3 (")
    assert lines[1].startswith("lrfx: work done in ")
    assert len(lines) == 2
