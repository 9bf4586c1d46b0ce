"""What every allocator chooses from: per layer, the (cost, error) of each scheme and rank.

Allocators are pure functions of these options and a budget: no model, no graph. A layer's
options always include ``dense`` (its dense cost, zero error) first; a factored option is listed
only below break-even (cheaper than dense). Errors are *relative* squared errors of the layer
(:meth:`lrfx.schemes.Scheme.errors`): of the weight for plain spectra, of the layer's output on
calibration data for whitened spectra (so they compare across layers).

Options are held as arrays (costs, errors, MACs, params per candidate) built by the scheme
registry in a few vectorized operations per layer; :class:`Candidate` objects are made only when
asked for.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrfx.config import LayerRules
from lrfx.cost import Geometry, LinearGeometry
from lrfx.decompositions import Spectrum
from lrfx.errors import BudgetInfeasibleError, LrfxError
from lrfx.schemes import get_scheme, scheme_names

__all__ = [
    "AUTO_SCHEMES",
    "Budget",
    "Candidate",
    "LayerOptions",
    "allocatable_schemes",
    "build_options",
    "check_budget",
    "check_reachable",
    "cost_of",
    "latency_options",
    "make_budget",
    "resolve_schemes",
]


def allocatable_schemes() -> tuple[str, ...]:
    """The registered schemes allocators may choose (``cp`` is plan-only)."""
    return tuple(n for n in scheme_names() if get_scheme(n).allocatable)


#: Schemes ``scheme="auto"`` chooses among (the allocatable built-ins).
AUTO_SCHEMES = allocatable_schemes()


@dataclass(frozen=True)
class Candidate:
    """One way to build a layer: a scheme and rank (or dense), its cost and its error."""

    scheme: str
    rank: int | tuple[int, ...] | None
    cost: int
    error: float
    macs: int
    params: int


def _rank_value(row: np.ndarray) -> int | tuple[int, ...]:
    return int(row[0]) if len(row) == 1 else tuple(int(r) for r in row)


def _main(rank: Any) -> int:
    return int(rank[-1]) if isinstance(rank, tuple) else int(rank or 0)


class LayerOptions:
    """The candidates of one factorable layer; candidate 0 is dense.

    Built from arrays by :func:`build_options`, or from a sequence of :class:`Candidate`
    (``LayerOptions(name, candidates, spectra)``, dense first).

    Attributes:
        name: The layer.
        spectra: The spectra the errors came from.
        cost, error, macs, params: Per candidate (int64 / float64 arrays).
    """

    def __init__(self, name: str, candidates: Sequence[Candidate] = (),
                 spectra: Mapping[str, Spectrum] | None = None) -> None:
        self.name = name
        self.spectra: Mapping[str, Spectrum] = spectra or {}
        cands = tuple(candidates)
        if cands and cands[0].scheme != "dense":
            raise LrfxError(f"layer {name!r}: the first candidate must be dense")
        self.cost = np.array([c.cost for c in cands], dtype=np.int64)
        self.error = np.array([c.error for c in cands], dtype=np.float64)
        self.macs = np.array([c.macs for c in cands], dtype=np.int64)
        self.params = np.array([c.params for c in cands], dtype=np.int64)
        # (scheme, first index, ranks (n, n_ranks) or a list of ranks) per run of one scheme
        self._blocks: list[tuple[str, int, Any]] = []
        for i, c in enumerate(cands[1:], start=1):
            if self._blocks and self._blocks[-1][0] == c.scheme:
                self._blocks[-1][2].append(c.rank)
            else:
                self._blocks.append((c.scheme, i, [c.rank]))
        if cands:
            self.__dict__["candidates"] = cands

    @classmethod
    def from_arrays(cls, name: str, spectra: Mapping[str, Spectrum], dense: Candidate,
                    blocks: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                           np.ndarray]]) -> LayerOptions:
        """Dense first, then per scheme ``(scheme, ranks, cost, error, macs, params)`` blocks."""
        o = cls(name, (), spectra)
        start = 1
        for s, r, *_ in blocks:
            o._blocks.append((s, start, r))
            start += len(r)
        o.cost = np.concatenate([[dense.cost], *(b[2] for b in blocks)]).astype(np.int64)
        o.error = np.concatenate([[0.0], *(b[3] for b in blocks)]).astype(np.float64)
        o.macs = np.concatenate([[dense.macs], *(b[4] for b in blocks)]).astype(np.int64)
        o.params = np.concatenate([[dense.params], *(b[5] for b in blocks)]).astype(np.int64)
        return o

    def __len__(self) -> int:
        return len(self.cost)

    @property
    def scheme(self) -> list[str]:
        """Every candidate's scheme (``dense`` for candidate 0)."""
        out = ["dense"]
        for s, _, r in self._blocks:
            out += [s] * len(r)
        return out

    def scheme_of(self, i: int) -> str:
        for s, start, r in self._blocks:
            if start <= i < start + len(r):
                return s
        return "dense"

    def rank(self, i: int) -> int | tuple[int, ...] | None:
        """The rank of candidate ``i`` (``None`` for dense)."""
        for _, start, r in self._blocks:
            if start <= i < start + len(r):
                v = r[i - start]
                return v if isinstance(r, list) else _rank_value(v)
        return None

    @property
    def ranks(self) -> list[Any]:
        """Every candidate's rank (``None`` for dense)."""
        return [self.rank(i) for i in range(len(self))]

    def main_ranks(self, idx: np.ndarray) -> np.ndarray:
        """The main rank (the last one of multi-rank schemes) of each candidate in ``idx``."""
        return np.array([_main(self.rank(int(i))) for i in idx], dtype=np.int64)

    def candidate(self, i: int) -> Candidate:
        i = int(i)
        return Candidate(self.scheme_of(i), self.rank(i), int(self.cost[i]),
                         float(self.error[i]), int(self.macs[i]), int(self.params[i]))

    @functools.cached_property
    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(self.candidate(i) for i in range(len(self)))

    @property
    def dense(self) -> Candidate:
        return self.candidate(0)

    def index_of(self, c: Candidate) -> int:
        """The index of a candidate (by scheme and rank)."""
        if c.scheme == "dense":
            return 0
        for s, start, r in self._blocks:
            if s != c.scheme:
                continue
            if isinstance(r, list):
                if c.rank in r:
                    return start + r.index(c.rank)
                continue
            want = np.atleast_1d(np.asarray(c.rank, dtype=np.int64))
            hit = np.flatnonzero((r == want[None, :]).all(axis=1))
            if len(hit):
                return start + int(hit[0])
        raise LrfxError(f"layer {self.name!r} has no candidate {c.scheme} {c.rank}")

    def of_scheme(self, scheme: str) -> list[Candidate]:
        return [self.candidate(i) for i in self.scheme_indices(scheme)]

    def scheme_indices(self, scheme: str) -> np.ndarray:
        parts = [np.arange(start, start + len(r)) for s, start, r in self._blocks if s == scheme]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def best_within(self, cost: int) -> Candidate:
        """The lowest-error candidate costing at most ``cost`` (the cheapest one if none fits)."""
        return self.candidate(self.best_index_within(cost))

    def best_index_within(self, cost: int) -> int:
        fitting = np.flatnonzero(self.cost <= cost)
        if len(fitting) == 0:
            return int(np.argmin(self.cost))
        order = np.lexsort((self.cost[fitting], self.error[fitting]))
        return int(fitting[order[0]])

    def weighted(self, weight: float) -> LayerOptions:
        """A copy whose errors are multiplied by ``weight`` (loss-aware allocation: the
        allocators minimize ``sum weight * error``). Value-based criteria (``global_sigma``)
        scale the layer's singular values by ``sqrt(weight)`` over the spectrum's norm, so a
        value's square is the weighted relative error it causes."""
        o = copy.copy(self)
        o.__dict__.pop("candidates", None)
        o.error = self.error * weight
        o.weight = weight
        return o

    #: The loss-aware weight of :meth:`weighted` (``None``: unweighted).
    weight: float | None = None

    def __repr__(self) -> str:
        return f"LayerOptions({self.name!r}, {len(self)} candidates)"


@dataclass(frozen=True)
class Budget:
    """A cost target: ``metric`` is ``macs``, ``params`` or ``latency`` (in nanoseconds, see
    :func:`latency_options`); ``target`` is absolute."""

    metric: str
    target: int
    total: int

    @property
    def fraction(self) -> float:
        return self.target / self.total if self.total else 1.0


def check_budget(macs: float | int | None, params: float | int | None,
                 latency: float | None = None) -> tuple[str, float]:
    """Validate ``macs=`` / ``params=`` / ``latency=`` without the model's totals; returns
    (metric, value).

    Raises:
        LrfxError: None or several given, not a number, zero, negative, or a fraction above 1
            (``latency`` is always a fraction of the dense model's measured latency).
    """
    given = [(m, v) for m, v in (("macs", macs), ("params", params), ("latency", latency))
             if v is not None]
    if len(given) != 1:
        raise LrfxError("give exactly one budget: macs=..., params=... (a fraction of the "
                        "model's total, e.g. macs=0.5, or an absolute count) or latency=... (a "
                        "fraction of the dense model's measured latency)")
    metric, value = given[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LrfxError(f"{metric} budget must be a number, got {value!r}")
    if value <= 0:
        raise LrfxError(f"{metric} budget must be positive, got {value}")
    if metric == "latency" and value > 1:
        raise LrfxError(f"latency={value} must be a fraction in (0, 1] of the dense model's "
                        "measured latency")
    if isinstance(value, float) and value > 1.0:
        raise LrfxError(f"{metric}={value} is a fraction above 1; give a fraction in (0, 1] "
                        "or an absolute count as an int")
    return metric, value


def make_budget(
    macs: float | int | None, params: float | int | None, total_macs: int, total_params: int,
    latency: float | None = None, total_latency: int = 0,
) -> Budget:
    """Validate the budget (see :func:`check_budget`) as a :class:`Budget`; a latency budget's
    total is ``total_latency`` in nanoseconds.

    Raises:
        LrfxError: None or several given, zero, negative, or a fraction above 1.
    """
    metric, value = check_budget(macs, params, latency)
    total = {"macs": total_macs, "params": total_params, "latency": total_latency}[metric]
    target = int(value * total) if isinstance(value, float) else int(value)
    return Budget(metric, target, total)


def resolve_schemes(schemes: str | Sequence[str]) -> tuple[str, ...]:
    """``auto`` (every allocatable scheme), one scheme name, or a list, checked.

    Raises:
        LrfxError: An unknown scheme (the valid ones are named), or a plan-only one.
    """
    if schemes == "auto":
        return allocatable_schemes()
    names = (schemes,) if isinstance(schemes, str) else tuple(schemes)
    valid = ("auto", *allocatable_schemes())
    for n in names:
        if n not in scheme_names():
            raise LrfxError(f"unknown scheme {n!r}; choose one of {', '.join(valid)}")
        if not get_scheme(n).allocatable:
            raise LrfxError(f"scheme {n!r} cannot be allocated: {get_scheme(n).note}")
    return names


def build_options(
    layers: Sequence[object],
    *,
    metric: str = "macs",
    schemes: str | Sequence[str] = "auto",
    round_to: int | None = None,
    spectra: Mapping[str, Mapping[str, Spectrum]] | None = None,
    rules: LayerRules | None = None,
    skipped: dict[str, str] | None = None,
) -> list[LayerOptions]:
    """Candidates of every factorable layer of an :class:`~lrfx.Analysis`.

    Args:
        layers: The analysis's layer records (``analysis.layers``).
        metric: ``macs`` or ``params``: what a candidate's ``cost`` counts.
        schemes: ``auto`` (every allocatable scheme that applies), one scheme name or a list; a
            Linear layer always uses its own schemes (``svd``); a conv that none of the asked
            schemes applies to stays dense.
        round_to: Keep only ranks that are multiples of this.
        spectra: Per layer, spectra to use instead of the records' own (whitened ones).
        rules: Exclusions, rank bounds and error caps (:meth:`lrfx.CompressConfig.rules`): an
            excluded layer gets no options (it stays dense, its cost fixed); the others keep only
            the ranks within their bounds and cap.
        skipped: Filled with ``{layer: why}`` for the layers excluded.
    """
    if metric not in ("macs", "params"):
        raise LrfxError(f"metric must be 'macs' or 'params', got {metric!r}")
    wanted = resolve_schemes(schemes)
    out = []
    for rec in layers:
        if not getattr(rec, "factorable", False) or not getattr(rec, "calls", ()):
            continue
        name: str = rec.name  # type: ignore[attr-defined]
        types: tuple[str, ...] = getattr(rec, "types", ())
        lo = hi = max_error = None
        if rules is not None and rules.active:
            by = rules.excluded_by(name, types)
            if by is not None:
                if skipped is not None:
                    skipped[name] = f"excluded by the config ({by!r})"
                continue
            lo, hi, max_error = rules.bounds(name, types)
        calls: tuple[Geometry, ...] = rec.calls  # type: ignore[attr-defined]
        sp = dict((spectra or {}).get(name) or rec.spectra)  # type: ignore[attr-defined]
        if not sp:
            raise LrfxError(f"layer {name!r} has no spectra; run the analysis with spectra=True")
        dense_macs, dense_params = rec.macs, rec.params  # type: ignore[attr-defined]
        dense_cost = dense_macs if metric == "macs" else dense_params
        dense = Candidate("dense", None, dense_cost, 0.0, dense_macs, dense_params)
        g0 = calls[0]
        applicable = [s for s in rec.schemes if get_scheme(s).allocatable]  # type: ignore[attr-defined]
        # a Linear layer has its own schemes (svd), whatever was asked for the convs
        usable = applicable if isinstance(g0, LinearGeometry) else [
            s for s in applicable if s in wanted]
        blocks = []
        for s in usable:
            scheme = get_scheme(s)
            if any(u not in sp for u in scheme.unfoldings):
                continue
            ranks = scheme.rank_path(g0, round_to)
            macs, params = scheme.cost_arrays(calls, ranks)
            cost = macs if metric == "macs" else params
            above = np.flatnonzero(cost >= dense_cost)
            n = int(above[0]) if len(above) else len(cost)  # stop at break-even
            if n == 0:
                continue
            ranks, cost, macs, params = ranks[:n], cost[:n], macs[:n], params[:n]
            errors = scheme.errors(sp, ranks)
            if lo is not None or hi is not None or max_error is not None:
                keep = np.ones(n, dtype=bool)
                if lo is not None:
                    floor = np.minimum(lo, np.asarray(scheme.max_rank(g0), dtype=np.int64))
                    keep &= (ranks >= floor).all(axis=1)
                if hi is not None:
                    keep &= (ranks <= hi).all(axis=1)
                if max_error is not None:
                    keep &= errors <= max_error
                if not keep.any():
                    continue
                ranks, cost, errors, macs, params = (a[keep] for a in (ranks, cost, errors,
                                                                      macs, params))
            blocks.append((s, ranks, cost, errors, macs, params))
        out.append(LayerOptions.from_arrays(name, sp, dense, blocks))
    return out


def cost_of(choice: Mapping[str, Candidate], fixed: int) -> int:
    """Total cost of a selection: the fixed (non-factorable) cost plus every layer's choice."""
    return fixed + sum(c.cost for c in choice.values())


def check_reachable(options: Sequence[LayerOptions], fixed: int, budget: Budget) -> None:
    """Raise :class:`BudgetInfeasibleError` if even the cheapest plan exceeds the budget."""
    cheapest = fixed + sum(int(o.cost.min()) for o in options)
    if cheapest > budget.target:
        raise BudgetInfeasibleError(
            f"a {budget.metric} budget of {budget.target:,} ({budget.fraction:.3f} of "
            f"{budget.total:,}) cannot be met: the smallest reachable cost is {cheapest:,} "
            f"({cheapest / budget.total:.3f} of the total) with every factorable layer at its "
            "lowest rank; raise the budget or allow more schemes"
        )


#: A factored form must be measured at least this much faster than dense (a fraction of the
#: dense time) to be a latency candidate: timing noise must not make a layer slower.
MIN_SPEEDUP = 0.03


def latency_options(
    options: Sequence[LayerOptions],
    measured: Mapping[str, Any],
    *,
    others: Sequence[tuple[Mapping[str, Any], float]] = (),
    min_speedup: float = MIN_SPEEDUP,
) -> tuple[list[LayerOptions], dict[str, str]]:
    """The options of a latency budget: measured candidates, cost in nanoseconds.

    Each layer keeps dense and the candidates that were timed (``measured`` maps a layer to a
    :class:`~lrfx.passes.analysis.latency.LayerLatency`) *and* ran at least ``min_speedup``
    faster than dense: a latency plan never factors a layer into something slower. Errors are
    the layer's, as for any budget.

    ``others`` adds batch sizes: per batch size, its layer times and its dense model's time
    relative to the reference's. A candidate must then be faster than dense at every one of
    them, and costs the mean of its times, each divided by that relative model time (seconds at
    the reference batch size; with no ``others``, simply its time).

    Returns:
        The new options, and ``{layer: why}`` for layers left with dense only.
    """
    out: list[LayerOptions] = []
    dense_only: dict[str, str] = {}
    for o in options:
        per = [(measured[o.name], 1.0), *((m[o.name], rel) for m, rel in others)]

        def cost(seconds: Sequence[float], per: Any = per) -> int:
            mean = sum(t / rel for t, (_, rel) in zip(seconds, per, strict=True)) / len(per)
            return max(1, round(mean * 1e9))

        timed = [i for i in sorted(per[0][0].times) if all(i in lat.times for lat, _ in per)]
        worst = {i: max(lat.times[i] / lat.dense for lat, _ in per) for i in timed}
        keep = [i for i in timed if worst[i] < 1.0 - min_speedup]
        cands = [Candidate("dense", None, cost([lat.dense for lat, _ in per]), 0.0,
                           int(o.macs[0]), int(o.params[0]))]
        for i in keep:
            c = o.candidate(i)
            cands.append(Candidate(c.scheme, c.rank, cost([lat.times[i] for lat, _ in per]),
                                   c.error, c.macs, c.params))
        if not keep and len(o) > 1:
            dense = per[0][0].dense
            dense_only[o.name] = (
                f"no factored form measured faster than dense (best {min(worst.values()):.2f}x "
                f"of its {dense * 1e3:.3f} ms)" if timed else "no factored form was timed")
        new = LayerOptions(o.name, cands, o.spectra)
        new.weight = o.weight  # errors already carry it
        out.append(new)
    return out, dense_only
