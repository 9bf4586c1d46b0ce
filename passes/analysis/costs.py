"""Per-node MACs, parameters and layer geometry.

Recognizes Conv1d/2d/3d and ConvTranspose modules and functionals (groups, dilation, stride),
Linear on any number of leading dims (module or ``F.linear``), ``matmul``/``@``/``mm``/``bmm``/
``addmm``/``baddbmm``/``einsum``, ``nn.MultiheadAttention`` (projections and both attention
products), ``scaled_dot_product_attention`` and torchvision's ``shifted_window_attention``; and the
layers hidden inside leaf modules. Every number comes from :mod:`lrfx.cost`.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lrfx.cost import (
    ConvGeometry,
    Geometry,
    LinearGeometry,
    bmm_macs,
    dense_cost,
    einsum_macs,
    matmul_macs,
    sdpa_macs,
    window_attention_macs,
)
from lrfx.facts import (
    LayerFacts,
    NodeFacts,
    geometry_kind,
    get_graph_facts,
    set_node_facts,
)
from lrfx.layers import EffectiveCall, effective_call, is_linear, linear_like, transforms_weight
from lrfx.pipeline import PassContext, graph_pass
from lrfx.schemes import applicable_schemes

__all__ = ["annotate_costs", "conv_geometry", "layer_facts_for_geometry", "mha_layers"]

Shape = tuple[int, ...]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_LINEAR_FNS: set[Any] = {F.linear, torch._C._nn.linear}
_CONV_FNS: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_T_FNS: dict[Any, int] = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_MATMUL_FNS: set[Any] = {torch.matmul, operator.matmul, torch.Tensor.matmul}
# (function, index of the first of its two matrix operands)
_BMM_FNS: dict[Any, int] = {torch.bmm: 0, torch.mm: 0, torch.addmm: 1, torch.baddbmm: 1}
_MATMUL_METHODS = {"matmul": 0, "__matmul__": 0, "mm": 0, "bmm": 0, "addmm": 1, "baddbmm": 1}


def _tuple(x: Any, n: int) -> tuple[int, ...]:
    if isinstance(x, (tuple, list)):
        return tuple(int(v) for v in x)
    return (int(x),) * n


def _shape(arg: Any) -> Shape | None:
    if isinstance(arg, fx.Node):
        tm: Any = arg.meta.get("tensor_meta")
        if hasattr(tm, "shape"):
            return tuple(int(d) for d in tm.shape)
    return None


def _out_shape(node: fx.Node) -> Shape | None:
    return _shape(node)


def conv_geometry(
    m: nn.Module | None,
    x: Shape,
    y: Shape,
    *,
    weight_shape: Shape | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    bias: bool = False,
    transposed: bool = False,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """Geometry of a conv call from its module (or functional arguments) and call shapes."""
    if m is not None:
        assert isinstance(m, (*_CONVS, *_CONV_T))
        weight_shape = tuple(m.weight.shape)
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
        bias = m.bias is not None
        transposed = isinstance(m, _CONV_T)
        padding_mode = m.padding_mode
    assert weight_shape is not None
    dims = len(weight_shape) - 2
    batched = len(x) == dims + 2
    batch = x[0] if batched else 1
    in_sp, out_sp = x[-dims:], y[-dims:]
    c_in = x[-dims - 1]
    n_out = weight_shape[1] * groups if transposed else weight_shape[0]
    pad = padding if isinstance(padding, str) else _tuple(padding, dims)
    return ConvGeometry(
        in_channels=int(c_in),
        out_channels=int(n_out),
        kernel=tuple(int(k) for k in weight_shape[2:]),
        in_spatial=tuple(in_sp),
        out_spatial=tuple(out_sp),
        stride=_tuple(stride, dims),
        padding=pad,
        dilation=_tuple(dilation, dims),
        groups=int(groups),
        batch=int(batch),
        bias=bias,
        transposed=transposed,
        padding_mode=padding_mode,
    )


def layer_facts_for_geometry(
    name: str,
    g: Geometry,
    *,
    node: str,
    inside_leaf: str | None = None,
    note: str = "",
    weight: str | None = "",
    weight_rows: tuple[int, int] | None = None,
) -> LayerFacts:
    """A layer record with MACs, params and applicable schemes, all from the cost model.

    ``weight`` defaults to ``f"{name}.weight"`` (a module's own weight); pass ``None`` for a
    weight computed in the graph.
    """
    if weight == "":
        weight = f"{name}.weight"
    cost = dense_cost(g)
    schemes = applicable_schemes(g)
    if not schemes and not note and isinstance(g, ConvGeometry):
        note = "transposed conv: not factored" if g.transposed else "depthwise conv: left dense"
    return LayerFacts(
        name=name,
        kind=geometry_kind(g),
        macs=cost.macs,
        params=cost.params,
        geometry=g,
        node=node,
        inside_leaf=inside_leaf,
        weight=weight,
        weight_rows=weight_rows,
        schemes=schemes if not note else (),
        note=note,
    )


def mha_layers(
    m: nn.MultiheadAttention,
    name: str,
    q: Shape,
    k: Shape,
    v: Shape,
    *,
    node: str,
    inside_leaf: str | None = None,
) -> tuple[LayerFacts, ...]:
    """The layers of one ``nn.MultiheadAttention`` call: q/k/v projections, products, out_proj."""
    if len(q) == 2:
        batch, length, s = 1, q[0], k[0]
    elif m.batch_first:
        batch, length, s = q[0], q[1], k[1]
    else:
        length, batch, s = q[0], q[1], k[0]
    e = m.embed_dim
    has_bias = m.in_proj_bias is not None
    note = ""
    # keys attended to: the sequence, plus add_bias_kv's appended key and add_zero_attn's zeros
    keys = s + (m.bias_k is not None) + bool(m.add_zero_attn)
    projs = (("q_proj", e, length), ("k_proj", m.kdim, s), ("v_proj", m.vdim, s))
    layers = []
    for i, (part, dim, rows) in enumerate(projs):
        if m._qkv_same_embed_dim:
            weight, weight_rows = f"{name}.in_proj_weight", (i * e, (i + 1) * e)
        else:
            weight, weight_rows = f"{name}.{part}_weight", None
        layers.append(
            layer_facts_for_geometry(
                f"{name}.{part}",
                LinearGeometry(dim, e, rows=batch * rows, bias=has_bias),
                node=node,
                inside_leaf=inside_leaf,
                weight=weight,
                weight_rows=weight_rows,
                note=note,
            )
        )
    attn = 2 * batch * length * keys * e
    layers.append(
        LayerFacts(f"{name}.attention", "attention", attn, node=node, inside_leaf=inside_leaf,
                   note="attention products: no weights")
    )
    out_bias = m.out_proj.bias is not None
    layers.append(
        layer_facts_for_geometry(
            f"{name}.out_proj",
            LinearGeometry(e, e, rows=batch * length, bias=out_bias),
            node=node,
            inside_leaf=inside_leaf,
            note=note,
        )
    )
    return tuple(layers)


def _first_input(node: fx.Node) -> Any:
    """A module call's input, passed positionally or as a keyword (``self.fc(input=x)``)."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _linear_layer(m: nn.Module, name: str, x: Shape, *, node: str,
                  inside_leaf: str | None = None) -> LayerFacts:
    """An ``nn.Linear`` or a linear-like module (see :mod:`lrfx.layers`) as a layer record."""
    entry = linear_like(m)
    if entry is None:
        assert isinstance(m, nn.Linear)
        g = LinearGeometry(m.in_features, m.out_features, rows=_rows(x), bias=m.bias is not None)
        return layer_facts_for_geometry(name, g, node=node, inside_leaf=inside_leaf)
    n_in, n_out = entry.features(m)
    g = LinearGeometry(n_in, n_out, rows=_rows(x), bias=entry.bias(m) is not None)
    facts = layer_facts_for_geometry(name, g, node=node, inside_leaf=inside_leaf,
                                     weight=f"{name}.{entry.weight_attr}")
    return dataclasses.replace(facts, weight_transposed=entry.transposed)


def _effective_layer(m: nn.Module, name: str, x: Shape, y: Shape | None, *, node: str,
                     inside_leaf: str | None = None) -> LayerFacts:
    """A weight-transform layer (see :mod:`lrfx.layers`) as a layer record: the geometry of the
    op its forward makes, on the weight it computes; or left dense, with the reason."""
    kind = f"{type(m).__module__}.{type(m).__qualname__}"
    call = effective_call(m, x)
    g: Geometry
    if isinstance(call, EffectiveCall) and call.op == "linear":
        out, n_in = call.weight.shape
        g = LinearGeometry(int(n_in), int(out), rows=_rows(x), bias=call.bias is not None)
    elif isinstance(call, EffectiveCall) and y is not None:
        g = conv_geometry(None, x, y, weight_shape=tuple(call.weight.shape), stride=call.stride,
                          padding=call.padding, dilation=call.dilation, groups=call.groups,
                          bias=call.bias is not None)
    else:  # the module's own hyperparameters, for the cost; the weight is not read
        reason = call if isinstance(call, str) else f"{kind}: no output shape"
        if isinstance(m, nn.Linear):
            g = LinearGeometry(m.in_features, m.out_features, rows=_rows(x),
                               bias=m.bias is not None)
        else:
            assert y is not None
            g = conv_geometry(m, x, y)
        return layer_facts_for_geometry(name, g, node=node, inside_leaf=inside_leaf, weight=None,
                                        note=f"weight-transform layer: {reason}; left dense")
    facts = layer_facts_for_geometry(name, g, node=node, inside_leaf=inside_leaf, weight=None)
    return dataclasses.replace(facts, weight_effective=True)


def _foreign_parameters(gm: fx.GraphModule) -> dict[int, str]:
    """Parameters owned by modules that are not layers lrfx factors (an ``nn.Embedding``...),
    by identity: a layer whose weight is one of them is tied to that module."""
    out: dict[int, str] = {}
    for name, m in gm.named_modules():
        if isinstance(m, (*_CONVS, *_CONV_T, nn.MultiheadAttention)) or is_linear(m):
            continue
        for pname, p in m.named_parameters(recurse=False):
            out.setdefault(id(p), f"{name}.{pname}" if name else pname)
    return out


def _untie(layer: LayerFacts, m: nn.Module, foreign: dict[int, str]) -> LayerFacts:
    w = getattr(m, "weight", None)
    if not layer.factorable or not isinstance(w, torch.Tensor) or id(w) not in foreign:
        return layer
    return dataclasses.replace(layer, schemes=(), note=(
        f"weight tied to {foreign[id(w)]}: factoring would untie them; left dense"))


def _module_layers(gm: fx.GraphModule, node: fx.Node, foreign: dict[int, str] | None = None
                   ) -> tuple[LayerFacts, ...]:
    layers = _module_layers_of(gm, node)
    if foreign:
        m = gm.get_submodule(str(node.target))
        layers = tuple(_untie(layer, m, foreign) for layer in layers)
    return layers


def _module_layers_of(gm: fx.GraphModule, node: fx.Node) -> tuple[LayerFacts, ...]:
    assert isinstance(node.target, str)
    m = gm.get_submodule(node.target)
    x, y = _shape(_first_input(node)), _out_shape(node)
    if transforms_weight(m) and x is not None:
        return (_effective_layer(m, node.target, x, y, node=node.name),)
    if is_linear(m) and x is not None:
        return (_linear_layer(m, node.target, x, node=node.name),)
    if isinstance(m, (*_CONVS, *_CONV_T)) and x is not None and y is not None:
        cg = conv_geometry(m, x, y)
        return (layer_facts_for_geometry(node.target, cg, node=node.name),)
    if isinstance(m, nn.MultiheadAttention):
        q, k, v = _mha_args(node)
        if q is not None and k is not None and v is not None:
            return mha_layers(m, node.target, q, k, v, node=node.name)
    return ()


def _mha_args(node: fx.Node) -> tuple[Shape | None, Shape | None, Shape | None]:
    names = ("query", "key", "value")
    vals = [node.args[i] if i < len(node.args) else node.kwargs.get(names[i]) for i in range(3)]
    q, k, v = (_shape(a) for a in vals)
    return q, k, v


def _rows(x: Shape) -> int:
    rows = 1
    for d in x[:-1]:
        rows *= d
    return rows


def _weight_name(arg: Any) -> str | None:
    """Qualified name of a weight passed as a graph attribute (``None`` if computed)."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(arg.target, str):
        t = arg.target
        return t[: -len(".weight")] if t.endswith(".weight") else t
    return None


_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_PARAMS = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation",
)


def _call_args(
    fn: Callable[..., Any], node: fx.Node, names: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """Arguments of a call by parameter name (``names`` for builtins without a signature)."""
    if names is not None:
        bound_args = dict(zip(names, node.args, strict=False))
        bound_args.update(node.kwargs)
        return bound_args
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _function_layers(node: fx.Node) -> tuple[LayerFacts, ...]:
    fn = node.target
    args = node.args
    if fn in _LINEAR_FNS and len(args) >= 2:
        x, w = _shape(args[0]), _shape(args[1])
        bias = (args[2] if len(args) > 2 else node.kwargs.get("bias")) is not None
        if x is None or w is None:
            return ()
        g = LinearGeometry(w[1], w[0], rows=_rows(x), bias=bias)
        return (_functional_layer(node, args[1], g),)
    if fn in _CONV_FNS or fn in _CONV_T_FNS:
        return _functional_conv(node, transposed=fn in _CONV_T_FNS)
    if fn in _MATMUL_FNS and len(args) >= 2:
        return _product(node, "matmul", args[0], args[1], matmul_macs)
    if fn in _BMM_FNS:
        i = _BMM_FNS[fn]
        kind = getattr(fn, "__name__", "bmm")
        return _product(node, kind, args[i], args[i + 1], bmm_macs)
    if fn is torch.einsum and args:
        eq = args[0]
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        shapes = [_shape(o) for o in ops]
        if isinstance(eq, str) and all(s is not None for s in shapes):
            macs = einsum_macs(eq, [s for s in shapes if s is not None])
            return (LayerFacts(node.name, "einsum", macs, node=node.name),)
        return ()
    if fn is F.scaled_dot_product_attention:
        q, k, v = (_shape(a) for a in _first(node, 3, ("query", "key", "value")))
        if q is None or k is None or v is None:
            return ()
        return (LayerFacts(node.name, "attention", sdpa_macs(q, k, v), node=node.name),)
    if getattr(fn, "__name__", "") == "shifted_window_attention":
        return _window_attention(node, fn)  # type: ignore[arg-type]
    return ()


def _first(node: fx.Node, n: int, names: Sequence[str]) -> list[Any]:
    return [node.args[i] if i < len(node.args) else node.kwargs.get(names[i]) for i in range(n)]


def _functional_layer(node: fx.Node, weight: Any, g: Geometry) -> LayerFacts:
    name = _weight_name(weight)
    if name is None:
        return layer_facts_for_geometry(
            node.name, g, node=node.name, weight=None,
            note="weight is computed in the graph: not factored",
        )
    return layer_facts_for_geometry(name, g, node=node.name, weight=str(weight.target))


def _functional_conv(node: fx.Node, *, transposed: bool) -> tuple[LayerFacts, ...]:
    fn = node.target
    assert callable(fn)
    a = _call_args(fn, node, _CONV_T_PARAMS if transposed else _CONV_PARAMS)
    assert a is not None
    x = _shape(a.get("input"))
    w = _shape(a.get("weight"))
    y = _out_shape(node)
    if x is None or w is None or y is None:
        return ()
    g = conv_geometry(
        None,
        x,
        y,
        weight_shape=w,
        stride=a.get("stride") or 1,
        padding=a.get("padding") or 0,
        dilation=a.get("dilation") or 1,
        groups=int(a.get("groups") or 1),
        bias=a.get("bias") is not None,
        transposed=transposed,
    )
    return (_functional_layer(node, a.get("weight"), g),)


def _product(
    node: fx.Node, kind: str, a: Any, b: Any, formula: Callable[[Shape, Shape], int]
) -> tuple[LayerFacts, ...]:
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None:
        return ()
    return (LayerFacts(node.name, kind, formula(sa, sb), node=node.name),)


def _window_attention(node: fx.Node, fn: Callable[..., Any]) -> tuple[LayerFacts, ...]:
    a = _call_args(fn, node)
    if a is None:
        return ()
    x = _shape(a.get("input"))
    qkv_w, proj_w = _shape(a.get("qkv_weight")), _shape(a.get("proj_weight"))
    if x is None or qkv_w is None or proj_w is None or len(x) != 4:
        return ()
    window = tuple(int(w) for w in a["window_size"])
    qkv, attn, proj = window_attention_macs(x, window, qkv_w[0], proj_w[0])
    b, h, w, c = x
    hp, wp = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
    rows = b * hp * wp
    note = "weights are passed into torchvision's shifted_window_attention: left dense"
    layers = []
    parts = (("qkv_weight", "qkv_bias", qkv_w[0]), ("proj_weight", "proj_bias", proj_w[0]))
    for key, bias_key, out in parts:
        g = LinearGeometry(c, out, rows=rows, bias=a.get(bias_key) is not None)
        wnode = a.get(key)
        name = _weight_name(wnode) or f"{node.name}.{key}"
        attr = None
        if isinstance(wnode, fx.Node) and wnode.op == "get_attr":
            attr = str(wnode.target)
        layers.append(layer_facts_for_geometry(name, g, node=node.name, note=note, weight=attr))
    layers.insert(1, LayerFacts(f"{node.name}.attention", "attention", attn, node=node.name))
    assert layers[0].macs == qkv and layers[2].macs == proj
    return tuple(layers)


def _method_layers(node: fx.Node) -> tuple[LayerFacts, ...]:
    i = _MATMUL_METHODS.get(str(node.target))
    if i is None:
        return ()
    if i == 0:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        formula = matmul_macs if node.target in ("matmul", "__matmul__") else bmm_macs
    else:
        a, b = (node.args[1], node.args[2]) if len(node.args) > 2 else (None, None)
        formula = bmm_macs
    return _product(node, str(node.target), a, b, formula)


def _has(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _not_substitutable(layer: LayerFacts) -> LayerFacts:
    if not layer.factorable:
        return layer
    return dataclasses.replace(layer, schemes=(), note=(
        "a functional layer of a model captured in module mode: module substitution cannot "
        "replace it, left dense"))


def _leaf_layers(
    gm: fx.GraphModule, node: fx.Node, calls: Sequence[Any], leaf_macs: int | None
) -> tuple[LayerFacts, ...]:
    assert isinstance(node.target, str)
    layers: list[LayerFacts] = []
    for call in calls:
        m = gm.get_submodule(call.name)
        ins = call.input_shapes or tuple(v for _, v in call.kwargs if v)
        if transforms_weight(m) and ins:
            layers.append(_effective_layer(m, call.name, ins[0], call.output_shape,
                                           node=node.name, inside_leaf=node.target))
            continue
        if is_linear(m) and ins:
            layers.append(_linear_layer(m, call.name, ins[0], node=node.name,
                                        inside_leaf=node.target))
            continue
        if isinstance(m, _CONVS) and ins:
            g: Geometry = conv_geometry(m, ins[0], call.output_shape)
        elif isinstance(m, nn.MultiheadAttention):
            kw = dict(call.kwargs)
            names = ("query", "key", "value")
            shapes = [ins[i] if i < len(ins) else kw.get(k, ()) for i, k in enumerate(names)]
            if all(shapes):
                q, k, v = shapes
                layers.extend(
                    mha_layers(m, call.name, q, k, v, node=node.name, inside_leaf=node.target)
                )
            continue
        else:
            continue
        layers.append(layer_facts_for_geometry(call.name, g, node=node.name,
                                               inside_leaf=node.target))
    if leaf_macs is not None:
        rest = leaf_macs - sum(layer.macs for layer in layers)
        if rest > 0:
            layers.append(
                LayerFacts(f"{node.target}.<other>", "other", rest, node=node.name,
                           inside_leaf=node.target,
                           note="matmul-like work inside the leaf, measured by FlopCounterMode")
            )
    return tuple(layers)


@graph_pass(requires=["shapes"], provides=["layers"])
def annotate_costs(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Record MACs, parameters, geometry and applicable schemes of every layer.

    Reads: ``node.meta["tensor_meta"]``, and ``gm.meta["lrfx"].leaf_calls`` for leaf modules.
    Writes: ``node.meta["lrfx"]`` (a :class:`~lrfx.facts.NodeFacts`) on every node that computes
    conv/linear/matmul-like work. Does not change the graph.

    Returns:
        Total MACs of the graph.
    """
    facts = get_graph_facts(gm)
    inner = facts.leaf_calls
    leaf_macs = facts.leaf_macs
    module_mode = facts.capture.mode == "module"
    foreign = _foreign_parameters(gm)
    total = 0
    for node in gm.graph.nodes:
        layers: tuple[LayerFacts, ...] = ()
        if node.op == "call_module":
            if node.name in inner:
                layers = _leaf_layers(gm, node, inner[node.name], leaf_macs.get(node.name))
                layers = tuple(_untie(layer, gm.get_submodule(layer.name), foreign)
                               if layer.inside_leaf and _has(gm, layer.name) else layer
                               for layer in layers)
            else:
                layers = _module_layers(gm, node, foreign)
        elif node.op == "call_function":
            layers = _function_layers(node)
            if module_mode:
                layers = tuple(_not_substitutable(layer) for layer in layers)
        elif node.op == "call_method":
            layers = _method_layers(node)
        if layers:
            set_node_facts(node, NodeFacts(layers))
            total += sum(layer.macs for layer in layers)
        else:
            node.meta.pop("lrfx", None)
    return total
