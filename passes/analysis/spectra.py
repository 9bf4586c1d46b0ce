"""Singular-value spectra of every factorable layer, for each scheme that applies."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import fx

from lrfx.decompositions import singular_values
from lrfx.facts import (
    SCHEME_UNFOLDINGS,
    LayerFacts,
    NodeFacts,
    Spectrum,
    get_node_facts,
    set_node_facts,
)
from lrfx.pipeline import PassContext, graph_pass
from lrfx.progress import progress_bar

__all__ = ["compute_spectra", "layer_weight"]

log = logging.getLogger(__name__)


def layer_weight(gm: fx.GraphModule, layer: LayerFacts) -> torch.Tensor | None:
    """The weight tensor a layer record refers to (its row slice for packed projections)."""
    if layer.weight is None:
        return None
    w: torch.Tensor
    try:
        w = gm.get_parameter(layer.weight)
    except AttributeError:
        try:
            w = gm.get_buffer(layer.weight)
        except AttributeError:
            return None
    if layer.weight_rows is not None:
        w = w[layer.weight_rows[0] : layer.weight_rows[1]]
    return w


def _unfoldings(layer: LayerFacts) -> Iterator[str]:
    seen: set[str] = set()
    for scheme in layer.schemes:
        for u in SCHEME_UNFOLDINGS.get(scheme, ()):
            if u not in seen:
                seen.add(u)
                yield u


@graph_pass(requires=["layers"], provides=["spectra"])
def compute_spectra(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Compute the singular values of each factorable layer, once per weight and unfolding.

    Reads: ``node.meta["lrfx"]`` (layers and their schemes) and the weights. Writes: the layer
    records again, with ``spectra`` filled in (one :class:`~lrfx.facts.Spectrum` per unfolding,
    shared between the calls of a shared layer). A weight holding NaN or Inf gets no spectra and
    a note saying so. Does not change the graph.

    Returns:
        How many distinct spectra were computed.
    """
    per_node = [(n, f) for n in gm.graph.nodes if (f := get_node_facts(n)) is not None]
    cache: dict[tuple[str, tuple[int, int] | None, str], Spectrum] = {}
    bad: set[str] = set()
    todo = sum(layer.factorable for _, f in per_node for layer in f.layers)
    with progress_bar("spectra", total=todo, enabled=ctx.progress) as advance:
        for node, facts in per_node:
            layers = []
            for layer in facts.layers:
                if not layer.factorable:
                    layers.append(layer)
                    continue
                advance()
                w = layer_weight(gm, layer)
                if w is None:
                    layers.append(layer)
                    continue
                key_w = (layer.weight or "", layer.weight_rows)
                if layer.weight in bad or not bool(torch.isfinite(w).all()):
                    bad.add(layer.weight or "")
                    log.warning("layer %r: weight holds NaN or Inf; no spectra", layer.name)
                    note = "weight holds NaN or Inf values: not factored"
                    layers.append(dataclasses.replace(layer, schemes=(), note=note))
                    continue
                groups = getattr(layer.geometry, "groups", 1)
                spectra: dict[str, Spectrum] = {}
                for u in _unfoldings(layer):
                    key = (*key_w, u)
                    if key not in cache:
                        cache[key] = Spectrum(singular_values(w, u, groups))
                    spectra[u] = cache[key]
                layers.append(layer.with_spectra(spectra))
            set_node_facts(node, NodeFacts(tuple(layers)))
    return len(cache)
