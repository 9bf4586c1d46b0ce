"""Singular-value spectra of every factorable layer, for each unfolding its schemes need.

Every distinct (weight, unfolding) is decomposed once: unfoldings of the same shape are stacked
and decomposed in one batched call (Gram matrix of the smaller side, then its eigenvalues; see
:func:`lrfx.decompositions.decompose`). With ``SpectraOptions(vectors=True)`` the singular
vectors are kept as each spectrum's basis, so that the rewrite builds factors with one matrix
product instead of a second SVD. When the graph carries input statistics (from
:func:`~lrfx.passes.analysis.activations.collect_input_stats`), the spectra of the unfoldings
they cover are data-aware (whitened) straight away, and no plain spectrum is computed for them.

Spectra already on the graph are reused when their weight has not changed since (same storage,
same in-place version, same ``weights_version``) and they carry what is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lrfx.decompositions import (
    Spectrum,
    WeightStamp,
    decompose_many,
    get_unfolding,
    is_finite,
    tucker2_input_spectrum,
    whitening_factor,
)
from lrfx.facts import (
    InputStats,
    LayerFacts,
    NodeFacts,
    get_graph_facts,
    get_node_facts,
    set_node_facts,
)
from lrfx.layers import EffectiveCall, effective_call
from lrfx.pipeline import PassContext, graph_pass
from lrfx.progress import progress_bar
from lrfx.schemes import get_scheme

__all__ = ["SpectraOptions", "compute_spectra", "layer_unfoldings", "layer_weight"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SpectraOptions:
    """Options of :func:`compute_spectra`.

    Attributes:
        vectors: Keep the singular vectors (needed by the rewrite; costs memory).
        precision: ``float64``, ``float32`` or ``auto`` (float64 for Gram sides up to 512,
            float32 above; see :mod:`lrfx.decompositions` on precision).
        whiten: Use the graph's input statistics, where present, for data-aware spectra.
    """

    vectors: bool = False
    precision: str = "auto"
    whiten: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "float64", "float32"):
            from lrfx.errors import LrfxError

            raise LrfxError(f"SpectraOptions.precision must be 'auto', 'float64' or 'float32', "
                            f"got {self.precision!r}")


def layer_weight(gm: fx.GraphModule, layer: LayerFacts) -> torch.Tensor | None:
    """The ``(out, in, ...)`` weight a layer record refers to: a parameter or buffer, the
    property of a parametrized layer, a row slice of a packed projection, or the transpose of a
    linear-like module's ``(in, out)`` weight."""
    if layer.weight_effective:
        return effective_weight(gm, layer)[0]
    if layer.weight is None:
        return None
    w: Any
    try:
        w = gm.get_parameter(layer.weight)
    except AttributeError:
        try:
            w = gm.get_buffer(layer.weight)
        except AttributeError:
            owner_path, _, attr = layer.weight.rpartition(".")
            try:
                owner = gm.get_submodule(owner_path) if owner_path else gm
                w = getattr(owner, attr)
            except AttributeError:
                return None
    if not isinstance(w, torch.Tensor):
        return None
    if layer.weight_rows is not None:
        w = w[layer.weight_rows[0] : layer.weight_rows[1]]
    return w.t() if layer.weight_transposed else w


def effective_weight(gm: nn.Module, layer: LayerFacts
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias a weight-transform layer's forward computes (see :mod:`lrfx.layers`)."""
    g = layer.geometry
    if g is None:
        return None, None
    call = effective_call(gm.get_submodule(layer.name), g.input_shape)
    if not isinstance(call, EffectiveCall):
        return None, None
    return call.weight, call.bias


def layer_unfoldings(layer: LayerFacts) -> tuple[str, ...]:
    """The unfoldings whose spectra the layer's schemes need, in first-use order."""
    seen: dict[str, None] = {}
    for scheme in layer.schemes:
        for u in get_scheme(scheme).unfoldings:
            seen.setdefault(u, None)
    return tuple(seen)


# kept for callers of the 0.1 name
_unfoldings = layer_unfoldings


@dataclass
class _Task:
    """One spectrum to compute: a matrix stack, and where the result goes."""

    key: tuple[Any, ...]
    mats: torch.Tensor
    whiten: torch.Tensor | None
    input_side: str
    stamp: WeightStamp


def _reusable(sp: Spectrum | None, stamp: WeightStamp, whitened: bool, vectors: bool) -> bool:
    return (sp is not None and sp.stamp == stamp and sp.whitened == whitened
            and (sp.basis is not None or not vectors))


def _one_by_one(layer: LayerFacts) -> bool:
    g = layer.geometry
    kernel = getattr(g, "kernel", None)
    return kernel is not None and all(k == 1 for k in kernel) and getattr(g, "groups", 1) == 1


@graph_pass(requires=["layers"], provides=["spectra"], options=SpectraOptions)
def compute_spectra(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Compute the singular values of each factorable layer, once per weight and unfolding.

    Reads: ``node.meta["lrfx"]`` (layers and their schemes), the weights, ``SpectraOptions``,
    and ``gm.meta["lrfx"].input_stats`` when whitening. Writes: the layer records again, with
    ``spectra`` filled in (one :class:`~lrfx.facts.Spectrum` per unfolding, shared between the
    calls of a shared layer). A weight holding NaN or Inf gets no spectra and a note saying so.
    Does not change the graph.

    Returns:
        How many distinct spectra were computed (reused ones not counted).
    """
    opts = ctx.option(SpectraOptions)
    gfacts = get_graph_facts(gm)
    stats: Mapping[str, InputStats] = (gfacts.input_stats or {}) if opts.whiten else {}
    version = gfacts.weights_version
    per_node = [(n, f) for n in gm.graph.nodes if (f := get_node_facts(n)) is not None]

    results: dict[tuple[Any, ...], Spectrum] = {}
    tasks: dict[tuple[Any, ...], _Task] = {}
    bad: set[str] = set()
    factors_of: dict[tuple[str, str], torch.Tensor] = {}
    plan: list[tuple[fx.Node, list[Any]]] = []  # per node: LayerFacts, or (layer, unfolding keys)

    for node, facts in per_node:
        entries: list[Any] = []
        for layer in facts.layers:
            w = layer_weight(gm, layer) if layer.factorable else None
            if w is None:
                entries.append(layer)
                continue
            # the weight's identity: its attribute path, or the layer for a computed weight
            wkey = layer.weight or f"<{layer.name}>"
            if wkey in bad or not is_finite(w):
                bad.add(wkey)
                log.warning("layer %r: weight holds NaN or Inf; no spectra", layer.name)
                note = "weight holds NaN or Inf values: not factored"
                entries.append(dataclasses.replace(layer, schemes=(), note=note))
                continue
            stamp = WeightStamp.of(w, epoch=version)
            groups = int(getattr(layer.geometry, "groups", 1))
            st = stats.get(layer.name)
            keys: dict[str, tuple[Any, ...]] = {}
            for u in layer_unfoldings(layer):
                if u == "mode1" and groups == 1 and st is not None and "channel" in st.grams:
                    # Tucker-2's input side comes from the channel statistics (below)
                    keys[u] = (wkey, layer.weight_rows, u, groups, layer.name)
                    continue
                gram = st.grams.get(u) if st is not None else None
                whitened = gram is not None
                key = (wkey, layer.weight_rows, u, groups, layer.name if whitened else None)
                keys[u] = key
                if key in tasks or key in results:
                    continue
                old = layer.spectra.get(u)
                if old is not None and _reusable(old, stamp, whitened, opts.vectors):
                    results[key] = old
                    continue
                unfolding = get_unfolding(u)
                mats = unfolding.matrix(w.detach(), groups)
                s = None
                if gram is not None and st is not None:
                    s = factors_of.get((layer.name, u))
                    if s is None:
                        s = whitening_factor(gram, st.count)
                        factors_of[(layer.name, u)] = s
                    m64 = mats.to(device="cpu", dtype=torch.float64)
                    mats = m64 @ s if unfolding.input_side == "cols" else s.transpose(-2, -1) @ m64
                tasks[key] = _Task(key, mats, s, unfolding.input_side, stamp)
            entries.append((layer, keys))
        plan.append((node, entries))

    # the mode-1 unfolding of an ungrouped 1x1 conv is the channel unfolding transposed
    shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for _, entries in plan:
        for e in entries:
            if isinstance(e, tuple) and _one_by_one(e[0]):
                keys = e[1]
                k1, kc = keys.get("mode1"), keys.get("channel")
                if (k1 in tasks and kc is not None and tasks.get(k1) is not None
                        and tasks[k1].whiten is None and (kc in tasks or kc in results)
                        and (tasks[kc].whiten is None if kc in tasks else
                             not results[kc].whitened)):
                    shared[k1] = kc
                    del tasks[k1]

    # batch the decompositions by matrix shape
    batches: dict[tuple[Any, ...], list[_Task]] = {}
    for t in tasks.values():
        batches.setdefault((tuple(t.mats.shape), t.mats.dtype), []).append(t)
    # smallest Grams first: the large ones go through LAPACK's tridiagonal reduction (another
    # BLAS's threads), run last so that the two thread pools do not take turns on the cores
    order = sorted(batches.values(), key=lambda grp: min(grp[0].mats.shape[-2:]))
    with progress_bar("spectra", total=len(tasks), enabled=ctx.progress) as advance:
        for group in order:
            outs = decompose_many([t.mats for t in group], vectors=opts.vectors,
                                  precision=opts.precision)
            for t, (values, basis, side) in zip(group, outs, strict=True):
                results[t.key] = Spectrum(values, basis, side, t.whiten,
                                          t.input_side,  # type: ignore[arg-type]
                                          t.stamp)
                advance()
    for k1, kc in shared.items():
        results[k1] = results[kc].transposed()

    # Tucker-2 with a whitened channel side: its input side as an output-error spectrum too
    for _, entries in plan:
        for e in entries:
            if not isinstance(e, tuple):
                continue
            layer, keys = e
            k1, kc = keys.get("mode1"), keys.get("channel")
            if k1 is None or kc is None or not results[kc].whitened:
                continue
            key = k1
            if key not in results:
                w, s = layer_weight(gm, layer), results[kc].whiten
                assert w is not None and s is not None
                results[key] = tucker2_input_spectrum(w.detach(), s)
            keys["mode1"] = key

    for node, entries in plan:
        layers = []
        for e in entries:
            if isinstance(e, LayerFacts):
                layers.append(e)
                continue
            layer, keys = e
            layers.append(layer.with_spectra({u: results[k] for u, k in keys.items()}))
        set_node_facts(node, NodeFacts(tuple(layers)))
    return len(tasks)
