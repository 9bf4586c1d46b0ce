"""Rank allocators: pure functions of the layer options and a budget.

Each returns a mapping of layer name to the chosen :class:`Candidate` (dense included); turn it
into a :class:`~lrfx.RankPlan` with :func:`to_plan`.

* :func:`allocate_energy` — TRP's energy criterion (smallest rank keeping energy ``e``), or the
  deploy-time value threshold; with a budget, ``e`` is bisected to meet it.
* :func:`allocate_global_sigma` — Decomposable-Net: pool every layer's singular values, keep the
  top fraction ``rho`` (``rank_min`` per layer), bisect ``rho`` to meet the budget.
* :func:`allocate_lc` — the LC C step for a budget: minimize the summed error subject to the
  cost, solved as a multiple-choice knapsack (exact Pareto-frontier dynamic programming; the
  Lagrangian multiplier of the C step is reported too).
* :func:`allocate_uniform` — the same kept fraction of the maximum rank in every layer.

Budgets are met from below; bisection leaves discrete gaps, which :func:`fill_budget` closes
greedily (best error reduction per unit of cost) until the plan uses the budget within 0.5 %.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lrfx.errors import BudgetInfeasibleError, LrfxError
from lrfx.passes.allocation.candidates import (
    Budget,
    Candidate,
    LayerOptions,
    check_reachable,
    cost_of,
)
from lrfx.plan import LayerPlan, RankPlan

__all__ = [
    "ALLOCATORS",
    "allocate_energy",
    "allocate_global_sigma",
    "allocate_lc",
    "allocate_uniform",
    "fill_budget",
    "prefer_best_scheme",
    "to_plan",
]

Choice = dict[str, Candidate]

#: The unfolding whose singular values rank a scheme in the rank rules (tucker2: its r_out).
_RANKING_UNIT = {"svd": "rows", "channel": "channel", "spatial": "spatial", "tucker2": "channel"}

#: Largest Pareto frontier the exact knapsack keeps; beyond it the frontier is thinned (and the
#: result flagged as not proven optimal).
MAX_FRONTIER = 4_000


def _primary(o: LayerOptions) -> list[Candidate]:
    """Candidates of the layer's first factored scheme (in rank order)."""
    factored = [c for c in o.candidates if c.scheme != "dense"]
    if not factored:
        return []
    first = factored[0].scheme
    return [c for c in factored if c.scheme == first]


def _bisect(
    make: Callable[[float], Choice], fixed: int, budget: Budget, lo: float = 0.0, hi: float = 1.0,
    steps: int = 60,
) -> tuple[Choice, float]:
    """Largest parameter in [lo, hi] whose choice fits the budget (cost is nondecreasing in it)."""
    best = make(lo)
    floor = cost_of(best, fixed)
    if floor > budget.target:
        raise BudgetInfeasibleError(
            f"a {budget.metric} budget of {budget.target:,} ({budget.fraction:.3f} of "
            f"{budget.total:,}) cannot be met by this allocator: its rule (one scheme per layer, "
            f"its minimum rank) reaches {floor:,} ({floor / budget.total:.3f}) at the lowest; "
            "raise the budget or use allocator='lc', which considers every scheme and rank"
        )
    top = make(hi)
    if cost_of(top, fixed) <= budget.target:
        return top, hi
    best_t = lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        choice = make(mid)
        if cost_of(choice, fixed) <= budget.target:
            lo, best, best_t = mid, choice, mid
        else:
            hi = mid
    return best, best_t


def fill_budget(choice: Choice, options: Sequence[LayerOptions], fixed: int, budget: Budget,
                slack: float = 0.005) -> Choice:
    """Greedily spend what the budget has left on the upgrades that cut the most error per cost.

    Stops once the plan is within ``slack`` of the target or nothing else fits.
    """
    choice = dict(choice)
    by_name = {o.name: o for o in options}
    while True:
        left = budget.target - cost_of(choice, fixed)
        if left <= slack * budget.target:
            return choice
        best: tuple[float, str, Candidate] | None = None
        for name, cur in choice.items():
            for c in by_name[name].candidates:
                extra = c.cost - cur.cost
                gain = cur.error - c.error
                if 0 < extra <= left and gain > 0:
                    ratio = gain / extra
                    if best is None or ratio > best[0]:
                        best = (ratio, name, c)
        if best is None:
            return choice
        choice[best[1]] = best[2]


def prefer_best_scheme(choice: Choice, options: Sequence[LayerOptions]) -> Choice:
    """``scheme="auto"`` for rank-rule allocators: per layer, the lowest-error candidate of any
    scheme that costs no more than what the rule chose."""
    by_name = {o.name: o for o in options}
    return {name: by_name[name].best_within(c.cost) if c.scheme != "dense" else c
            for name, c in choice.items()}


def allocate_energy(
    options: Sequence[LayerOptions],
    budget: Budget | None = None,
    fixed: int = 0,
    *,
    energy: float = 0.9,
    value: float | None = None,
) -> tuple[Choice, dict[str, Any]]:
    """TRP's energy criterion: each layer keeps the smallest rank whose energy reaches ``e``.

    With a ``budget``, ``e`` is bisected to the largest value that fits. ``value`` switches to the
    deploy-time rule (keep singular values ``>= value``). A rank past break-even means dense.
    """
    def at_energy(e: float) -> Choice:
        out: Choice = {}
        for o in options:
            cands = _primary(o)
            pick = next((c for c in cands if 1.0 - c.error >= e - 1e-12), None)
            out[o.name] = pick or o.dense
        return out

    if value is not None:
        out: Choice = {}
        for o in options:
            cands = _primary(o)
            if not cands:
                out[o.name] = o.dense
                continue
            unit = _RANKING_UNIT[cands[0].scheme]
            r = o.spectra[unit].rank_at_value(value)
            out[o.name] = next((c for c in cands if _r(c) == r), o.dense)
        return out, {"value": value}
    if budget is None:
        if not 0.0 < energy <= 1.0:
            raise LrfxError(f"energy must be in (0, 1], got {energy}")
        return at_energy(energy), {"energy": energy}
    check_reachable(options, fixed, budget)
    choice, e = _bisect(at_energy, fixed, budget)
    return choice, {"energy": e}


def _r(c: Candidate) -> int:
    return c.rank[1] if isinstance(c.rank, tuple) else int(c.rank or 0)


def allocate_global_sigma(
    options: Sequence[LayerOptions],
    budget: Budget,
    fixed: int = 0,
    *,
    rank_min: int = 5,
) -> tuple[Choice, dict[str, Any]]:
    """Decomposable-Net's global criterion: keep the top ``rho`` of all singular values pooled.

    A layer's rank is how many of its own values were kept, at least ``rank_min``; ``rho`` is
    bisected to meet the budget.
    """
    check_reachable(options, fixed, budget)
    pooled: list[float] = []
    per_layer: dict[str, tuple[list[Candidate], np.ndarray]] = {}
    for o in options:
        cands = _primary(o)
        if not cands:
            continue
        unit = _RANKING_UNIT[cands[0].scheme]
        vals = o.spectra[unit].values.max(dim=0).values.numpy()  # widest group decides
        per_layer[o.name] = (cands, vals)
        pooled.extend(vals.tolist())
    ordered = np.sort(np.asarray(pooled))[::-1]

    def at_ratio(rho: float) -> Choice:
        k = round(rho * len(ordered))
        threshold = ordered[k - 1] if k >= 1 else np.inf
        out: Choice = {}
        for o in options:
            if o.name not in per_layer:
                out[o.name] = o.dense
                continue
            cands, vals = per_layer[o.name]
            r = max(rank_min, int((vals >= threshold).sum()))
            out[o.name] = next((c for c in cands if _r(c) >= r), o.dense)
        return out

    choice, rho = _bisect(at_ratio, fixed, budget)
    return choice, {"rho": rho, "rank_min": rank_min}


def allocate_uniform(
    options: Sequence[LayerOptions], budget: Budget, fixed: int = 0
) -> tuple[Choice, dict[str, Any]]:
    """The baseline: every layer keeps the same fraction of its maximum rank (bisected)."""
    check_reachable(options, fixed, budget)

    def at_fraction(f: float) -> Choice:
        out: Choice = {}
        for o in options:
            cands = _primary(o)
            if not cands:
                out[o.name] = o.dense
                continue
            limit = max(_r(c) for c in cands)
            # the max-rank candidate may be past break-even; use the scheme's rank scale
            r = max(1, round(f * _full_rank(o, limit)))
            out[o.name] = next((c for c in cands if _r(c) >= r), o.dense)
        return out

    choice, f = _bisect(at_fraction, fixed, budget)
    return choice, {"fraction": f}


def _full_rank(o: LayerOptions, fallback: int) -> int:
    cands = _primary(o)
    unit = _RANKING_UNIT[cands[0].scheme]
    sp = o.spectra.get(unit)
    return sp.max_rank if sp is not None else fallback


def allocate_lc(
    options: Sequence[LayerOptions], budget: Budget, fixed: int = 0
) -> tuple[Choice, dict[str, Any]]:
    """Minimize the summed error subject to the budget (the LC C step, solved exactly).

    Multiple-choice knapsack by dynamic programming over Pareto frontiers of (cost, error):
    exact unless a frontier grows past :data:`MAX_FRONTIER` points (then thinned evenly in cost,
    and ``settings["exact"]`` is False). Also reports ``lambda``, the Lagrange multiplier of the
    budget (the C step's ``alpha / mu`` that gives the same plan on the convex hull).
    """
    check_reachable(options, fixed, budget)
    cap = budget.target - fixed
    mins = [min(c.cost for c in o.candidates) for o in options]
    rest_min = np.cumsum([0, *mins[::-1]])[::-1]  # min cost of layers i.. onwards
    costs = np.zeros(1, dtype=np.int64)
    errs = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray, list[Candidate]]] = []
    exact = True
    for i, o in enumerate(options):
        cands = _pareto(o.candidates)
        cc = np.array([c.cost for c in cands], dtype=np.int64)
        ce = np.array([c.error for c in cands])
        tot_c = (costs[:, None] + cc[None, :]).ravel()
        tot_e = (errs[:, None] + ce[None, :]).ravel()
        parent = np.repeat(np.arange(len(costs)), len(cands))
        pick = np.tile(np.arange(len(cands)), len(costs))
        ok = tot_c <= cap - rest_min[i + 1]
        tot_c, tot_e, parent, pick = tot_c[ok], tot_e[ok], parent[ok], pick[ok]
        order = np.lexsort((tot_e, tot_c))
        tot_c, tot_e, parent, pick = tot_c[order], tot_e[order], parent[order], pick[order]
        keep = _frontier(tot_e)
        tot_c, tot_e, parent, pick = tot_c[keep], tot_e[keep], parent[keep], pick[keep]
        if len(tot_c) > MAX_FRONTIER:
            exact = False
            idx = np.unique(np.linspace(0, len(tot_c) - 1, MAX_FRONTIER).round().astype(int))
            tot_c, tot_e, parent, pick = tot_c[idx], tot_e[idx], parent[idx], pick[idx]
        back.append((parent, pick, cands))
        costs, errs = tot_c, tot_e
    j = int(np.argmin(errs))  # frontier is error-decreasing in cost: the last point, but be safe
    choice: Choice = {}
    for o, (parent, pick, cands) in zip(reversed(options), reversed(back), strict=True):
        choice[o.name] = cands[int(pick[j])]
        j = int(parent[j])
    choice = {o.name: choice[o.name] for o in options}
    return choice, {"exact": exact, "lambda": _multiplier(options, choice)}


def _pareto(cands: Sequence[Candidate]) -> list[Candidate]:
    """Drop candidates that cost more without lowering the error."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.cost, c.error)):
        if not out or c.error < out[-1].error:
            out.append(c)
    return out


def _frontier(errors_sorted_by_cost: np.ndarray) -> np.ndarray:
    """Indices of points whose error is strictly below every cheaper point's."""
    if len(errors_sorted_by_cost) == 0:
        return np.zeros(0, dtype=int)
    running = np.minimum.accumulate(errors_sorted_by_cost)
    prev = np.concatenate([[np.inf], running[:-1]])
    return np.nonzero(errors_sorted_by_cost < prev)[0]


def _multiplier(options: Sequence[LayerOptions], choice: Mapping[str, Candidate]) -> float:
    """A Lagrange multiplier consistent with the choice: the median marginal error per cost."""
    slopes = []
    for o in options:
        cur = choice[o.name]
        cheaper = [c for c in o.candidates if c.cost < cur.cost]
        if cheaper:
            nxt = max(cheaper, key=lambda c: c.cost)
            if cur.cost > nxt.cost:
                slopes.append((nxt.error - cur.error) / (cur.cost - nxt.cost))
    return float(np.median(slopes)) if slopes else 0.0


#: Allocators by name: ``fn(options, budget, fixed, **settings) -> (choice, settings)``.
ALLOCATORS: Mapping[str, Callable[..., tuple[Choice, dict[str, Any]]]] = {
    "lc": allocate_lc,
    "energy": allocate_energy,
    "global_sigma": allocate_global_sigma,
    "uniform": allocate_uniform,
}


def to_plan(choice: Mapping[str, Candidate], allocator: str, settings: Mapping[str, Any]
            ) -> RankPlan:
    """The choice as a :class:`~lrfx.RankPlan` (dense layers listed explicitly)."""
    layers = {
        name: LayerPlan("dense") if c.scheme == "dense" else LayerPlan(c.scheme, c.rank)
        for name, c in choice.items()
    }
    return RankPlan(layers, allocator=allocator, settings=dict(settings))
