"""Typed facts that analysis passes write onto the graph.

Per node, ``node.meta["lrfx"]`` holds one frozen :class:`NodeFacts`; per graph module,
``gm.meta["lrfx"]`` holds one frozen :class:`GraphFacts`. Shapes stay where torch puts them,
in ``node.meta["tensor_meta"]``. Nothing is ever attached to ``Node`` objects themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from lrfx.cost import ConvGeometry, Cost, Geometry, LinearGeometry

__all__ = [
    "META_KEY",
    "FrozenMap",
    "SCHEME_UNFOLDINGS",
    "GraphFacts",
    "LayerFacts",
    "LeafInfo",
    "NodeFacts",
    "Spectrum",
    "get_graph_facts",
    "get_node_facts",
    "set_graph_facts",
    "set_node_facts",
]

META_KEY = "lrfx"


class FrozenMap(Mapping[Any, Any]):
    """A read-only mapping that, unlike ``types.MappingProxyType``, can be pickled and
    deep-copied (so graph modules carrying lrfx facts can be copied, saved and traced again)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[Any, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))

#: Which matrix unfoldings' spectra rank a scheme; tucker2 has two ranks, ``(r_in, r_out)``.
SCHEME_UNFOLDINGS: Mapping[str, tuple[str, ...]] = FrozenMap(
    {
        "svd": ("rows",),
        "channel": ("channel",),
        "spatial": ("spatial",),
        "tucker2": ("mode1", "channel"),
    }
)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of one unfolding of a weight.

    Attributes:
        values: ``(groups, k)`` float64 tensor, each row sorted descending (one row per group;
            ungrouped layers have one row).
    """

    values: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.values.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.values.shape[1])

    def energy(self) -> torch.Tensor:
        """Cumulative energy ``sum_{i<=k} s_i^2 / sum_i s_i^2`` per group, shape ``(groups, k)``."""
        sq = self.values.square()
        total = sq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(sq.dtype).tiny)
        return sq.cumsum(dim=1) / total

    def rank_at_energy(self, e: float) -> int:
        """Smallest ``k`` whose energy reaches ``e`` (the largest over groups).

        Example:
            >>> Spectrum(torch.tensor([[3.0, 1.0, 0.0]])).rank_at_energy(0.9)
            1
        """
        if not 0.0 < e <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {e}")
        en = self.energy()
        # tolerance: at e = 1 the cumulative sum may fall short by rounding
        ranks = (en < e - 1e-12).sum(dim=1) + 1
        return int(ranks.clamp(max=self.max_rank).max())

    def rank_at_value(self, threshold: float) -> int:
        """Number of singular values ``>= threshold`` (the largest over groups), at least 1."""
        return max(1, int((self.values >= threshold).sum(dim=1).max()))


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
class GraphFacts:
    """The record stored in ``gm.meta["lrfx"]``.

    Attributes:
        leaves: Submodules that became leaves because they could not be traced.
        input_shapes: Shapes of the example inputs used by shape propagation.
        provided: Names of the facts the passes run so far provide.
        total_params: Parameter count of the whole module.
        extra: Pass-specific module-level facts (read-only mapping).
    """

    leaves: tuple[LeafInfo, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()
    provided: frozenset[str] = frozenset()
    total_params: int = 0
    extra: Mapping[str, Any] = field(default_factory=lambda: FrozenMap({}))

    def replace(self, **changes: Any) -> GraphFacts:
        return dataclasses.replace(self, **changes)


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


def geometry_kind(g: Geometry) -> str:
    """``linear``, ``conv2d``, ``conv_transpose2d``... for a geometry."""
    if isinstance(g, LinearGeometry):
        return "linear"
    assert isinstance(g, ConvGeometry)
    base = "conv_transpose" if g.transposed else "conv"
    return f"{base}{len(g.kernel)}d"
