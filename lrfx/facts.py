"""Typed facts that analysis passes write onto the graph.

Per node, ``node.meta["lrfx"]`` holds one frozen :class:`NodeFacts`; per graph module,
``gm.meta["lrfx"]`` holds one frozen :class:`GraphFacts` whose fields are typed (no free-form
dictionaries). Shapes stay where torch puts them, in ``node.meta["tensor_meta"]``. Nothing is
ever attached to ``Node`` objects themselves.

Facts know when they are stale: a pass that mutates the graph declares what it invalidates and
the pipeline drops it (see :mod:`lrfx.pipeline`); spectra record the :class:`WeightStamp` of the
weight they were computed from, and :func:`lrfx.mark_weights_changed` tells lrfx that weights
changed in ways torch cannot see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from lrfx.cost import ConvGeometry, Cost, Geometry, LinearGeometry
from lrfx.decompositions import Spectrum, WeightStamp
from lrfx.errors import SchemeError
from lrfx.frozen import FrozenMap
from lrfx.inputs import InputSpec
from lrfx.schemes import get_scheme, scheme_names

if TYPE_CHECKING:
    from torch import nn

    from lrfx.plan import RankPlan
    from lrfx.report import CompressionReport, RewriteRecord

__all__ = [
    "META_KEY",
    "SCHEME_UNFOLDINGS",
    "FrozenMap",
    "CaptureInfo",
    "GraphFacts",
    "InputStats",
    "LayerFacts",
    "LeafCall",
    "LeafInfo",
    "NodeFacts",
    "Spectrum",
    "WeightStamp",
    "attach_facts",
    "facts_of",
    "get_graph_facts",
    "get_node_facts",
    "set_graph_facts",
    "set_node_facts",
]

META_KEY = "lrfx"


class _SchemeUnfoldings(Mapping[str, tuple[str, ...]]):
    """Which unfoldings' spectra rank each scheme, read live from the scheme registry."""

    def __getitem__(self, scheme: str) -> tuple[str, ...]:
        try:
            return get_scheme(scheme).unfoldings
        except SchemeError:
            raise KeyError(scheme) from None

    def __iter__(self) -> Any:
        return iter(scheme_names())

    def __len__(self) -> int:
        return len(scheme_names())


#: Which matrix unfoldings' spectra rank a scheme (a live view of the scheme registry).
SCHEME_UNFOLDINGS: Mapping[str, tuple[str, ...]] = _SchemeUnfoldings()


@dataclass(frozen=True)
class LayerFacts:
    """What analysis knows about one layer call.

    Attributes:
        name: Fully qualified name of the layer (module path, or the weight's attribute path for
            functional calls; ``mha.q_proj`` style names for the parts of attention modules).
        kind: ``linear``, ``conv1d``/``conv2d``/``conv3d``, ``conv_transpose2d``..., ``matmul``,
            ``bmm``, ``einsum``, ``attention``.
        macs: Multiply-accumulates of this call.
        params: Parameters owned by the layer (weight + bias); 0 for matmul-like ops.
        geometry: Geometry for the cost model, for layers with a weight; ``None`` otherwise.
        node: Name of the graph node the call belongs to.
        inside_leaf: Qualified name of the leaf module the layer sits in, if it is not a node of
            its own (found by forward hooks; rewritten by module substitution).
        weight: Attribute path of the weight tensor in the graph module (``None`` if computed).
        weight_rows: ``(start, stop)`` row slice of that tensor owned by this layer (the q/k/v
            parts of a packed ``in_proj_weight``); ``None`` for the whole tensor.
        weight_transposed: The tensor is stored ``(in, out)`` (linear-like modules such as
            transformers' ``Conv1D``); the layer's weight is its transpose.
        weight_effective: The layer is a weight-transform layer (see :mod:`lrfx.layers`): its
            weight is the one its forward computes (read with
            :func:`lrfx.layers.effective_call`), and factoring it folds the transform in.
        schemes: Decomposition schemes that apply.
        note: Why the layer is not factorable, when it is not.
        spectra: Singular values per unfolding (see :data:`SCHEME_UNFOLDINGS`), once computed.
    """

    name: str
    kind: str
    macs: int
    params: int = 0
    geometry: Geometry | None = None
    node: str = ""
    inside_leaf: str | None = None
    weight: str | None = None
    weight_rows: tuple[int, int] | None = None
    weight_transposed: bool = False
    weight_effective: bool = False
    schemes: tuple[str, ...] = ()
    note: str = ""
    spectra: Mapping[str, Spectrum] = field(default_factory=lambda: FrozenMap({}))

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        return None if self.geometry is None else self.geometry.weight_shape

    @property
    def factorable(self) -> bool:
        return bool(self.schemes)

    @property
    def cost(self) -> Cost:
        return Cost(self.macs, self.params)

    def with_spectra(self, spectra: Mapping[str, Spectrum]) -> LayerFacts:
        return dataclasses.replace(self, spectra=FrozenMap(dict(spectra)))


@dataclass(frozen=True)
class NodeFacts:
    """The record stored in ``node.meta["lrfx"]``: the layers one graph node computes.

    A conv or linear node holds one layer; ``nn.MultiheadAttention`` holds its projections and
    attention products; a leaf module the tracer could not enter holds the layers found inside it.
    """

    layers: tuple[LayerFacts, ...] = ()

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


@dataclass(frozen=True)
class LeafInfo:
    """A submodule the tracer kept as a leaf, and why."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class LeafCall:
    """One call of a layer inside a leaf module, seen by a forward hook."""

    name: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass
class InputStats:
    """Gram matrices of one layer's inputs: ``grams[unfolding]`` is ``(groups, d, d)``.

    Attributes:
        grams: Accumulated ``X X^T`` per unfolding (``rows``, ``channel``, ``spatial``).
        count: Number of input rows (linear) or patches (conv) accumulated.
    """

    grams: dict[str, torch.Tensor]
    count: int = 0


@dataclass(frozen=True)
class CaptureInfo:
    """How the graph was captured (see :mod:`lrfx.tracing`).

    Attributes:
        mode: ``fx`` (the graph is the model: rewrites change the graph) or ``module`` (the graph
            describes one call of the model, for analysis; rewrites substitute layers into
            ``root``).
        reason: Why module mode was needed (the top-level trace error).
        notes: What the value-carrying trace fixed to the example (branches, ``.item()``...).
        root: In module mode, the copy of the model layers are substituted into.
    """

    mode: str = "fx"
    reason: str = ""
    notes: tuple[str, ...] = ()
    root: nn.Module | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        if self.mode == "fx":
            return "fx (the traced graph is the model)"
        return (f"module (the top-level forward cannot be traced: {self.reason}; layers are "
                "substituted into a copy of the model, which keeps its class)")


@dataclass(frozen=True)
class GraphFacts:
    """The record stored in ``gm.meta["lrfx"]``: typed module-level facts.

    Attributes:
        leaves: Submodules that became leaves because they could not be traced.
        input_shapes: Shapes of the example inputs used by shape propagation.
        input_dtypes: Their dtypes (``float32``, ``int64``...).
        provided: Names of the facts the passes run so far provide (and that are still valid).
        total_params: Parameter count of the whole module.
        leaf_calls: Per leaf node, the calls of the layers found inside it by hooks.
        leaf_macs: Per leaf node, its total MACs as ``FlopCounterMode`` measured them.
        input_stats: Per layer, the Gram matrices of its inputs on calibration data.
        plan: The (resolved) plan the graph was rewritten with.
        report: Before/after figures of the rewrite (same type for apply and compress).
        rewrites: What the rewrite did to each layer.
        weights_version: Bumped by :func:`lrfx.mark_weights_changed`; spectra computed at an
            older version are stale.
        input_spec: How the graph's placeholders are fed from a model call.
        capture: How the graph was captured (FX or module mode, and why).
    """

    leaves: tuple[LeafInfo, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtypes: tuple[str, ...] = ()
    provided: frozenset[str] = frozenset()
    total_params: int = 0
    leaf_calls: Mapping[str, tuple[LeafCall, ...]] = field(default_factory=lambda: FrozenMap())
    leaf_macs: Mapping[str, int] = field(default_factory=lambda: FrozenMap())
    input_stats: Mapping[str, InputStats] | None = None
    plan: RankPlan | None = None
    report: CompressionReport | None = None
    rewrites: tuple[RewriteRecord, ...] = ()
    weights_version: int = 0
    input_spec: InputSpec = field(default_factory=InputSpec)
    capture: CaptureInfo = field(default_factory=CaptureInfo)

    def replace(self, **changes: Any) -> GraphFacts:
        return dataclasses.replace(self, **changes)

    @property
    def extra(self) -> Mapping[str, Any]:
        """The typed fields under their former ``extra`` keys (read-only; kept for scripts
        written against lrfx 0.1: ``extra["plan"]``, ``extra["report"]``...)."""
        out: dict[str, Any] = {
            "inner_calls": self.leaf_calls,
            "leaf_macs": self.leaf_macs,
            "input_shapes": self.input_shapes,
        }
        if self.input_stats is not None:
            out["input_stats"] = self.input_stats
        if self.plan is not None:
            out["plan"] = self.plan
        if self.report is not None:
            out["report"] = self.report
            out["macs_before"] = self.report.macs_before
            out["macs_after"] = self.report.macs_after
        if self.rewrites:
            out["rewrites"] = self.rewrites
        return FrozenMap(out)


def get_node_facts(node: fx.Node) -> NodeFacts | None:
    """The node's lrfx facts, or ``None`` when no analysis pass has written any."""
    facts = node.meta.get(META_KEY)
    return facts if isinstance(facts, NodeFacts) else None


def set_node_facts(node: fx.Node, facts: NodeFacts) -> None:
    node.meta[META_KEY] = facts


def get_graph_facts(gm: fx.GraphModule) -> GraphFacts:
    """The module-level facts (an empty record if nothing was written yet)."""
    facts = gm.meta.get(META_KEY)
    return facts if isinstance(facts, GraphFacts) else GraphFacts()


def set_graph_facts(gm: fx.GraphModule, facts: GraphFacts) -> None:
    gm.meta[META_KEY] = facts


#: Where a module-mode result (the model itself, not a graph module) keeps its facts.
FACTS_ATTR = "_lrfx_facts"


def facts_of(model: Any) -> GraphFacts:
    """The lrfx facts of a result: ``gm.meta["lrfx"]`` of a graph module, or the record a
    module-mode result (a model that kept its own class) carries.

    Example:
        >>> import torch, lrfx
        >>> facts_of(torch.nn.Linear(2, 2)).plan is None
        True
    """
    if isinstance(model, fx.GraphModule):
        return get_graph_facts(model)
    f = getattr(model, FACTS_ATTR, None)
    return f if isinstance(f, GraphFacts) else GraphFacts()


def attach_facts(model: Any, facts: GraphFacts) -> None:
    """Store ``facts`` on a result (``gm.meta`` for graph modules, an attribute otherwise)."""
    if isinstance(model, fx.GraphModule):
        set_graph_facts(model, facts)
    else:
        object.__setattr__(model, FACTS_ATTR, facts)


def update_graph_facts(gm: fx.GraphModule, **changes: Any) -> GraphFacts:
    """Replace some fields of the module-level facts; returns the new record."""
    facts = get_graph_facts(gm).replace(**changes)
    set_graph_facts(gm, facts)
    return facts


def geometry_kind(g: Geometry) -> str:
    """``linear``, ``conv2d``, ``conv_transpose2d``... for a geometry."""
    if isinstance(g, LinearGeometry):
        return "linear"
    assert isinstance(g, ConvGeometry)
    return g.kind
