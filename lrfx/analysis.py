"""The result of analysis as data: one :class:`LayerRecord` per layer, totals, leaves.

:class:`Analysis` is built from the facts the analysis passes wrote on a graph
(:meth:`Analysis.from_graph`); :func:`lrfx.analyze` is the one call that traces, runs the passes
and returns it.

Example:
    >>> import torch, torchvision, lrfx
    >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    >>> a.total_macs
    1814073344
    >>> a["layer1.0.conv1"].rank_at_energy("channel", 0.9) <= 64
    True
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from lrfx.cost import Geometry
from lrfx.errors import SchemeError
from lrfx.facts import FrozenMap, LayerFacts, LeafInfo, Spectrum, get_graph_facts
from lrfx.facts import get_node_facts as _node_facts
from lrfx.schemes import get_scheme

__all__ = ["ENERGY_LEVELS", "Analysis", "LayerRecord"]

#: Energy levels reported by tables and JSON.
ENERGY_LEVELS = (0.90, 0.95, 0.99)


@dataclass(frozen=True)
class LayerRecord:
    """Everything known about one layer, over all its calls.

    Attributes:
        name: Fully qualified layer name (the key a :class:`~lrfx.RankPlan` uses).
        kind: ``conv2d``, ``linear``, ``matmul``, ``attention``...
        macs: MACs of all calls together.
        params: Parameters of the layer (weight + bias), counted once.
        share: Fraction of the model's total MACs.
        calls: Geometry of each call (empty for matmul-like ops).
        schemes: Decomposition schemes that apply (empty: not factorable, see ``note``).
        note: Why the layer is not factorable.
        inside_leaf: The leaf module the layer hides in, if any.
        spectra: Singular values per unfolding.
        folded: A weight-transform layer (weight standardization...): its spectra and factors
            are those of the weight its forward computes (see :mod:`lrfx.layers`).
        types: Class names of the layer's module and its bases (``("Linear", "Module")``);
            empty for functional layers and the parts of attention modules.
    """

    name: str
    kind: str
    macs: int
    params: int
    share: float
    calls: tuple[Geometry, ...] = ()
    schemes: tuple[str, ...] = ()
    note: str = ""
    inside_leaf: str | None = None
    spectra: Mapping[str, Spectrum] = field(default_factory=lambda: FrozenMap({}))
    folded: bool = False
    types: tuple[str, ...] = ()

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        return self.calls[0].weight_shape if self.calls else None

    @property
    def factorable(self) -> bool:
        return bool(self.schemes)

    def max_rank(self, scheme: str) -> int | tuple[int, ...]:
        """Largest rank of ``scheme`` (a pair for tucker2)."""
        r = get_scheme(scheme).max_rank(self.calls[0])
        return r[0] if len(r) == 1 else r

    def rank_at_energy(self, scheme: str, e: float) -> int | tuple[int, ...]:
        """Smallest rank keeping energy fraction ``e`` of the scheme's spectrum (TRP criterion).

        Raises:
            KeyError: No spectrum for this scheme (not applicable, or spectra not computed).
        """
        try:
            units = get_scheme(scheme).unfoldings
        except SchemeError:
            units = ()
        if not units or any(u not in self.spectra for u in units):
            raise KeyError(f"layer {self.name!r} has no spectrum for scheme {scheme!r}")
        ranks = tuple(self.spectra[u].rank_at_energy(e) for u in units)
        return ranks[0] if len(ranks) == 1 else ranks

    @property
    def primary_scheme(self) -> str | None:
        """The scheme tables report energy ranks for: svd for linear, channel for convs."""
        for s in ("svd", "channel"):
            if s in self.schemes:
                return s
        return None

    def to_dict(self, spectra: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape) if self.weight_shape else None,
            "macs": self.macs,
            "params": self.params,
            "share": self.share,
            "calls": len(self.calls),
            "schemes": list(self.schemes),
        }
        if self.note:
            d["note"] = self.note
        if self.inside_leaf:
            d["inside_leaf"] = self.inside_leaf
        if self.folded:
            d["folded"] = True
        if self.spectra:
            d["rank_at_energy"] = {
                s: {f"{e:g}": self.rank_at_energy(s, e) for e in ENERGY_LEVELS}
                for s in self.schemes
                if get_scheme(s).unfoldings and all(u in self.spectra
                                                    for u in get_scheme(s).unfoldings)
            }
            if spectra:
                d["singular_values"] = {u: sp.values.tolist() for u, sp in self.spectra.items()}
        return d


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze`: per-layer records and totals.

    Attributes:
        layers: One record per layer, in graph order.
        total_macs: MACs of the whole model at the example input size.
        total_params: Parameters of the whole model (BN and everything else included).
        input_shapes: Shapes of the example inputs.
        leaves: Submodules kept as leaves, with the reason.
        model: Class name of the analyzed model.
        mode: How the model was captured: ``fx`` or ``module`` (see :mod:`lrfx.tracing`).
        mode_reason: Why module mode was used (the top-level trace error).
        notes: What module mode's trace fixed to the example inputs (branches taken...).
    """

    layers: tuple[LayerRecord, ...]
    total_macs: int
    total_params: int
    input_shapes: tuple[tuple[int, ...], ...] = ()
    leaves: tuple[LeafInfo, ...] = ()
    model: str = ""
    mode: str = "fx"
    mode_reason: str = ""
    notes: tuple[str, ...] = ()

    @functools.cached_property
    def _index(self) -> dict[str, LayerRecord]:
        return {layer.name: layer for layer in self.layers}

    def __getitem__(self, name: str) -> LayerRecord:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r}; layers are: "
                           f"{', '.join(self.names[:20])}...") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def factorable(self) -> tuple[LayerRecord, ...]:
        return tuple(layer for layer in self.layers if layer.factorable)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule) -> Analysis:
        """Collect the facts the analysis passes wrote on ``gm`` into one record per layer."""
        merged: dict[str, list[LayerFacts]] = {}
        for node in gm.graph.nodes:
            facts = _node_facts(node)
            if facts is not None:
                for layer in facts.layers:
                    merged.setdefault(layer.name, []).append(layer)
        total = sum(layer.macs for calls in merged.values() for layer in calls)
        records = []
        for name, calls in merged.items():
            first = calls[0]
            macs = sum(c.macs for c in calls)
            records.append(
                LayerRecord(
                    name=name,
                    kind=first.kind,
                    macs=macs,
                    params=first.params,
                    share=macs / total if total else 0.0,
                    calls=tuple(c.geometry for c in calls if c.geometry is not None),
                    schemes=first.schemes,
                    note=first.note,
                    inside_leaf=first.inside_leaf,
                    spectra=first.spectra,
                    folded=first.weight_effective,
                    types=_types(gm, name),
                )
            )
        g = get_graph_facts(gm)
        return cls(
            layers=tuple(records),
            total_macs=total,
            total_params=g.total_params,
            input_shapes=g.input_shapes,
            leaves=g.leaves,
            model=type(gm).__name__,
            mode=g.capture.mode,
            mode_reason=g.capture.reason,
            notes=g.capture.notes,
        )

    def to_dict(self, spectra: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "notes": list(self.notes),
            "leaves": [{"name": x.name, "type": x.type, "reason": x.reason} for x in self.leaves],
            "layers": [layer.to_dict(spectra) for layer in self.layers],
        }

    def to_json(self, spectra: bool = False, indent: int | None = 2) -> str:
        """JSON of the analysis; ``spectra=True`` includes every singular value."""
        return json.dumps(self.to_dict(spectra), indent=indent)

    def rows(self) -> list[dict[str, str]]:
        """The table's rows as strings (used by :meth:`table` and the CLI)."""
        out = []
        for layer in self.layers:
            scheme = layer.primary_scheme
            ranks = ["", "", ""]
            if scheme and layer.spectra:
                ranks = [str(layer.rank_at_energy(scheme, e)) for e in ENERGY_LEVELS]
            out.append(
                {
                    "layer": layer.name,
                    "kind": layer.kind + ("*" if layer.folded else ""),
                    "shape": "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "",
                    "MACs": f"{layer.macs:,}",
                    "params": f"{layer.params:,}" if layer.params else "",
                    "%": f"{100 * layer.share:.2f}",
                    "max r": str(layer.max_rank(scheme)) if scheme else "",
                    "r90": ranks[0],
                    "r95": ranks[1],
                    "r99": ranks[2],
                }
            )
        return out

    def table(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        rows = self.rows()
        cols = ["layer", "kind", "shape", "MACs", "params", "%", "max r", "r90", "r95", "r99"]
        width = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
        left = {"layer", "kind", "shape"}

        def fmt(r: Mapping[str, str]) -> str:
            cells = (r[c].ljust(width[c]) if c in left else r[c].rjust(width[c]) for c in cols)
            return "  ".join(cells).rstrip()

        lines = [fmt({c: c for c in cols}), "  ".join("-" * width[c] for c in cols)]
        lines += [fmt(r) for r in rows]
        lines.append(
            f"total: {self.total_macs:,} MACs ({self.total_macs / 1e9:.3f} G), "
            f"{self.total_params:,} parameters, {len(self.factorable)} factorable layers"
        )
        lines += self.footer()
        return "\n".join(lines)

    def footer(self) -> list[str]:
        """Lines after the table: capture mode, leaves, folded layers."""
        lines = []
        if self.mode == "module":
            lines.append(f"captured in module mode: {self.mode_reason}; layers are replaced by "
                         "module substitution (the compressed model keeps its class)")
        for leaf in self.leaves:
            lines.append(f"leaf module {leaf.name} ({leaf.type}): {leaf.reason}")
        if any(layer.folded for layer in self.layers):
            lines.append("* weight-transform layer: the weight its forward computes is analyzed "
                         "and factored (the transform is folded in)")
        return lines


def _types(gm: fx.GraphModule, name: str) -> tuple[str, ...]:
    """Class names of the module called ``name`` and its bases (empty when there is none)."""
    try:
        module = gm.get_submodule(name)
    except AttributeError:
        return ()
    return tuple(c.__name__ for c in type(module).__mro__
                 if issubclass(c, nn.Module) and c is not nn.Module)
