"""``lrfx.apply``: rewrite a model according to a rank plan."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import fx, nn

from lrfx.analysis import Analysis, run_analysis
from lrfx.decompositions import check_finite
from lrfx.errors import LrfxError
from lrfx.facts import FrozenMap, get_graph_facts, set_graph_facts
from lrfx.pipeline import PassContext
from lrfx.plan import LayerPlan, RankPlan
from lrfx.tracing import as_input_tuple, check_module, trace

__all__ = ["apply", "as_plan", "layer_report"]

log = logging.getLogger(__name__)


def as_plan(plan: Any) -> RankPlan:
    """Accept a :class:`RankPlan`, a path to its JSON, or a mapping of layer plans."""
    if isinstance(plan, RankPlan):
        return plan
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise LrfxError(f"plan file {str(path)!r} does not exist")
        return RankPlan.from_json(path.read_text())
    if isinstance(plan, Mapping):
        return RankPlan(plan)
    raise LrfxError(f"plan must be a lrfx.RankPlan, a path to its JSON, or a mapping of layer "
                    f"name to LayerPlan; got {type(plan).__name__}")


def layer_report(before: Analysis, after: Analysis, plan: RankPlan) -> list[dict[str, Any]]:
    """Per factored layer: scheme, rank, MACs and params before and after."""
    rows = []
    for name, lp in plan.factored.items():
        rec = before[name]
        after_macs = sum(layer.macs for layer in after if _belongs(layer.name, name))
        rows.append({
            "layer": name,
            "scheme": lp.scheme,
            "rank": list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank,
            "macs_before": rec.macs,
            "macs_after": after_macs,
            "params_before": rec.params,
            "params_after": lp.params,
        })
    return rows


def _belongs(layer: str, name: str) -> bool:
    return layer.startswith(f"{name}.") or layer.startswith(f"{name}_lowrank.")


def apply(
    model: nn.Module,
    plan: RankPlan | Mapping[str, LayerPlan] | str | Path,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> fx.GraphModule:
    """Rewrite ``model`` so that every layer the plan names becomes its factored subgraph.

    The model is traced (a deep copy: the caller's model is never modified), the plan is checked
    against it before anything changes, and the rewrite pass replaces each planned layer. The
    result is an ordinary ``GraphModule``: trainable, and exportable with :func:`lrfx.export`.

    Args:
        model: The model to compress.
        plan: A :class:`RankPlan` (or a path to its JSON, or a dict of ``LayerPlan``).
        example_inputs: A tensor or a tuple of positional inputs (used for shapes and MACs).
        leaf_modules: Module types or qualified names to keep as leaves while tracing.

    Returns:
        The rewritten graph module. ``gm.meta["lrfx"].extra`` holds ``plan`` (resolved, with
        predicted MACs/params), ``report`` (per layer before/after) and ``rewrites``.

    Raises:
        PlanMismatchError: The plan names a layer the model does not have, or other shapes.
        UnsupportedLayerError: A scheme does not fit a layer, or a rank is out of range.
        LrfxError: A planned layer's weight holds NaN or Inf.

    Example:
        >>> import torch, torchvision, lrfx
        >>> model = torchvision.models.resnet18()
        >>> x = torch.randn(1, 3, 224, 224)
        >>> gm = lrfx.apply(model, lrfx.RankPlan({"fc": lrfx.LayerPlan("svd", 64)}), x)
        >>> type(gm.fc).__name__, gm.fc[0].weight.shape
        ('Factored', torch.Size([64, 512]))
    """
    from lrfx.passes.rewrite import factorize

    check_module(model)
    inputs = as_input_tuple(example_inputs)
    rank_plan = as_plan(plan)
    gm = trace(model, leaf_modules=leaf_modules)
    before = run_analysis(gm, inputs, spectra=False)
    resolved = rank_plan.resolve(before)
    _check_weights(gm, before, resolved)
    records = factorize(gm, PassContext(options={"plan": resolved}))
    after = run_analysis(gm, inputs, spectra=False)
    if resolved.macs is not None and after.total_macs != resolved.macs:
        log.warning("MACs of the rewritten graph (%d) differ from the plan's prediction (%d)",
                    after.total_macs, resolved.macs)
    facts = get_graph_facts(gm)
    extra = dict(facts.extra)
    extra.update(
        plan=resolved,
        report=tuple(layer_report(before, after, resolved)),
        rewrites=records,
        macs_before=before.total_macs,
        macs_after=after.total_macs,
        input_shapes=facts.input_shapes,
    )
    set_graph_facts(gm, facts.replace(extra=FrozenMap(extra)))
    return gm


def _check_weights(gm: fx.GraphModule, analysis: Analysis, plan: RankPlan) -> None:
    from lrfx.passes.analysis.spectra import layer_weight

    by_name: dict[str, Any] = {}
    for node in gm.graph.nodes:
        facts = node.meta.get("lrfx")
        for layer in getattr(facts, "layers", ()):
            by_name.setdefault(layer.name, layer)
    for name in plan.factored:
        w = layer_weight(gm, by_name[name]) if name in by_name else None
        if w is not None:
            check_finite(w, name)
