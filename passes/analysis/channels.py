"""Channel dependency groups: which channels must be pruned together.

Removing output channel ``c`` of a conv is only correct if the same channel ``c`` goes from
every tensor it flows into: its BatchNorm entry, the input channel of every consumer, the other
operand of a residual addition (and so the other producers of that sum), the matching slice of a
concatenation, the depthwise conv that maps it one to one, the squeeze-excitation scale it is
multiplied by, the rows of a Linear after ``flatten``, a channel-last LayerNorm after a permute.

The pass follows each tensor's **channel dimension** through the graph in topological order.
Every conv/linear output starts a new *channel space*; elementwise ops, pooling, norms, depthwise
convs, permutes and flattens carry spaces along (a flatten remembers how many features each
channel became); a concatenation along the channel dim lays spaces side by side; an elementwise
op between two tensors unifies their spaces. A grouped conv couples its input and output
channels group by group: both sides must keep the same channels in each of its groups (the
group's ``blocks``), so its groups stay equal. Unifications are edges of a :mod:`networkx` graph
over spaces, and its connected components are the **groups**. Each group records its *members*:
what to slice in which module or attribute, at which offset.

A group is **prunable** unless one of its spaces is *fixed*: it reaches the model's output (whose
shape must not change), comes from an input or from an op the pass does not model, is used by an
op it does not model (a reshape, an indexing, a grouped conv, a module it cannot see into...), or
belongs to a module that is called more than once or shares its weight. Those groups are left
alone, with the reason, so a plan can never produce a silently wrong model.

Reads ``node.meta["tensor_meta"]`` (the shapes pass) and the modules; writes nothing on the
graph; returns :class:`ChannelGroups`. Does not mutate.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from lrfx.modules import Gate
from lrfx.pipeline import PassContext, graph_pass

__all__ = ["ChannelGroup", "ChannelGroups", "Member", "find_channel_groups"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Modules that map each channel to itself (elementwise, pooling over space, dropout).
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)

#: Functions and tensor methods (by name) that map each channel to itself.
_CHANNELWISE_FNS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, F.hardswish,
    F.hardsigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_max_pool2d, F.interpolate, torch.clamp, torch.neg, torch.abs,
}
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "clamp",
    "clamp_", "neg", "abs", "detach", "float", "half", "bfloat16", "to",
}
_BINARY_FNS: set[Any] = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
    operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
#: Uses of a tensor that do not touch its values.
_META_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class Member:
    """One thing to slice when a group's channels go.

    Attributes:
        role: ``out`` (a conv/linear's output channels: weight rows and bias), ``in`` (a
            conv/linear's input channels: weight columns), ``depthwise`` (a depthwise conv:
            in = out = groups), ``norm`` (BatchNorm / LayerNorm / rank-gate entries),
            ``param`` (a graph attribute multiplied channelwise, such as ConvNeXt's layer scale,
            or the affine parameters of ``F.layer_norm``), ``shape`` (the ``normalized_shape``
            argument of an ``F.layer_norm`` node, ``target`` being the node's name).
        target: The module's (or attribute's) qualified name.
        offset: Where the group's channels start in the member's channel dimension (non-zero
            after a concatenation).
        inner: Features per channel (a Linear after ``flatten`` sees ``inner`` per channel).
        dim: The dimension of the attribute that is sliced (``param`` only).
        node: The graph node that uses the member.
    """

    role: str
    target: str
    offset: int = 0
    inner: int = 1
    dim: int = 0
    node: str = ""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    Attributes:
        index: The group's number (graph order of its first producer).
        channels: How many channels the group has.
        members: What is sliced when a channel goes.
        reason: Why the group cannot be pruned (empty when it can).
        blocks: A grouped conv splits the channels into this many consecutive blocks (its
            groups), and each block must keep the same channels: a mask is periodic with period
            ``channels // blocks``. 1 for groups no grouped conv touches.
    """

    index: int
    channels: int
    members: tuple[Member, ...]
    reason: str = ""
    blocks: int = 1

    @property
    def prunable(self) -> bool:
        return not self.reason

    @property
    def producers(self) -> tuple[str, ...]:
        """The conv/linear layers whose output channels the group is."""
        return tuple(m.target for m in self.members if m.role == "out")

    @property
    def name(self) -> str:
        """The group's name in a plan: its first producer (or first member)."""
        producers = self.producers
        return producers[0] if producers else self.members[0].target

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(m.target for m in self.members if m.role == "norm")


@dataclass(frozen=True)
class ChannelGroups:
    """The result of :func:`find_channel_groups`: every group, prunable or not.

    Example:
        >>> import torch, lrfx
        >>> from lrfx.passes.analysis import find_channel_groups
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> groups = lrfx.channel_groups(net, torch.randn(1, 3, 8, 8))
        >>> [(g.name, g.channels, g.prunable) for g in groups]
        [('0', 8, True), ('3', 4, False)]
    """

    groups: tuple[ChannelGroup, ...] = ()
    by_name: dict[str, ChannelGroup] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, ChannelGroup] = {}
        for g in self.groups:
            for p in g.producers or (g.name,):
                index.setdefault(p, g)
        object.__setattr__(self, "by_name", index)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> ChannelGroup:
        return self.by_name[name]

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @property
    def blocked(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if not g.prunable)


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's channels are: dimension ``dim`` holds segments ``(space, length)`` side
    by side, each channel spread over ``inner`` consecutive entries (after a flatten)."""

    dim: int
    segs: tuple[tuple[int, int], ...]
    inner: int = 1
    ndim: int = 0

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segs)


def _shape(n: Any) -> tuple[int, ...] | None:
    if not isinstance(n, fx.Node):
        return None
    tm: Any = n.meta.get("tensor_meta")
    if hasattr(tm, "shape"):
        return tuple(int(d) for d in tm.shape)
    return None


class _Finder:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.graph: nx.Graph = nx.Graph()
        self.lengths: dict[int, int] = {}
        self.fixed: dict[int, str] = {}
        self.members: dict[int, list[Member]] = {}
        self.layouts: dict[fx.Node, _Layout] = {}
        self.blocks: dict[int, int] = {}  # space -> grouped convs' groups it must prune alike
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.calls = calls
        seen: dict[int, str] = {}
        self.shared: set[str] = set()
        for name, p in gm.named_parameters(remove_duplicate=False):
            owner = name.rpartition(".")[0]
            if id(p) in seen and seen[id(p)] != owner:
                self.shared.update((owner, seen[id(p)]))
            seen.setdefault(id(p), owner)

    # -- spaces ---------------------------------------------------------------------------
    def space(self, length: int, fixed: str = "") -> int:
        s = len(self.lengths)
        self.lengths[s] = length
        self.graph.add_node(s)
        if fixed:
            self.fixed[s] = fixed
        return s

    def produce(self, length: int, target: str, node: fx.Node, ndim: int, dim: int,
                fixed: str = "") -> _Layout:
        """A new space: the output channels of conv/linear ``target``."""
        s = self.space(length, fixed)
        self.members[s] = [Member("out", target, node=node.name)]
        return _Layout(dim, ((s, length),), ndim=ndim)

    def fix(self, layout: _Layout | None, why: str) -> None:
        if layout is not None:
            for s, _ in layout.segs:
                self.fixed.setdefault(s, why)

    def fix_inputs(self, node: fx.Node, why: str) -> None:
        for a in node.all_input_nodes:
            self.fix(self.layouts.get(a), why)

    def add(self, layout: _Layout, role: str, target: str, node: fx.Node, **kw: Any) -> None:
        off = 0
        for s, length in layout.segs:
            self.members.setdefault(s, []).append(
                Member(role, target, offset=off, node=node.name, **kw))
            off += length

    def unify(self, a: _Layout, b: _Layout, node: fx.Node) -> bool:
        if [n for _, n in a.segs] != [n for _, n in b.segs] or a.inner != b.inner:
            why = f"{node.name} combines channel layouts that do not line up"
            self.fix(a, why)
            self.fix(b, why)
            return False
        for (sa, _), (sb, _) in zip(a.segs, b.segs, strict=True):
            self.graph.add_edge(sa, sb)
        return True

    # -- ops ------------------------------------------------------------------------------
    def run(self) -> ChannelGroups:
        for node in self.gm.graph.nodes:
            out = self.visit(node)
            if out is not None:
                self.layouts[node] = out
        return self.groups()

    def visit(self, node: fx.Node) -> _Layout | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for a in node.all_input_nodes:
                self.fix(self.layouts.get(a), "reaches the model's output")
            return None
        ins = [self.layouts.get(a) for a in node.all_input_nodes]
        if not any(ins) and not self._makes_channels(node):
            return None
        try:
            return self._visit(node)
        except _UnknownOpError as exc:
            self.fix_inputs(node, str(exc) or f"used by {node.name} ({_describe(node)}), "
                            "which lrfx does not follow channel by channel")
            return None

    def _makes_channels(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(
            self.modules.get(str(node.target)), (*_CONVS, nn.Linear))

    def _visit(self, node: fx.Node) -> _Layout | None:
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        if node.op == "call_function":
            return self._function(node, node.target)
        if node.op == "call_method":
            return self._method(node, str(node.target))
        raise _UnknownOpError()

    def _x(self, node: fx.Node) -> _Layout | None:
        a = node.args[0] if node.args else None
        return self.layouts.get(a) if isinstance(a, fx.Node) else None

    def _module(self, node: fx.Node, m: nn.Module) -> _Layout | None:
        name = str(node.target)
        x = self._x(node)
        if isinstance(m, (*_CONVS, nn.Linear)) and (self.calls[name] > 1 or name in self.shared):
            why = (f"{name} is called {self.calls[name]} times" if self.calls[name] > 1
                   else f"{name} shares its weight with another module")
            self.fix(x, why)
            out_len = m.out_channels if isinstance(m, _CONVS) else m.out_features
            nd = len(_shape(node) or (0,))
            return self.produce(out_len, name, node, nd, 1 if isinstance(m, _CONVS) else nd - 1,
                                why)
        if isinstance(m, _CONVS):
            return self._conv(node, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(node, m, x)
        if isinstance(m, _BNS):
            if x is None or x.dim != 1 or x.inner != 1:
                raise _UnknownOpError()
            if m.affine or m.track_running_stats:
                self.add(x, "norm", name, node)
            return x
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, x, tuple(m.normalized_shape), name)
        if isinstance(m, Gate):
            if x is None or x.inner != 1 or x.dim != m.dim % x.ndim or x.channels != len(m.weight):
                raise _UnknownOpError()
            self.add(x, "norm", name, node)
            return x
        if isinstance(m, _CHANNELWISE_MODULES):
            if x is None or x.inner != 1:
                raise _UnknownOpError()
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.add(x, "norm", name, node)
            return x
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        raise _UnknownOpError()

    def _conv(self, node: fx.Node, m: nn.Conv1d | nn.Conv2d | nn.Conv3d,
              x: _Layout | None) -> _Layout:
        name = str(node.target)
        shape = _shape(node) or ()
        if m.groups == 1:
            if x is not None:
                if x.dim != 1 or x.inner != 1 or x.channels != m.in_channels:
                    raise _UnknownOpError()
                self.add(x, "in", name, node)
            return self.produce(m.out_channels, name, node, len(shape), 1)
        if x is None:
            why = f"the input of {name} comes from an op lrfx does not follow"
            return self.produce(m.out_channels, name, node, len(shape), 1, why)
        if x.dim != 1 or x.inner != 1 or x.channels != m.in_channels:
            raise _UnknownOpError()
        if m.groups == m.in_channels == m.out_channels:
            self.add(x, "depthwise", name, node)
            return x
        if len(x.segs) != 1:
            why = (f"{name} is a grouped conv over a concatenation; its channels are left "
                   "whole")
            self.fix(x, why)
            return self.produce(m.out_channels, name, node, len(shape), 1, why)
        # a grouped conv: the same channels go from each of its groups, on both sides
        self.add(x, "in", name, node)
        self.blocks[x.segs[0][0]] = math.lcm(self.blocks.get(x.segs[0][0], 1), m.groups)
        out = self.produce(m.out_channels, name, node, len(shape), 1)
        self.blocks[out.segs[0][0]] = m.groups
        return out

    def _linear(self, node: fx.Node, m: nn.Linear, x: _Layout | None) -> _Layout:
        name = str(node.target)
        shape = _shape(node) or (m.out_features,)
        if x is not None:
            if x.dim != x.ndim - 1 or x.channels * x.inner != m.in_features:
                raise _UnknownOpError()
            self.add(x, "in", name, node, inner=x.inner)
        return self.produce(m.out_features, name, node, len(shape), len(shape) - 1)

    def _layer_norm(self, node: fx.Node, x: _Layout | None, normalized: tuple[int, ...],
                    target: str | None, params: Sequence[Any] = ()) -> _Layout:
        if x is None or len(normalized) != 1 or x.dim != x.ndim - 1 or x.inner != 1:
            raise _UnknownOpError()
        if target is not None:
            self.add(x, "norm", target, node)
        else:  # F.layer_norm: its normalized_shape is a constant of the graph
            self.add(x, "shape", node.name, node)
        for p in params:
            if isinstance(p, fx.Node) and p.op == "get_attr":
                self.add(x, "param", str(p.target), node, dim=0)
            elif isinstance(p, fx.Node):
                raise _UnknownOpError()
        return x

    def _flatten(self, node: fx.Node, x: _Layout | None, start: int, end: int) -> _Layout:
        if x is None:
            raise _UnknownOpError()
        nd = x.ndim
        start, end = start % nd, end % nd
        if end != nd - 1 or start > x.dim:
            raise _UnknownOpError()
        if start == x.dim == end:
            return x
        if start < x.dim:
            raise _UnknownOpError()
        shape = _shape(node.args[0]) or ()
        inner = x.inner
        for d in range(x.dim + 1, nd):
            inner *= shape[d]
        return _Layout(start, x.segs, inner, ndim=start + 1)

    def _function(self, node: fx.Node, fn: Any) -> _Layout | None:
        x = self._x(node)
        if fn in _CHANNELWISE_FNS or _is_stochastic_depth(fn):
            if x is None or (x.inner != 1 and fn not in (F.dropout, torch.clamp, torch.neg)):
                raise _UnknownOpError()
            return x
        if fn in _BINARY_FNS:
            return self._binary(node)
        if fn in (torch.cat, torch.concat):
            return self._cat(node)
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, int(start), int(end))  # type: ignore[arg-type]
        if fn is torch.permute:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
            return self._permute(node, x, dims)
        if fn is F.layer_norm:
            normalized = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            params = [*node.args[2:4], node.kwargs.get("weight"), node.kwargs.get("bias")]
            return self._layer_norm(node, x, tuple(normalized), None,  # type: ignore[arg-type]
                                    [p for p in params if p is not None])
        if fn is torch.mean:
            return self._mean(node, x)
        if fn is getattr and node.args[1] in ("shape", "dtype", "device"):
            return None
        if fn is operator.getitem:
            return self._getitem(node, x)
        if fn is F.pad:
            return self._pad(node, x)
        raise _UnknownOpError()

    def _method(self, node: fx.Node, name: str) -> _Layout | None:
        x = self._x(node)
        if name in _META_METHODS:
            return None
        if name in _CHANNELWISE_METHODS:
            if x is None:
                raise _UnknownOpError()
            return x
        if name in _BINARY_METHODS:
            return self._binary(node)
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, int(start), int(end))  # type: ignore[arg-type]
        if name == "permute":
            dims = node.args[1:] if len(node.args) > 2 else (
                node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"))
            return self._permute(node, x, dims)
        if name in ("view", "reshape") and x is not None:
            # x.view(x.size(0), -1) is a flatten from dim 1; any other shape is not followed
            target = node.args[1:]
            if len(target) == 1 and isinstance(target[0], (tuple, list)):
                target = tuple(target[0])
            if len(target) == 2 and target[1] == -1 and x.dim >= 1:
                shape = _shape(node.args[0]) or ()
                if shape and isinstance(target[0], (int, fx.Node)):
                    if isinstance(target[0], int) and target[0] != shape[0]:
                        raise _UnknownOpError()
                    return self._flatten(node, x, 1, -1)
            raise _UnknownOpError()
        if name == "mean":
            return self._mean(node, x)
        raise _UnknownOpError()

    def _getitem(self, node: fx.Node, x: _Layout | None) -> _Layout | None:
        """``x[:, :, ::2, ::2]``: slicing that leaves the channel dimension whole."""
        if x is None:
            raise _UnknownOpError()
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, slice) for i in index) or x.inner != 1:
            raise _UnknownOpError()
        if x.dim < len(index) and index[x.dim] != slice(None):
            raise _UnknownOpError()
        return x

    def _pad(self, node: fx.Node, x: _Layout | None) -> _Layout:
        """``F.pad`` of the trailing (spatial) dimensions only."""
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if x is None or x.inner != 1 or not isinstance(pad, (tuple, list)):
            raise _UnknownOpError()
        padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
        if x.dim in padded:
            raise _UnknownOpError(f"{node.name} pads the channel dimension (a shortcut that "
                                  "adds zero channels); its channels are left whole")
        return x

    def _mean(self, node: fx.Node, x: _Layout | None) -> _Layout:
        if x is None or x.inner != 1:
            raise _UnknownOpError()
        dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if dims is None:
            raise _UnknownOpError()
        dims = [int(d) % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if x.dim in dims:
            raise _UnknownOpError()
        if keep:
            return x
        return _Layout(x.dim - sum(d < x.dim for d in dims), x.segs, ndim=x.ndim - len(dims))

    def _permute(self, node: fx.Node, x: _Layout | None, dims: Any) -> _Layout:
        if x is None or x.inner != 1 or not isinstance(dims, (tuple, list)):
            raise _UnknownOpError()
        dims = [int(d) % x.ndim for d in dims]
        return _Layout(dims.index(x.dim), x.segs, ndim=x.ndim)

    def _cat(self, node: fx.Node) -> _Layout:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (tuple, list)):
            raise _UnknownOpError()
        layouts = [self.layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        shape = _shape(node) or ()
        if not shape:
            raise _UnknownOpError()
        dim = int(dim) % len(shape)  # type: ignore[arg-type]
        segs: list[tuple[int, int]] = []
        ref: _Layout | None = None
        for t, lay in zip(tensors, layouts, strict=True):
            if lay is not None and lay.inner != 1:
                raise _UnknownOpError()
            if lay is not None and lay.dim != dim:  # concatenating along another dim
                if ref is None:
                    ref = lay
                elif not self.unify(ref, lay, node):
                    raise _UnknownOpError(f"{node.name} concatenates tensors whose channels differ")
                continue
            if lay is None:
                size = (_shape(t) or (0,) * len(shape))[dim]
                lay = _Layout(dim, ((self.space(size, f"comes from an untracked input of "
                                                f"{node.name}"), size),), ndim=len(shape))
            segs.extend(lay.segs)
        if ref is not None:
            if segs:
                raise _UnknownOpError()
            if any(lay is None for lay in layouts):
                raise _UnknownOpError()
            return ref
        return _Layout(dim, tuple(segs), ndim=len(shape))

    def _binary(self, node: fx.Node) -> _Layout:
        shape = _shape(node)
        if shape is None:
            raise _UnknownOpError()
        nd = len(shape)
        operands = [a for a in (*node.args[:2], node.kwargs.get("other")) if a is not None]
        result: _Layout | None = None
        others: list[fx.Node] = []
        for a in operands:
            lay = self.layouts.get(a) if isinstance(a, fx.Node) else None
            if lay is None:
                if isinstance(a, fx.Node):
                    others.append(a)
                continue
            lay = _Layout(lay.dim + nd - lay.ndim, lay.segs, lay.inner, nd)
            if result is None:
                result = lay
            elif not self.unify(result, lay, node):
                raise _UnknownOpError(
                    f"{node.name} adds or multiplies tensors whose channels differ")
        if result is None:
            raise _UnknownOpError()
        for a in others:  # a tensor without channel facts: fine only if it broadcasts
            s = _shape(a)
            if s is None:
                continue
            d = result.dim - (nd - len(s))
            if d < 0 or s[d] == 1:
                continue
            if a.op == "get_attr" and s[d] == result.channels and result.inner == 1:
                self.add(result, "param", str(a.target), node, dim=d)
                continue
            raise _UnknownOpError(f"{node.name} combines the channels with a per-channel tensor "
                           f"({a.name}) lrfx does not follow")
        return result

    # -- result ---------------------------------------------------------------------------
    def groups(self) -> ChannelGroups:
        out: list[ChannelGroup] = []
        for comp in sorted(nx.connected_components(self.graph), key=min):
            spaces = sorted(comp)
            members: list[Member] = []
            for s in spaces:
                members.extend(self.members.get(s, ()))
            if not members:
                continue
            reasons = [self.fixed[s] for s in spaces if s in self.fixed]
            channels = self.lengths[spaces[0]]
            producers = [m for m in members if m.role == "out"]
            reason = reasons[0] if reasons else ""
            if not reason and not producers:
                reason = "no conv or linear layer produces these channels"
            blocks = math.lcm(*(self.blocks.get(s, 1) for s in spaces))
            if not reason and (channels % blocks or channels == blocks):
                reason = (f"grouped convs split these {channels} channels into {blocks} groups "
                          "of one channel or less; they are left whole")
            out.append(ChannelGroup(len(out), channels, _unique(members), reason, blocks))
        return ChannelGroups(tuple(out))


def _unique(members: list[Member]) -> tuple[Member, ...]:
    seen: dict[tuple[str, str, int], Member] = {}
    for m in members:
        seen.setdefault((m.role, m.target, m.offset), m)
    return tuple(seen.values())


def _is_stochastic_depth(fn: Any) -> bool:
    # torchvision.ops.stochastic_depth: drops whole samples (a per-sample scale), never a channel
    return getattr(fn, "__name__", "") == "stochastic_depth" and getattr(
        fn, "__module__", "").startswith("torchvision")


class _UnknownOpError(Exception):
    """The op is not one the pass follows; its channel inputs are fixed."""


def _describe(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t))


@graph_pass(requires=["shapes"])
def find_channel_groups(gm: fx.GraphModule, ctx: PassContext) -> ChannelGroups:
    """Find the groups of channels that must be pruned together (see the module docstring).

    Reads the shapes on the nodes and the graph's modules; writes nothing; does not mutate.
    """
    return _Finder(gm).run()
