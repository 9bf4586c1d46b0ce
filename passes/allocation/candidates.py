"""What every allocator chooses from: per layer, the (cost, error) of each scheme and rank.

Allocators are pure functions of these options and a budget: no model, no graph. A layer's
options always include ``dense`` (its dense cost, zero error); a factored option is listed only
below break-even (cheaper than dense). Errors are *relative* squared errors of the layer,
``sum_{i>r} s_i^2 / sum_i s_i^2`` of the scheme's unfolding: of the weight for plain spectra, of
the layer's output on calibration data for whitened spectra (so they compare across layers).
Tucker-2's error is the HOSVD bound, the sum of the two modes' tails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lrfx.cost import Geometry, applicable_schemes, factored_cost, max_rank
from lrfx.errors import BudgetInfeasibleError, LrfxError
from lrfx.facts import Spectrum

__all__ = [
    "AUTO_SCHEMES",
    "Budget",
    "Candidate",
    "LayerOptions",
    "build_options",
    "check_reachable",
    "cost_of",
    "make_budget",
]

#: Schemes ``scheme="auto"`` chooses among (svd is the only one for Linear layers).
AUTO_SCHEMES = ("channel", "spatial", "tucker2", "svd")


@dataclass(frozen=True)
class Candidate:
    """One way to build a layer: a scheme and rank (or dense), its cost and its error."""

    scheme: str
    rank: int | tuple[int, int] | None
    cost: int
    error: float
    macs: int
    params: int


@dataclass(frozen=True)
class LayerOptions:
    """The candidates of one factorable layer; ``candidates[0]`` is dense."""

    name: str
    candidates: tuple[Candidate, ...]
    spectra: Mapping[str, Spectrum]

    @property
    def dense(self) -> Candidate:
        return self.candidates[0]

    def of_scheme(self, scheme: str) -> list[Candidate]:
        return [c for c in self.candidates if c.scheme == scheme]

    def best_within(self, cost: int) -> Candidate:
        """The lowest-error candidate costing at most ``cost`` (dense if none is cheaper)."""
        fitting = [c for c in self.candidates if c.cost <= cost]
        if not fitting:
            return min(self.candidates, key=lambda c: c.cost)
        return min(fitting, key=lambda c: (c.error, c.cost))


@dataclass(frozen=True)
class Budget:
    """A cost target: ``metric`` is ``macs`` or ``params``; ``target`` is absolute."""

    metric: str
    target: int
    total: int

    @property
    def fraction(self) -> float:
        return self.target / self.total if self.total else 1.0


def make_budget(
    macs: float | int | None, params: float | int | None, total_macs: int, total_params: int
) -> Budget:
    """Validate ``macs=`` / ``params=`` (a fraction in (0, 1] or an absolute count) as a Budget.

    Raises:
        LrfxError: Neither or both given, zero, negative, or a fraction above 1.
    """
    if (macs is None) == (params is None):
        raise LrfxError("give exactly one budget: macs=... or params=... (a fraction of the "
                        "model's total, e.g. macs=0.5, or an absolute count)")
    metric, value, total = ("macs", macs, total_macs) if macs is not None else (
        "params", params, total_params)
    assert value is not None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LrfxError(f"{metric} budget must be a number, got {value!r}")
    if value <= 0:
        raise LrfxError(f"{metric} budget must be positive, got {value}")
    if isinstance(value, float):
        if value > 1.0:
            raise LrfxError(f"{metric}={value} is a fraction above 1; give a fraction in (0, 1] "
                            f"or an absolute count as an int (the model has {total:,})")
        target = int(value * total)
    else:
        target = int(value)
    return Budget(metric, target, total)


def _tails(sp: Spectrum) -> list[float]:
    """Relative tail energy after keeping r values, r = 0..k (summed over groups)."""
    sq = sp.values.square()
    total = float(sq.sum())
    per_rank = sq.sum(dim=0).tolist()  # rank r keeps the first r values of every group
    tails = [1.0]
    acc = 0.0
    for v in per_rank:
        acc += v
        tails.append(max(0.0, 1.0 - acc / total) if total > 0 else 0.0)
    return tails


def _ranks(limit: int, round_to: int | None) -> Iterable[int]:
    if not round_to or round_to <= 1:
        return range(1, limit + 1)
    rs = list(range(round_to, limit + 1, round_to))
    return rs or [limit]


def build_options(
    layers: Sequence[object],
    *,
    metric: str = "macs",
    schemes: str | Sequence[str] = "auto",
    round_to: int | None = None,
    spectra: Mapping[str, Mapping[str, Spectrum]] | None = None,
) -> list[LayerOptions]:
    """Candidates of every factorable layer of an :class:`~lrfx.Analysis`.

    Args:
        layers: The analysis's layer records (``analysis.layers``).
        metric: ``macs`` or ``params``: what a candidate's ``cost`` counts.
        schemes: ``auto`` (all of :data:`AUTO_SCHEMES` that apply) or one scheme name or a list;
            a Linear layer always uses ``svd``; a conv the scheme does not apply to stays dense.
        round_to: Keep only ranks that are multiples of this.
        spectra: Per layer, spectra to use instead of the records' own (whitened ones).
    """
    if metric not in ("macs", "params"):
        raise LrfxError(f"metric must be 'macs' or 'params', got {metric!r}")
    wanted = AUTO_SCHEMES if schemes == "auto" else (
        (schemes,) if isinstance(schemes, str) else tuple(schemes))
    out = []
    for rec in layers:
        if not getattr(rec, "factorable", False) or not getattr(rec, "calls", ()):
            continue
        name: str = rec.name  # type: ignore[attr-defined]
        calls: tuple[Geometry, ...] = rec.calls  # type: ignore[attr-defined]
        sp = dict((spectra or {}).get(name) or rec.spectra)  # type: ignore[attr-defined]
        if not sp:
            raise LrfxError(f"layer {name!r} has no spectra; run the analysis with spectra=True")
        dense_macs, dense_params = rec.macs, rec.params  # type: ignore[attr-defined]
        dense_cost = dense_macs if metric == "macs" else dense_params
        cands = [Candidate("dense", None, dense_cost, 0.0, dense_macs, dense_params)]
        app = applicable_schemes(calls[0])
        # a Linear layer has one scheme, svd, whatever was asked for the convs
        usable = list(app) if app == ("svd",) else [s for s in app if s in wanted]
        for scheme in usable:
            cands += _scheme_candidates(scheme, calls, sp, metric, dense_cost, round_to)
        out.append(LayerOptions(name, tuple(cands), sp))
    return out


def _cost(calls: Sequence[Geometry], scheme: str, rank: int | tuple[int, int]) -> tuple[int, int]:
    macs = sum(factored_cost(g, scheme, rank).macs for g in calls)
    return macs, factored_cost(calls[0], scheme, rank).params


def _scheme_candidates(
    scheme: str,
    calls: Sequence[Geometry],
    sp: Mapping[str, Spectrum],
    metric: str,
    dense_cost: int,
    round_to: int | None,
) -> list[Candidate]:
    g = calls[0]
    out: list[Candidate] = []
    if scheme == "tucker2":
        if "mode1" not in sp or "channel" not in sp:
            return out
        t_in, t_out = _tails(sp["mode1"]), _tails(sp["channel"])
        lim_in, lim_out = max_rank(g, "tucker2")
        for r_out in _ranks(lim_out, round_to):
            r_in = min(lim_in, max(1, round(r_out * lim_in / lim_out)))
            if round_to and round_to > 1:
                r_in = min(lim_in, max(round_to, round(r_in / round_to) * round_to))
            macs, params = _cost(calls, scheme, (r_in, r_out))
            cost = macs if metric == "macs" else params
            if cost >= dense_cost:
                break
            err = min(1.0, t_in[min(r_in, len(t_in) - 1)] + t_out[min(r_out, len(t_out) - 1)])
            out.append(Candidate(scheme, (r_in, r_out), cost, err, macs, params))
        return out
    unit = {"svd": "rows", "channel": "channel", "spatial": "spatial"}.get(scheme)
    if unit is None or unit not in sp:
        return out
    tails = _tails(sp[unit])
    (limit,) = max_rank(g, scheme)
    for r in _ranks(limit, round_to):
        macs, params = _cost(calls, scheme, r)
        cost = macs if metric == "macs" else params
        if cost >= dense_cost:
            break
        out.append(Candidate(scheme, r, cost, tails[min(r, len(tails) - 1)], macs, params))
    return out


def cost_of(choice: Mapping[str, Candidate], fixed: int) -> int:
    """Total cost of a selection: the fixed (non-factorable) cost plus every layer's choice."""
    return fixed + sum(c.cost for c in choice.values())


def check_reachable(options: Sequence[LayerOptions], fixed: int, budget: Budget) -> None:
    """Raise :class:`BudgetInfeasibleError` if even the cheapest plan exceeds the budget."""
    cheapest = fixed + sum(min(c.cost for c in o.candidates) for o in options)
    if cheapest > budget.target:
        raise BudgetInfeasibleError(
            f"a {budget.metric} budget of {budget.target:,} ({budget.fraction:.3f} of "
            f"{budget.total:,}) cannot be met: the smallest reachable cost is {cheapest:,} "
            f"({cheapest / budget.total:.3f} of the total) with every factorable layer at its "
            "lowest rank; raise the budget or allow more schemes"
        )
