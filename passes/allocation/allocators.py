"""Rank allocators: pure functions of the layer options and a budget.

Each returns a mapping of layer name to the chosen :class:`Candidate` (dense included); turn it
into a :class:`~lrfx.RankPlan` with :func:`to_plan`.

* :func:`allocate_energy` — TRP's energy criterion (smallest rank keeping energy ``e``), or the
  deploy-time value threshold; with a budget, ``e`` is bisected to meet it.
* :func:`allocate_global_sigma` — Decomposable-Net: pool every layer's singular values, keep the
  top fraction ``rho`` (``rank_min`` per layer), bisect ``rho`` to meet the budget.
* :func:`allocate_lc` — the LC C step for a budget: minimize the summed error subject to the
  cost, solved exactly as a multiple-choice knapsack (see its docstring).
* :func:`allocate_uniform` — the same kept fraction of the maximum rank in every layer.

Budgets are met from below; bisection leaves discrete gaps, which :func:`fill_budget` closes
greedily (best error reduction per unit of cost) until the plan uses the budget within 0.5 %.
All of them work on the options' arrays; candidates become objects only at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrfx.errors import BudgetInfeasibleError, LrfxError
from lrfx.passes.allocation.candidates import (
    Budget,
    Candidate,
    LayerOptions,
    check_reachable,
)
from lrfx.plan import LayerPlan, RankPlan
from lrfx.schemes import get_scheme

__all__ = [
    "ALLOCATORS",
    "allocate_energy",
    "allocate_global_sigma",
    "allocate_lagrangian",
    "allocate_lc",
    "allocate_uniform",
    "fill_budget",
    "global_sigma_ranks",
    "prefer_best_scheme",
    "to_plan",
]

Choice = dict[str, Candidate]

#: Largest Pareto frontier the exact knapsack keeps; beyond it the frontier is thinned (and the
#: result flagged as not proven optimal).
MAX_FRONTIER = 4_000


def _choice(options: Sequence[LayerOptions], idx: Sequence[int] | np.ndarray) -> Choice:
    return {o.name: o.candidate(int(i)) for o, i in zip(options, idx, strict=True)}


def _indices(options: Sequence[LayerOptions], choice: Mapping[str, Candidate]) -> np.ndarray:
    return np.array([o.index_of(choice[o.name]) for o in options], dtype=np.int64)


def _total(options: Sequence[LayerOptions], idx: np.ndarray, attr: str = "cost") -> float:
    return float(sum(getattr(o, attr)[i] for o, i in zip(options, idx, strict=True)))


def _primary(o: LayerOptions) -> np.ndarray:
    """Indices of the layer's first factored scheme's candidates (in rank order)."""
    if len(o) < 2:
        return np.zeros(0, dtype=np.int64)
    return o.scheme_indices(o.scheme_of(1))


def _ranking_unit(scheme: str) -> str:
    """The spectrum whose values rank a scheme's main rank (its last unfolding)."""
    return get_scheme(scheme).unfoldings[-1]


def _bisect(
    make: Callable[[float], np.ndarray], options: Sequence[LayerOptions], fixed: int,
    budget: Budget, lo: float = 0.0, hi: float = 1.0, steps: int = 60,
) -> tuple[np.ndarray, float]:
    """Largest parameter in [lo, hi] whose choice fits the budget (cost is nondecreasing in it)."""
    best = make(lo)
    floor = fixed + int(_total(options, best))
    if floor > budget.target:
        raise BudgetInfeasibleError(
            f"a {budget.metric} budget of {budget.target:,} ({budget.fraction:.3f} of "
            f"{budget.total:,}) cannot be met by this allocator: its rule (one scheme per layer, "
            f"its minimum rank) reaches {floor:,} ({floor / budget.total:.3f}) at the lowest; "
            "raise the budget or use allocator='lc', which considers every scheme and rank"
        )
    top = make(hi)
    if fixed + _total(options, top) <= budget.target:
        return top, hi
    best_t = lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        idx = make(mid)
        if fixed + _total(options, idx) <= budget.target:
            lo, best, best_t = mid, idx, mid
        else:
            hi = mid
    return best, best_t


def _fill(options: Sequence[LayerOptions], idx: np.ndarray, fixed: int, budget: Budget,
          slack: float = 0.005) -> np.ndarray:
    idx = idx.copy()
    while True:
        left = budget.target - fixed - _total(options, idx)
        if left <= slack * budget.target:
            return idx
        best: tuple[float, int, int] | None = None
        for li, o in enumerate(options):
            extra = o.cost - o.cost[idx[li]]
            gain = o.error[idx[li]] - o.error
            ok = (extra > 0) & (extra <= left) & (gain > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, gain / np.where(ok, extra, 1), -np.inf)
            j = int(np.argmax(ratio))
            if best is None or ratio[j] > best[0]:
                best = (float(ratio[j]), li, j)
        if best is None:
            return idx
        idx[best[1]] = best[2]


def fill_budget(choice: Choice, options: Sequence[LayerOptions], fixed: int, budget: Budget,
                slack: float = 0.005) -> Choice:
    """Greedily spend what the budget has left on the upgrades that cut the most error per cost.

    Stops once the plan is within ``slack`` of the target or nothing else fits.
    """
    idx = _fill(options, _indices(options, choice), fixed, budget, slack)
    return _choice(options, idx)


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
    prim = [_primary(o) for o in options]

    def at_energy(e: float) -> np.ndarray:
        out = np.zeros(len(options), dtype=np.int64)
        for li, (o, p) in enumerate(zip(options, prim, strict=True)):
            ok = np.flatnonzero(1.0 - o.error[p] >= e - 1e-12)
            out[li] = p[ok[0]] if len(ok) else 0
        return out

    if value is not None:
        out = np.zeros(len(options), dtype=np.int64)
        for li, (o, p) in enumerate(zip(options, prim, strict=True)):
            if len(p) == 0:
                continue
            r = o.spectra[_ranking_unit(o.scheme_of(p[0]))].rank_at_value(value)
            hit = np.flatnonzero(o.main_ranks(p) == r)
            out[li] = p[hit[0]] if len(hit) else 0
        return _choice(options, out), {"value": value}
    if budget is None:
        if not 0.0 < energy <= 1.0:
            raise LrfxError(f"energy must be in (0, 1], got {energy}")
        return _choice(options, at_energy(energy)), {"energy": energy}
    check_reachable(options, fixed, budget)
    idx, e = _bisect(at_energy, options, fixed, budget)
    return _choice(options, idx), {"energy": e}


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
    per_layer: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    pooled = []
    for o in options:
        p = _primary(o)
        if len(p) == 0:
            per_layer.append(None)
            continue
        unit = _ranking_unit(o.scheme_of(p[0]))
        vals = o.spectra[unit].values.max(dim=0).values.numpy()  # widest group decides
        if o.weight is not None:  # loss-aware: a value's square is its weighted relative error
            vals = vals * np.sqrt(o.weight / max(float((vals ** 2).sum()), 1e-300))
        per_layer.append((p, o.main_ranks(p), vals))
        pooled.append(vals)
    ordered = np.sort(np.concatenate(pooled) if pooled else np.zeros(0))[::-1]

    def at_ratio(rho: float) -> np.ndarray:
        threshold = _sigma_threshold(ordered, rho)
        out = np.zeros(len(options), dtype=np.int64)
        for li, entry in enumerate(per_layer):
            if entry is None:
                continue
            p, main, vals = entry
            r = max(rank_min, int((vals >= threshold).sum()))
            ok = np.flatnonzero(main >= r)
            out[li] = p[ok[0]] if len(ok) else 0
        return out

    idx, rho = _bisect(at_ratio, options, fixed, budget)
    return _choice(options, idx), {"rho": rho, "rank_min": rank_min}


def _sigma_threshold(ordered: np.ndarray, rho: float) -> float:
    """The smallest kept value when the top ``round(rho * n)`` of ``ordered`` (descending) are
    kept."""
    k = round(rho * len(ordered))
    return float(ordered[k - 1]) if k >= 1 else math.inf


def global_sigma_ranks(values: Mapping[str, np.ndarray], rho: float, rank_min: int = 5
                       ) -> dict[str, int]:
    """Decomposable-Net's criterion without a budget: pool every layer's singular values, keep
    the top ``round(rho * total)``; a layer's rank is how many of its own were kept, at least
    ``rank_min`` (and at most its number of values).

    Example:
        >>> global_sigma_ranks({"a": np.array([9.0, 5.0, 1.0]), "b": np.array([4.0, 3.0])},
        ...                    0.6, rank_min=1)
        {'a': 2, 'b': 1}
    """
    if not 0.0 <= rho <= 1.0:
        raise LrfxError(f"rho must be a fraction in [0, 1], got {rho!r}")
    arrays = {n: np.asarray(v, dtype=np.float64).reshape(-1) for n, v in values.items()}
    pooled = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    threshold = _sigma_threshold(np.sort(pooled)[::-1], rho)
    return {n: min(len(v), max(rank_min, int((v >= threshold).sum())))
            for n, v in arrays.items()}


def allocate_uniform(
    options: Sequence[LayerOptions], budget: Budget, fixed: int = 0
) -> tuple[Choice, dict[str, Any]]:
    """The baseline: every layer keeps the same fraction of its maximum rank (bisected)."""
    check_reachable(options, fixed, budget)
    prim: list[tuple[np.ndarray, np.ndarray, int] | None] = []
    for o in options:
        p = _primary(o)
        if len(p) == 0:
            prim.append(None)
            continue
        main = o.main_ranks(p)
        sp = o.spectra.get(_ranking_unit(o.scheme_of(p[0])))
        # the max-rank candidate may be past break-even; use the scheme's rank scale
        full = sp.max_rank if sp is not None else int(main.max())
        prim.append((p, main, full))

    def at_fraction(f: float) -> np.ndarray:
        out = np.zeros(len(options), dtype=np.int64)
        for li, entry in enumerate(prim):
            if entry is None:
                continue
            p, main, full = entry
            r = max(1, round(f * full))
            ok = np.flatnonzero(main >= r)
            out[li] = p[ok[0]] if len(ok) else 0
        return out

    idx, f = _bisect(at_fraction, options, fixed, budget)
    return _choice(options, idx), {"fraction": f}


# --- lc: the exact multiple-choice knapsack -------------------------------------------------------


@dataclass
class _Flat:
    """Every layer's candidates in one array, each layer's sorted by (cost, error)."""

    cost: np.ndarray     # int64
    fcost: np.ndarray    # float64 copy
    error: np.ndarray    # float64
    layer: np.ndarray    # layer index of each entry
    local: np.ndarray    # index into the layer's own options
    start: np.ndarray    # (L + 1,) segment starts
    count: np.ndarray    # (L,)

    @classmethod
    def of(cls, options: Sequence[LayerOptions]) -> _Flat:
        costs, errs, layers, locs = [], [], [], []
        for li, o in enumerate(options):
            order = np.lexsort((o.error, o.cost))
            costs.append(o.cost[order])
            errs.append(o.error[order])
            layers.append(np.full(len(order), li, dtype=np.int64))
            locs.append(order)
        count = np.array([len(c) for c in costs], dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(count)])
        cost = np.concatenate(costs) if costs else np.zeros(0, dtype=np.int64)
        return cls(cost, cost.astype(np.float64), np.concatenate(errs) if errs else np.zeros(0),
                   np.concatenate(layers) if layers else np.zeros(0, dtype=np.int64),
                   np.concatenate(locs) if locs else np.zeros(0, dtype=np.int64), start, count)

    def lagrangian(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, the cheapest minimizer of ``error + lam * cost`` (flat index) and the min."""
        val = self.error + lam * self.fcost
        mins = np.minimum.reduceat(val, self.start[:-1])
        at = np.flatnonzero(val <= np.repeat(mins, self.count))
        _, first = np.unique(self.layer[at], return_index=True)
        return at[first], mins


def allocate_lc(
    options: Sequence[LayerOptions], budget: Budget, fixed: int = 0
) -> tuple[Choice, dict[str, Any]]:
    """Minimize the summed error subject to the budget (the LC C step), solved exactly.

    A multiple-choice knapsack, solved in three steps:

    1. **Lagrangian relaxation** (the C step with a shared multiplier): for a multiplier
       ``lam`` every layer independently takes the candidate minimizing ``error + lam * cost``;
       ``lam`` is bisected to the smallest value whose choice fits. Any ``lam`` gives a lower
       bound ``LB`` on the optimum, and the fitting choice, topped up greedily, an upper bound
       ``UB``.
    2. **Reduced-cost fixing**: a candidate whose ``error + lam * cost`` exceeds its layer's
       minimum by more than ``UB - LB`` cannot be in any better solution, so it is dropped.
       With many fine-grained ranks the gap is tiny and a few candidates per layer remain.
    3. **Dynamic programming** over Pareto frontiers of (cost, error) on what remains, pruning
       states whose Lagrangian bound on the rest exceeds ``UB``: exact, unless a frontier grows
       past :data:`MAX_FRONTIER` points (then it is thinned evenly in cost and
       ``settings["exact"]`` is False).

    Also reports ``lambda``, the multiplier of the budget: the C step's ``alpha / mu`` that gives
    the same plan on the convex hull.
    """
    check_reachable(options, fixed, budget)
    cap = budget.target - fixed
    flat = _Flat.of(options)
    n_layers = len(options)

    def cost_at(sel: np.ndarray) -> int:
        return int(flat.cost[sel].sum())

    sel0, _ = flat.lagrangian(0.0)
    if cost_at(sel0) <= cap:  # the most accurate choice fits
        return _finish(options, flat, sel0, 0.0, True)

    # 1. bisect lam (log scale) for the smallest value whose choice fits; track the best bound
    lo, hi = 1e-30, 1.0
    while cost_at(flat.lagrangian(hi)[0]) > cap:
        hi *= 16.0
    best_lb, lb_lam = -np.inf, hi
    for _ in range(64):
        mid = float(np.sqrt(lo * hi))
        sel, mins = flat.lagrangian(mid)
        lb = float(mins.sum()) - mid * cap
        if lb > best_lb:
            best_lb, lb_lam = lb, mid
        if cost_at(sel) <= cap:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-12:
            break
    sel_hi, mins_hi = flat.lagrangian(hi)
    lb_hi = float(mins_hi.sum()) - hi * cap
    if lb_hi > best_lb:
        best_lb, lb_lam = lb_hi, hi
    local = flat.local[sel_hi]
    upper_idx = _fill(options, local, fixed, budget, slack=0.0)
    upper = _total(options, upper_idx, "error")
    tol = 1e-9 * max(1.0, abs(upper))
    if upper - best_lb <= tol:
        return _finish_local(options, upper_idx, hi, True)

    # 2. reduced-cost fixing at the multiplier of the best bound
    gap = upper - best_lb
    val = flat.error + lb_lam * flat.fcost
    mins = np.minimum.reduceat(val, flat.start[:-1])
    keep = val - np.repeat(mins, flat.count) <= gap + tol
    kept = [np.flatnonzero(keep[flat.start[i]:flat.start[i + 1]]) + flat.start[i]
            for i in range(n_layers)]

    # 3. Pareto DP with Lagrangian bound pruning
    rest_min = np.zeros(n_layers + 1, dtype=np.int64)  # min cost of layers i.. onwards
    rest_lag = np.zeros(n_layers + 1)                   # sum of their Lagrangian minima
    for i in range(n_layers - 1, -1, -1):
        rest_min[i] = rest_min[i + 1] + int(flat.cost[kept[i]].min())
        rest_lag[i] = rest_lag[i + 1] + float(mins[i])
    costs = np.zeros(1, dtype=np.int64)
    errs = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    exact = True
    for i in range(n_layers):
        kc, ke = flat.cost[kept[i]], flat.error[kept[i]]
        tot_c = (costs[:, None] + kc[None, :]).ravel()
        tot_e = (errs[:, None] + ke[None, :]).ravel()
        parent = np.repeat(np.arange(len(costs)), len(kc))
        pick = np.tile(np.arange(len(kc)), len(costs))
        bound = tot_e + rest_lag[i + 1] - lb_lam * (cap - tot_c)
        ok = (tot_c <= cap - rest_min[i + 1]) & (bound <= upper + tol)
        tot_c, tot_e, parent, pick = tot_c[ok], tot_e[ok], parent[ok], pick[ok]
        order = np.lexsort((tot_e, tot_c))
        tot_c, tot_e, parent, pick = tot_c[order], tot_e[order], parent[order], pick[order]
        front = _frontier(tot_e)
        tot_c, tot_e, parent, pick = tot_c[front], tot_e[front], parent[front], pick[front]
        if len(tot_c) > MAX_FRONTIER:
            exact = False
            thin = np.unique(np.linspace(0, len(tot_c) - 1, MAX_FRONTIER).round().astype(int))
            tot_c, tot_e, parent, pick = tot_c[thin], tot_e[thin], parent[thin], pick[thin]
        back.append((parent, pick))
        costs, errs = tot_c, tot_e
    if len(errs) == 0:  # pruning can only empty the frontier through rounding: keep the bound
        return _finish_local(options, upper_idx, hi, exact)
    j = int(np.argmin(errs))
    if float(errs[j]) > upper:
        return _finish_local(options, upper_idx, hi, exact)
    sel = np.zeros(n_layers, dtype=np.int64)
    for i in range(n_layers - 1, -1, -1):
        parent, pick = back[i]
        sel[i] = kept[i][int(pick[j])]
        j = int(parent[j])
    return _finish(options, flat, sel, hi, exact)


def allocate_lagrangian(
    options: Sequence[LayerOptions], multiplier: float
) -> tuple[Choice, dict[str, Any]]:
    """The LC C step in its penalty form: each layer independently takes the cheapest
    candidate minimizing ``error + multiplier * cost`` (``multiplier = 2 * alpha / mu`` for
    the objective ``alpha * cost + mu / 2 * error``). No budget: the cost falls as the
    multiplier grows."""
    if not math.isfinite(multiplier) or multiplier < 0:
        raise LrfxError(f"the multiplier of the cost must be a non-negative number, got "
                        f"{multiplier!r}")
    flat = _Flat.of(options)
    sel, _ = flat.lagrangian(float(multiplier))
    return _finish(options, flat, sel, float(multiplier), True)


def _finish(options: Sequence[LayerOptions], flat: _Flat, sel: np.ndarray, lam: float,
            exact: bool) -> tuple[Choice, dict[str, Any]]:
    return _finish_local(options, flat.local[sel], lam, exact)


def _finish_local(options: Sequence[LayerOptions], local: np.ndarray, lam: float,
                  exact: bool) -> tuple[Choice, dict[str, Any]]:
    return _choice(options, local), {"exact": exact, "lambda": float(lam)}


def _frontier(errors_sorted_by_cost: np.ndarray) -> np.ndarray:
    """Indices of points whose error is strictly below every cheaper point's."""
    if len(errors_sorted_by_cost) == 0:
        return np.zeros(0, dtype=int)
    running = np.minimum.accumulate(errors_sorted_by_cost)
    prev = np.concatenate([[np.inf], running[:-1]])
    return np.nonzero(errors_sorted_by_cost < prev)[0]


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
