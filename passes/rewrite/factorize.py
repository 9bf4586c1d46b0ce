"""The rewrite pass: replace planned Conv/Linear layers by factored subgraphs.

Reads a resolved :class:`~lrfx.RankPlan` from :class:`FactorizeOptions` and the layer facts on
the nodes. It never decides ranks. Everything scheme-specific (the layout of the factored layer,
its factors) comes from the scheme registry. Per layer kind:

* a Conv/Linear module called from the graph: the module is replaced by a
  :class:`~lrfx.modules.Factored` container at the same path, and every node that called it by
  one ``call_module`` node per factor (so later passes and exporters see the factors);
* a functional ``F.linear`` / ``F.conv*`` on a graph attribute: the factors are registered at
  the layer's name (``<name>_lowrank`` if that path is taken), called as nodes, and the original
  bias (if any) is added after them;
* a layer inside a leaf module, or a projection of ``nn.MultiheadAttention``: module
  substitution (the attention module becomes a
  :class:`~lrfx.modules.LowRankMultiheadAttention`).

Factors come from the spectra on the nodes when they are still valid (their stored singular
vectors, plain or data-aware: no SVD is repeated), else from a fresh decomposition. Weights
shared between layers (one module called twice, one Parameter in two modules with the same
geometry) are factored once and stay shared.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from lrfx.cost import ConvGeometry, Geometry, Piece
from lrfx.decompositions import Spectrum, WeightStamp, check_finite
from lrfx.errors import LrfxError, UnsupportedLayerError
from lrfx.facts import LayerFacts, get_graph_facts, get_node_facts
from lrfx.layers import EffectiveCall, effective_call, is_linear, linear_like
from lrfx.modules import Factored, LowRankMultiheadAttention, build_factored, mha_projection
from lrfx.pipeline import PassContext, graph_pass, invalidate
from lrfx.plan import LayerPlan, RankPlan
from lrfx.report import RewriteRecord
from lrfx.schemes import get_scheme

__all__ = ["FactorizeOptions", "RewriteRecord", "factorize"]

log = logging.getLogger(__name__)

_MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FactorizeOptions:
    """Options of :func:`factorize`.

    Attributes:
        plan: The plan, resolved against this graph (:meth:`~lrfx.RankPlan.resolve`).
        whitening: Per layer and unfolding, a Cholesky factor of the input Gram to whiten the
            factors with, for layers whose spectra carry none (most callers leave this out:
            data-aware spectra carry their own).
        decompose: ``False`` builds the factored modules with uninitialized weights and computes
            no decomposition (to load saved weights into).
        factors: Per layer, factor weights (layout order) and the last piece's bias chosen
            elsewhere (:func:`~lrfx.passes.rewrite.refit_factors`), used instead of a
            decomposition.
    """

    plan: RankPlan
    whitening: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    decompose: bool = True
    factors: Mapping[str, tuple[tuple[torch.Tensor, ...], torch.Tensor | None]] | None = None


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, in the training mode of the module it replaces (or its
    owner's)."""
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    old = getattr(owner, attr, None)
    module.train(old.training if isinstance(old, nn.Module) else owner.training)
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


def _geometry_key(g: Geometry | None) -> Any:
    """What besides the weight determines a factored layer: its conv arguments."""
    if isinstance(g, ConvGeometry):
        return (g.stride, g.padding, g.dilation, g.groups, g.padding_mode, g.transposed)
    return type(g).__name__


class _Builder:
    """Builds factored layers, once per (weight, geometry, scheme, rank); shares the rest."""

    def __init__(self, gm: fx.GraphModule, opts: FactorizeOptions) -> None:
        self.gm = gm
        self.opts = opts
        self.epoch = get_graph_facts(gm).weights_version
        self._built: dict[tuple[Any, ...], Factored] = {}
        # the same weight at the same scheme and rank, whatever the call's stride or padding:
        # the factors' values do not depend on them, so calls with other geometry share them
        self._by_weight: dict[tuple[Any, ...], Factored] = {}
        self._biases: dict[int, nn.Parameter] = {}  # original bias id -> its factored copy

    def spectra(self, layer: LayerFacts, weight: torch.Tensor) -> dict[str, Spectrum]:
        """The layer's spectra that still describe ``weight`` (stale ones are dropped)."""
        stamp = WeightStamp.of(weight, self.epoch)
        return {u: sp for u, sp in layer.spectra.items() if sp.stamp is None or sp.stamp == stamp}

    def build(self, layer: LayerFacts, weight: torch.Tensor, bias: torch.Tensor | None,
              lp: LayerPlan, *, own_bias: bool = True) -> Factored:
        """The factored layer; ``own_bias=False`` leaves the bias out of the factors (the graph
        adds it, for functional layers)."""
        g = layer.geometry
        assert g is not None and lp.rank is not None
        if not own_bias:
            g = dataclasses.replace(g, bias=False)
        # storage, shape and strides identify the weight (one Parameter shared by two layers,
        # or one slice of a packed projection), the conv arguments the rest
        wkey = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), lp.scheme,
                lp.rank)
        key = (*wkey, _geometry_key(g))
        if key in self._built:
            return self._share(self._built[key], bias)
        scheme = get_scheme(lp.scheme)
        if wkey in self._by_weight:  # same factors, this call's own conv arguments
            f = build_factored(scheme.layout(g, lp.rank), scheme=lp.scheme, rank=lp.rank,
                               bias=None, dtype=weight.dtype, device="meta", like=g)
            f = self._share(f, bias, weights_of=self._by_weight[wkey])
            self._built[key] = f
            return f
        weights = None
        given = (self.opts.factors or {}).get(layer.name)
        if given is not None:
            weights = list(given[0])
            if bias is not None:  # the refit bias, trainable like the layer's own
                fitted = given[1]
                assert fitted is not None
                bias = fitted.to(dtype=bias.dtype, device=bias.device).requires_grad_(
                    bias.requires_grad)
        elif self.opts.decompose:
            check_finite(weight, layer.name)
            whiten = (self.opts.whitening or {}).get(layer.name)
            weights = scheme.factors(weight, g, lp.rank, spectra=self.spectra(layer, weight),
                                     whiten=whiten)
        f = build_factored(scheme.layout(g, lp.rank), scheme=lp.scheme, rank=lp.rank,
                           weights=weights, bias=bias, dtype=weight.dtype, device=weight.device,
                           requires_grad=weight.requires_grad, like=g)
        if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
                memory_format=torch.channels_last):  # keep the model's memory format
            f.to(memory_format=torch.channels_last)
        self._built[key] = f
        self._by_weight[wkey] = f
        if bias is not None:
            self._biases[id(bias)] = f[-1].get_parameter("bias")
        return f

    def _share(self, f: Factored, bias: torch.Tensor | None,
               weights_of: Factored | None = None) -> Factored:
        """A new container whose factor weights are the same Parameters as ``f``'s (or, with
        ``weights_of``, as that one's: ``f`` then only gives the pieces' conv arguments); the
        bias is the layer's own (shared too when the dense layers shared one)."""
        children = []
        for i, child in enumerate(f):
            c = copy.copy(child)
            for k, v in vars(c).items():  # its own dicts (parameters, hooks...), same tensors
                if isinstance(v, dict):
                    vars(c)[k] = copy.copy(v)
            if weights_of is not None:
                c._parameters["weight"] = weights_of[i].get_parameter("weight")
            children.append(c)
        last = children[-1]
        if bias is None:
            last.register_parameter("bias", None)
        elif id(bias) in self._biases:
            last.bias = self._biases[id(bias)]
        else:
            last.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
            self._biases[id(bias)] = last.bias
        return Factored(*children, scheme=f.scheme, rank=f.rank, like=f._like)


def _tensor_meta(shape: tuple[int, ...], like: Any) -> Any:
    """Shape-propagation metadata of a new node (a meta tensor: nothing is computed)."""
    meta = _extract_tensor_metadata(torch.empty(shape, dtype=like.dtype, device="meta"))
    return meta._replace(requires_grad=like.requires_grad)


def _piece_shapes(x: Any, y: Any, pieces: tuple[Piece, ...]) -> list[tuple[int, ...]] | None:
    """Output shape of each piece, from the layer's input and output shapes."""
    if not hasattr(x, "shape") or not hasattr(y, "shape"):
        return None
    xs, ys = tuple(x.shape), tuple(y.shape)
    out = []
    for p in pieces:
        if p.linear:
            out.append((*xs[:-1], p.out_channels))
            continue
        d = len(p.kernel)
        lead, in_sp, out_sp = xs[: -(d + 1)], xs[-d:], ys[-d:]
        sp = {"in": in_sp, "out": out_sp, "mid": (out_sp[0], *in_sp[1:])}[p.at]
        out.append((*lead, p.out_channels, *sp))
    return out


def _annotate(nodes: list[fx.Node], shapes: list[tuple[int, ...]] | None, like: Any) -> None:
    if shapes is None or not hasattr(like, "dtype"):
        return
    for n, shape in zip(nodes, shapes, strict=True):
        n.meta["tensor_meta"] = _tensor_meta(shape, like)
        n.meta["type"] = torch.Tensor


def _inline(gm: fx.GraphModule, node: fx.Node, path: str, pieces: tuple[Piece, ...]
            ) -> tuple[str, ...]:
    """Replace a ``call_module`` node by one node per piece of the factored container, with
    their shapes (so shape facts stay valid across the rewrite)."""
    created: list[fx.Node] = []
    with gm.graph.inserting_before(node):
        x: Any = node.args[0] if node.args else node.kwargs["input"]
        first = x
        for i in range(len(pieces)):
            x = gm.graph.call_module(f"{path}.{i}", (x,))
            created.append(x)
    y = node.meta.get("tensor_meta")
    _annotate(created, _piece_shapes(first.meta.get("tensor_meta") if isinstance(first, fx.Node)
                                     else None, y, pieces), y)
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return tuple(n.name for n in created)


def _attribute_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a functional layer's weight reads (``get_attr`` target)."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    w = getattr(owner, attr, None)
    if not isinstance(w, torch.Tensor):
        raise UnsupportedLayerError(target, "its weight is not a parameter or buffer of the "
                                    "model; leave it dense (drop it from the plan)")
    return w


def _rewrite_functional(
    gm: fx.GraphModule, node: fx.Node, layer: LayerFacts, lp: LayerPlan, builder: _Builder
) -> RewriteRecord:
    assert layer.weight is not None and lp.rank is not None and layer.geometry is not None
    weight = _attribute_tensor(gm, layer.weight)  # a buffer gives frozen factors
    f = builder.build(layer, weight, None, lp, own_bias=False)  # the graph adds the bias
    path = layer.name if not _has_attr(gm, layer.name) else f"{layer.name}_lowrank"
    stem, k = path, 1
    while _has_attr(gm, path):  # one module per call site (a weight used by several calls)
        path, k = f"{stem}_{k}", k + 1
    _set_module(gm, path, f)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    pieces = get_scheme(lp.scheme).layout(dataclasses.replace(layer.geometry, bias=False),
                                          lp.rank)
    created: list[fx.Node] = []
    with gm.graph.inserting_before(node):
        x: Any = node.args[0]
        first = x
        for i in range(len(f)):
            x = gm.graph.call_module(f"{path}.{i}", (x,))
            created.append(x)
        extra: list[fx.Node] = []
        if bias is not None:
            if layer.kind != "linear":
                dims = len(weight.shape) - 2
                bias = gm.graph.call_method("reshape", (bias, (-1, *([1] * dims))))
                extra.append(bias)
            x = gm.graph.call_function(operator.add, (x, bias))
            extra.append(x)
    y = node.meta.get("tensor_meta")
    _annotate(created, _piece_shapes(first.meta.get("tensor_meta") if isinstance(first, fx.Node)
                                     else None, y, pieces), y)
    if y is not None and hasattr(y, "shape"):
        shapes = [(int(weight.shape[0]), *([1] * (weight.dim() - 2)))] if len(extra) == 2 else []
        _annotate(extra, [*shapes, tuple(y.shape)] if extra else [], y)
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return RewriteRecord(layer.name, lp.scheme, lp.rank, path, tuple(n.name for n in created))


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
        if owner is gm or type(owner) is nn.Module:  # GraphModule's own copies, not a layer
            delattr(owner, attr)
    gm.delete_all_unused_submodules()


def _ancestors(gm: fx.GraphModule, path: str) -> list[nn.Module]:
    parts = path.split(".") if path else []
    return [gm.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


@graph_pass(requires=["layers"], provides=["factored"], mutates=True, invalidates=["layers"],
            options=FactorizeOptions)
def factorize(gm: fx.GraphModule, ctx: PassContext) -> tuple[RewriteRecord, ...]:
    """Replace every layer the plan factors by its factored subgraph.

    Reads: :class:`FactorizeOptions` (the plan, resolved against this graph), ``node.meta["lrfx"]``
    (layers, their geometry and spectra) and the weights. Writes: new modules and nodes, with
    their shapes (``tensor_meta`` from the layout, nothing run). **Mutates** the graph module in
    place; invalidates the layer facts (and everything derived from them), and the shapes too
    when it substituted modules inside leaves or attention modules (whose inner calls were
    measured by hooks).

    Returns:
        One :class:`RewriteRecord` per factored layer.
    """
    opts = ctx.option(FactorizeOptions)
    plan = opts.plan
    if not isinstance(plan, RankPlan):
        raise LrfxError("factorize needs the plan: FactorizeOptions(plan=<a lrfx.RankPlan>)")
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
    builder = _Builder(gm, opts)
    capture = get_graph_facts(gm).capture
    # module mode: the graph only describes the call; the layers are replaced in the model copy
    target: nn.Module = capture.root if capture.mode == "module" and capture.root is not None \
        else gm
    module_mode = target is not gm
    substituted = module_mode  # a layer replaced inside something measured by hooks
    mha_parts: dict[str, dict[str, tuple[LayerFacts, LayerPlan]]] = {}
    for name, uses in found.items():
        lp = wanted[name]
        node, layer = uses[0]
        parent, _, part = name.rpartition(".")
        if part in _MHA_PARTS and parent and isinstance(_get(gm, parent), nn.MultiheadAttention):
            mha_parts.setdefault(parent, {})[part] = (layer, lp)
            continue
        module = _get(gm, name)
        if module is not None and (isinstance(module, _CONVS) or is_linear(module)):
            entry = linear_like(module)
            weight = entry.weight(module) if entry is not None else module.weight
            bias = entry.bias(module) if entry is not None else module.bias
            if layer.weight_effective:  # fold the forward's weight transform in
                assert layer.geometry is not None
                call = effective_call(module, layer.geometry.input_shape)
                assert isinstance(call, EffectiveCall), call
                weight, bias = call.weight, call.bias
            assert isinstance(weight, torch.Tensor)
            assert bias is None or isinstance(bias, torch.Tensor)
            f = builder.build(layer, weight, bias, lp)
            _set_module(target, name, f)
            nodes: tuple[str, ...] = ()
            pieces = get_scheme(lp.scheme).layout(layer.geometry, lp.rank)  # type: ignore[arg-type]
            for n, lay in uses:
                if module_mode:
                    break
                if lay.inside_leaf is None and n.op == "call_module" and n.target == name:
                    nodes += _inline(gm, n, name, pieces)
                else:
                    substituted = True
            records.append(RewriteRecord(name, lp.scheme, lp.rank, name, nodes))
        elif node.op == "call_function" and layer.weight is not None and not module_mode:
            for n, lay in uses:
                records.append(_rewrite_functional(gm, n, lay, lp, builder))
        else:
            raise UnsupportedLayerError(name, "lrfx does not know how to rewrite this layer")
    for parent, parts in mha_parts.items():
        mha = _get(gm, parent)
        assert isinstance(mha, nn.MultiheadAttention)
        factored: dict[str, nn.Module] = {}
        for part, (layer, lp) in parts.items():
            weight, bias = mha_projection(mha, part)
            factored[part] = builder.build(layer, weight, bias, lp)
        new = LowRankMultiheadAttention.replacing(mha, factored, parent)
        _set_module(target, parent, new)
        substituted = True
        for part, (_, lp) in parts.items():
            records.append(RewriteRecord(f"{parent}.{part}", lp.scheme, lp.rank,
                                         f"{parent}.{part}", ()))
    substituted |= _disable_fused_paths(target)
    if not module_mode:
        for node in list(gm.graph.nodes):  # dense weights of rewritten functional layers
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        _drop_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    if substituted:
        # the hook-measured calls inside leaves and attention modules (and, in module mode, the
        # whole graph) no longer describe the model
        invalidate(gm, ["shapes"])
    return tuple(records)


def _disable_fused_paths(gm: nn.Module) -> bool:
    """Keep ``nn.TransformerEncoderLayer``'s fused inference path away from factored layers.

    Its fast path reads ``linear1.weight``, ``self_attn.in_proj_weight``... directly; once any
    of its layers is factored, its attention becomes a :class:`LowRankMultiheadAttention`
    (``in_proj_bias`` is None), which makes torch take the ordinary path that calls each layer.
    Returns whether any module was replaced.
    """
    changed = False
    for name, m in list(gm.named_modules()):
        if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            continue
        if not any(isinstance(c, (Factored, LowRankMultiheadAttention)) for c in m.modules()):
            continue
        for attr in ("self_attn", "multihead_attn"):
            mha = getattr(m, attr, None)
            if isinstance(mha, nn.MultiheadAttention):
                setattr(m, attr, LowRankMultiheadAttention.replacing(mha, {}, f"{name}.{attr}"))
                changed = True
    return changed


def _get(gm: fx.GraphModule, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None
