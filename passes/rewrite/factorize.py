"""The rewrite pass: replace planned Conv/Linear layers by factored subgraphs.

Reads a resolved :class:`~lrfx.RankPlan` from ``ctx.options["plan"]`` and the layer facts on the
nodes. It never decides ranks. Per layer kind:

* a Conv/Linear module called from the graph: the module is replaced by a
  :class:`~lrfx.modules.Factored` container at the same path, and every node that called it by
  one ``call_module`` node per factor (so later passes and exporters see the factors);
* a functional ``F.linear`` / ``F.conv*`` on a graph attribute: the factors are registered at
  the layer's name (``<name>_lowrank`` if that path is taken), called as nodes, and the original
  bias (if any) is added after them;
* a layer inside a leaf module, or a projection of ``nn.MultiheadAttention``: module
  substitution (the attention module becomes a
  :class:`~lrfx.modules.LowRankMultiheadAttention`).

Weights shared between layers (one module called twice, one Parameter in two modules) are
factored once and stay shared.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lrfx.errors import LrfxError, UnsupportedLayerError
from lrfx.facts import LayerFacts, get_node_facts
from lrfx.modules import ConvSpec, Factored, LowRankMultiheadAttention, factor_conv, factor_linear
from lrfx.modules import mha_projection as _mha_projection
from lrfx.pipeline import PassContext, graph_pass
from lrfx.plan import LayerPlan, RankPlan

__all__ = ["RewriteRecord", "factorize"]

log = logging.getLogger(__name__)

_MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class RewriteRecord:
    """What the rewrite did to one layer."""

    name: str
    scheme: str
    rank: Any
    path: str
    nodes: tuple[str, ...]


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, attr, module)


def _has_attr(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        pass
    owner_path, _, attr = path.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return False
    return hasattr(owner, attr)


class _SharedFactors:
    """Factors computed once per (weight, scheme, rank), reused for every layer sharing them."""

    def __init__(self) -> None:
        self._built: dict[tuple[int, Any, str, Any], tuple[Factored, torch.Tensor | None]] = {}
        self._biases: dict[int, nn.Parameter] = {}  # original bias id -> its factored copy

    def get(self, weight: torch.Tensor, rows: Any, lp: LayerPlan, build: Any,
            bias: torch.Tensor | None) -> Factored:
        key = (id(weight), rows, lp.scheme, lp.rank)
        if key not in self._built:
            f = build()
            self._built[key] = (f, bias)
            if bias is not None:
                self._biases[id(bias)] = f[-1].bias
            return f
        return self._share(self._built[key][0], bias)

    def _share(self, f: Factored, bias: torch.Tensor | None) -> Factored:
        """A new container whose factor weights are the same Parameters as ``f``'s; the bias is
        the layer's own (shared too when the dense layers shared one)."""
        children = []
        for child in f:
            c = copy.copy(child)
            c._parameters = dict(child._parameters)
            children.append(c)
        last = children[-1]
        if bias is None:
            last.register_parameter("bias", None)
        elif id(bias) in self._biases:
            last.bias = self._biases[id(bias)]
        else:
            last.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
            self._biases[id(bias)] = last.bias
        return Factored(*children, scheme=f.scheme, rank=f.rank)


def _inline(gm: fx.GraphModule, node: fx.Node, path: str, n_children: int) -> tuple[str, ...]:
    """Replace a ``call_module`` node by one node per child of the factored container."""
    created = []
    with gm.graph.inserting_before(node):
        x: Any = node.args[0] if node.args else node.kwargs["input"]
        for i in range(n_children):
            x = gm.graph.call_module(f"{path}.{i}", (x,))
            created.append(x.name)
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return tuple(created)


_WHITENED_UNIT = {"svd": "rows", "channel": "channel", "spatial": "spatial"}


def _factor_module(
    m: nn.Module, lp: LayerPlan, name: str, whitening: Mapping[str, torch.Tensor]
) -> Factored:
    assert lp.rank is not None
    whiten = whitening.get(_WHITENED_UNIT.get(lp.scheme, ""))
    if isinstance(m, nn.Linear):
        if lp.scheme != "svd":
            raise UnsupportedLayerError(name, f"scheme {lp.scheme!r} does not apply to Linear")
        assert isinstance(lp.rank, int)
        return factor_linear(m.weight, m.bias, lp.rank, name, whiten)
    if isinstance(m, _CONVS):
        return factor_conv(ConvSpec.of(m), lp.scheme, lp.rank, name, whiten)
    raise UnsupportedLayerError(name, f"a {type(m).__name__} cannot be factored")


def _functional_spec(node: fx.Node, gm: fx.GraphModule, layer: LayerFacts) -> ConvSpec:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a: dict[str, Any] = dict(zip(names, node.args, strict=False))
    a.update(node.kwargs)
    g = layer.geometry
    assert g is not None and layer.weight is not None
    dims = len(g.weight_shape) - 2
    def tup(v: Any, default: int) -> tuple[int, ...]:
        v = default if v is None else v
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims
    pad = a.get("padding") or 0
    return ConvSpec(
        weight=gm.get_parameter(layer.weight),
        bias=None,  # the graph adds the original bias after the factors
        stride=tup(a.get("stride"), 1),
        padding=pad if isinstance(pad, str) else tup(pad, 0),
        dilation=tup(a.get("dilation"), 1),
        groups=int(a.get("groups") or 1),
    )


def _rewrite_functional(
    gm: fx.GraphModule, node: fx.Node, layer: LayerFacts, lp: LayerPlan, shared: _SharedFactors
) -> RewriteRecord:
    assert layer.weight is not None and lp.rank is not None
    weight = gm.get_parameter(layer.weight)
    is_linear = layer.kind == "linear"
    if is_linear:
        assert isinstance(lp.rank, int)
        rank = lp.rank
        f = shared.get(weight, None, lp, lambda: factor_linear(weight, None, rank, layer.name),
                       None)
    else:
        spec = _functional_spec(node, gm, layer)
        f = shared.get(weight, None, lp,
                       lambda: factor_conv(spec, lp.scheme, lp.rank or 1, layer.name), None)
    path = layer.name if not _has_attr(gm, layer.name) else f"{layer.name}_lowrank"
    _set_module(gm, path, f)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with gm.graph.inserting_before(node):
        x: Any = node.args[0]
        created = []
        for i in range(len(f)):
            x = gm.graph.call_module(f"{path}.{i}", (x,))
            created.append(x.name)
        if bias is not None:
            if not is_linear:
                dims = len(weight.shape) - 2
                bias = gm.graph.call_method("reshape", (bias, (-1, *([1] * dims))))
            x = gm.graph.call_function(operator.add, (x, bias))
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return RewriteRecord(layer.name, lp.scheme, lp.rank, path, tuple(created))


def _mha_factors(
    mha: nn.MultiheadAttention, parent: str, parts: Mapping[str, LayerPlan]
) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for part, lp in parts.items():
        weight, bias = _mha_projection(mha, part)
        assert isinstance(lp.rank, int)
        out[part] = factor_linear(weight, bias, lp.rank, f"{parent}.{part}")
    return out


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers of replaced layers that no node uses any more."""
    used_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_mods = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        if name in used_attrs:
            continue
        if any(name.startswith(f"{m}.") for m in used_mods):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(owner, (Factored, LowRankMultiheadAttention)) or any(
            isinstance(m, (Factored, LowRankMultiheadAttention))
            for m in _ancestors(gm, owner_path)
        ):
            continue
        if type(owner) is nn.Module:  # attribute holder made by GraphModule, not a real layer
            delattr(owner, attr)
    gm.delete_all_unused_submodules()


def _ancestors(gm: fx.GraphModule, path: str) -> list[nn.Module]:
    parts = path.split(".") if path else []
    return [gm.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


@graph_pass(requires=["layers"], provides=["factored"], mutates=True)
def factorize(gm: fx.GraphModule, ctx: PassContext) -> tuple[RewriteRecord, ...]:
    """Replace every layer the plan factors by its factored subgraph.

    Reads: ``ctx.options["plan"]`` (a :class:`~lrfx.RankPlan`, resolved against this graph),
    optionally ``ctx.options["whitening"]`` (per layer and unfolding, the Cholesky factor of the
    inputs' Gram matrix, for data-aware factors), and ``node.meta["lrfx"]``. Writes: new modules
    and nodes. **Mutates** the graph module in place.

    Returns:
        One :class:`RewriteRecord` per factored layer.
    """
    plan = ctx.options.get("plan")
    whitening: Mapping[str, Mapping[str, torch.Tensor]] = ctx.options.get("whitening") or {}
    if not isinstance(plan, RankPlan):
        raise LrfxError("factorize needs the plan in ctx.options['plan'] (a lrfx.RankPlan)")
    wanted = plan.factored
    found: dict[str, list[tuple[fx.Node, LayerFacts]]] = {}
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        if facts is None:
            continue
        for layer in facts.layers:
            if layer.name in wanted:
                found.setdefault(layer.name, []).append((node, layer))
    missing = set(wanted) - set(found)
    if missing:
        raise LrfxError(f"layers {sorted(missing)} of the plan are not in this graph; resolve "
                        "the plan against the graph first (RankPlan.resolve)")

    records: list[RewriteRecord] = []
    shared = _SharedFactors()
    mha_parts: dict[str, dict[str, LayerPlan]] = {}
    for name, uses in found.items():
        lp = wanted[name]
        node, layer = uses[0]
        parent, _, part = name.rpartition(".")
        if part in _MHA_PARTS and parent and isinstance(_get(gm, parent), nn.MultiheadAttention):
            mha_parts.setdefault(parent, {})[part] = lp
            continue
        module = _get(gm, name)
        if isinstance(module, (nn.Linear, *_CONVS)):
            whiten = whitening.get(name, {})
            f = shared.get(module.weight, None, lp, lambda m=module, lp=lp, name=name, w=whiten:
                           _factor_module(m, lp, name, w), module.bias)
            _set_module(gm, name, f)
            nodes: tuple[str, ...] = ()
            for n, lay in uses:
                if lay.inside_leaf is None and n.op == "call_module" and n.target == name:
                    nodes += _inline(gm, n, name, len(f))
            records.append(RewriteRecord(name, lp.scheme, lp.rank, name, nodes))
        elif node.op == "call_function" and layer.weight is not None:
            for n, lay in uses:
                records.append(_rewrite_functional(gm, n, lay, lp, shared))
        else:
            raise UnsupportedLayerError(name, "lrfx does not know how to rewrite this layer")
    for parent, parts in mha_parts.items():
        mha = _get(gm, parent)
        assert isinstance(mha, nn.MultiheadAttention)
        new = LowRankMultiheadAttention.replacing(mha, _mha_factors(mha, parent, parts), parent)
        _set_module(gm, parent, new)
        for part, lp in parts.items():
            records.append(RewriteRecord(f"{parent}.{part}", lp.scheme, lp.rank,
                                         f"{parent}.{part}", ()))
    for node in list(gm.graph.nodes):  # dense weights of rewritten functional layers
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    _disable_fused_paths(gm)
    _drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return tuple(records)


def _disable_fused_paths(gm: fx.GraphModule) -> None:
    """Keep ``nn.TransformerEncoderLayer``'s fused inference path away from factored layers.

    Its fast path reads ``linear1.weight``, ``self_attn.in_proj_weight``... directly; once any
    of its layers is factored, its attention becomes a :class:`LowRankMultiheadAttention`
    (``in_proj_bias`` is None), which makes torch take the ordinary path that calls each layer.
    """
    for name, m in list(gm.named_modules()):
        if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            continue
        if not any(isinstance(c, (Factored, LowRankMultiheadAttention)) for c in m.modules()):
            continue
        for attr in ("self_attn", "multihead_attn"):
            mha = getattr(m, attr, None)
            if isinstance(mha, nn.MultiheadAttention):
                setattr(m, attr, LowRankMultiheadAttention.replacing(mha, {}, f"{name}.{attr}"))


def _get(gm: fx.GraphModule, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None
