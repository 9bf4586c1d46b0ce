"""Run a graph with some layers replaced by their low-rank versions (no rewrite).

What the passes that need "the model as it would be compressed" share: sequential calibration
(:mod:`lrfx.passes.rewrite.refit`) runs the compressed prefix node by node, and the measured
layer sensitivity (:mod:`lrfx.passes.analysis.sensitivity`) truncates one layer at a time. A
replaced layer computes exactly what its factors would (the dense weight they compose), wherever
it sits: a module called from the graph, a functional ``F.linear`` / ``F.conv*`` on a graph
attribute, or a layer inside a leaf module (a copy of the leaf is used).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from lrfx.errors import ShapeError
from lrfx.facts import LayerFacts, get_node_facts
from lrfx.plan import LayerPlan, RankPlan
from lrfx.schemes import get_scheme

__all__ = ["Replay", "lowrank_overrides", "lowrank_weight", "planned_layers", "relative_error"]


class Replay(fx.Interpreter):
    """One batch through the graph, one node at a time, with some modules and attributes
    replaced (the compressed prefix)."""

    def __init__(self, gm: fx.GraphModule, args: Sequence[Any],
                 modules: Mapping[str, nn.Module], attrs: Mapping[str, torch.Tensor]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.args_iter: Iterator[Any] = iter(args)
        self.modules_over = modules
        self.attrs_over = attrs

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        m = self.modules_over.get(target)
        return super().call_module(target, args, kwargs) if m is None else m(*args, **kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        t = self.attrs_over.get(target)
        return super().get_attr(target, args, kwargs) if t is None else t

    def step(self, node: fx.Node) -> Any:
        try:
            value = self.run_node(node)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeError(node.name, f"{node.op} {node.target}", first) from exc
        self.env[node] = value
        for dead in self.user_to_last_uses.get(node, []):
            del self.env[dead]
        return value

    def input_of(self, node: fx.Node) -> torch.Tensor:
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        assert isinstance(x, fx.Node)
        value = self.env[x]
        assert isinstance(value, torch.Tensor)
        return value


def planned_layers(gm: fx.GraphModule, plan: RankPlan
                   ) -> dict[str, list[tuple[fx.Node, LayerFacts]]]:
    """Per planned layer, its uses: ``(node, layer facts)`` in graph order."""
    found: dict[str, list[tuple[fx.Node, LayerFacts]]] = {}
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            if layer.name in plan.factored:
                found.setdefault(layer.name, []).append((node, layer))
    return found


def lowrank_weight(layer: LayerFacts, lp: LayerPlan, weight: torch.Tensor) -> torch.Tensor:
    """The dense weight the factors from the layer's spectra compute (same shape and dtype)."""
    assert layer.geometry is not None
    scheme = get_scheme(lp.scheme)
    factors = scheme.factors(weight, layer.geometry, lp.rank,  # type: ignore[arg-type]
                             spectra=layer.spectra)
    groups = getattr(layer.geometry, "groups", 1)
    return scheme.compose(factors, groups).reshape(weight.shape).to(weight)


def lowrank_overrides(gm: fx.GraphModule, found: Mapping[str, list[tuple[fx.Node, LayerFacts]]],
                      plan: RankPlan, names: Collection[str]
                      ) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Replacements that make ``names`` low-rank (at their planned rank, with the factors of
    their spectra): copies of the leaves they sit in and of their modules, and their functional
    weights, for :class:`Replay`. Layers in packed weights (attention) or with a weight
    transform stay dense."""
    modules: dict[str, nn.Module] = {}
    attrs: dict[str, torch.Tensor] = {}
    for name in names:
        node, layer = found[name][0]
        lp = plan.factored[name]
        if node.op == "call_module" and layer.inside_leaf is None and isinstance(
                gm.get_submodule(str(node.target)), nn.MultiheadAttention):
            _attention_lowrank(gm, modules, str(node.target), layer, lp)
            continue
        if layer.weight_effective or layer.weight_rows is not None or layer.weight is None:
            continue  # the prefix keeps this layer dense (rare: packed weights, transforms)
        if layer.inside_leaf is not None:
            leaf = modules.get(layer.inside_leaf)
            if leaf is None:
                leaf = modules[layer.inside_leaf] = copy.deepcopy(
                    gm.get_submodule(layer.inside_leaf))
            _make_lowrank(leaf.get_submodule(layer.name[len(layer.inside_leaf) + 1:]), layer, lp)
        elif node.op == "get_attr" or node.op == "call_function":
            owner_path, _, attr = layer.weight.rpartition(".")
            t = getattr(gm.get_submodule(owner_path) if owner_path else gm, attr, None)
            if isinstance(t, torch.Tensor) and not layer.weight_transposed:
                attrs[layer.weight] = lowrank_weight(layer, lp, t.detach())
        elif node.op == "call_module":
            modules[layer.name] = _make_lowrank(copy.deepcopy(gm.get_submodule(layer.name)),
                                                layer, lp)
    return modules, attrs


def _attention_lowrank(gm: fx.GraphModule, modules: dict[str, nn.Module], target: str,
                       layer: LayerFacts, lp: LayerPlan) -> None:
    """Make one projection of the ``nn.MultiheadAttention`` ``target`` low-rank in a copy of it
    (one copy per attention module, shared by its projections)."""
    mha = modules.get(target)
    if mha is None:
        mha = modules[target] = copy.deepcopy(gm.get_submodule(target))
    assert isinstance(mha, nn.MultiheadAttention)
    part = layer.name.rpartition(".")[2]
    if part == "out_proj":
        _make_lowrank(mha.out_proj, layer, lp)
        return
    w = mha.in_proj_weight if layer.weight_rows is not None else getattr(mha, f"{part}_weight")
    assert isinstance(w, torch.Tensor)
    rows = layer.weight_rows or (0, w.shape[0])
    with torch.no_grad():
        piece = w[rows[0]:rows[1]]
        piece.copy_(lowrank_weight(layer, lp, piece.detach().clone()))


def _make_lowrank(module: nn.Module, layer: LayerFacts, lp: LayerPlan) -> nn.Module:
    """``module`` (a copy) with its weight replaced, in place, by the low-rank one."""
    w = module.get_parameter("weight")
    with torch.no_grad():
        w.copy_(lowrank_weight(layer, lp, w.detach()))
    return module


def relative_error(refs: Sequence[Any], outs: Sequence[Any]) -> float:
    """``sum ||ref - out||^2 / sum ||ref||^2`` over the pairs that are tensors (float64)."""
    num = den = 0.0
    for a, b in zip(refs, outs, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            num += float((a.double() - b.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    return num / den if den > 0 else 0.0


