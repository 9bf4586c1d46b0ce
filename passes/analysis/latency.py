"""Per-layer measured latency: the dense layer and its factored forms at candidate ranks.

For each factorable layer with allocation options (:func:`~lrfx.passes.allocation.build_options`),
:func:`measure_layers` times, through a :class:`~lrfx.latency.LatencyModel` (cached on disk):

* the dense layer, at each call's input shape (a module called twice is timed twice);
* per scheme, a few *probe ranks* — ``points`` ranks spread geometrically over the scheme's
  candidates below MAC break-even, and at each one the next candidates that are multiples of the
  ``quanta`` (8 and 32 by default). Whether a multiple of 8 or 32 is faster than the exact rank
  is then a measured fact the allocator sees (a rank that is slower *and* less accurate is never
  chosen), not an assumption.

Only measured candidates become latency candidates (:func:`latency_options`); a layer's time is
the sum over its calls. Probes of one layer are timed together, interleaved with its dense form,
so a load change shifts them alike; layers sharing a geometry share measurements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lrfx.cost import Geometry
from lrfx.latency import LatencyModel, Probe
from lrfx.passes.allocation.candidates import LayerOptions
from lrfx.progress import progress_bar

__all__ = ["LayerLatency", "measure_layers", "probe_indices"]


@dataclass(frozen=True)
class LayerLatency:
    """Measured seconds of one layer (all its calls): dense, and per probed candidate.

    Attributes:
        name: The layer.
        dense: Seconds of the dense layer.
        times: Candidate index (into the layer's :class:`LayerOptions`) to seconds.
    """

    name: str
    dense: float
    times: Mapping[int, float] = field(default_factory=dict)


def probe_indices(main: np.ndarray, points: int = 6, quanta: Sequence[int] = (8, 32)
                  ) -> list[int]:
    """Which of a scheme's candidates to time, given their main ranks (ascending).

    ``points`` ranks spread geometrically from the smallest to the largest, and at each the
    first candidate at or above it whose rank is a multiple of each quantum.
    """
    n = len(main)
    if n == 0:
        return []
    lo, hi = float(max(main[0], 1)), float(max(main[-1], 1))
    targets = np.unique(np.geomspace(lo, hi, num=max(points, 1)).round().astype(np.int64))
    chosen: set[int] = set()
    for t in targets:
        at = int(np.searchsorted(main, t))
        if at < n:
            chosen.add(at)
        for q in quanta:
            ok = np.flatnonzero((main >= t) & (main % q == 0))
            if len(ok):
                chosen.add(int(ok[0]))
    return sorted(chosen)


def measure_layers(
    options: Sequence[LayerOptions],
    calls: Mapping[str, Sequence[Geometry]],
    model: LatencyModel,
    *,
    points: int = 6,
    quanta: Sequence[int] = (8, 32),
    progress: bool = False,
) -> dict[str, LayerLatency]:
    """Time every layer's dense form and its probe candidates (see the module docstring).

    Args:
        options: The layers' allocation options (MACs or params metric; only ranks matter).
        calls: Each layer's call geometries (``analysis[name].calls``).
        model: Times probes (and caches them).
        points, quanta: Which ranks to probe (:func:`probe_indices`).
        progress: Report progress on stderr.
    """
    out: dict[str, LayerLatency] = {}
    with progress_bar("latency", len(options), enabled=progress) as advance:
        for o in options:
            geoms = tuple(calls[o.name])
            picked: list[int] = []
            for s in dict.fromkeys(o.scheme[1:]):
                idx = o.scheme_indices(s)
                picked += [int(idx[i]) for i in probe_indices(o.main_ranks(idx), points, quanta)]
            probes = [Probe(g) for g in geoms]
            for i in picked:
                r = o.rank(i)
                rank = tuple(r) if isinstance(r, tuple) else (int(r or 0),)
                probes += [Probe(g, o.scheme_of(i), rank) for g in geoms]
            t = model.measure(probes)
            k = len(geoms)
            dense = float(sum(t[:k]))
            times = {i: float(sum(t[k * (j + 1):k * (j + 2)])) for j, i in enumerate(picked)}
            out[o.name] = LayerLatency(o.name, dense, times)
            advance()
    return out
