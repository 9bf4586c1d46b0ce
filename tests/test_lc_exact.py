"""The ``lc`` knapsack's pruning (Lagrangian bound, reduced-cost fixing) never loses the optimum.

Checked against a plain Pareto-frontier dynamic program with no pruning, written here, on
instances much larger than brute force can handle: spectra-like (convex) error curves of several
schemes per layer, and arbitrary (non-convex) ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrfx.passes.allocation import Budget, Candidate, LayerOptions, allocate_lc, cost_of


def _reference(options: list[LayerOptions], cap: int) -> float:
    costs, errs = np.zeros(1, dtype=np.int64), np.zeros(1)
    for o in options:
        c = (costs[:, None] + o.cost[None, :]).ravel()
        e = (errs[:, None] + o.error[None, :]).ravel()
        keep = c <= cap
        c, e = c[keep], e[keep]
        order = np.lexsort((e, c))
        c, e = c[order], e[order]
        front = e < np.concatenate([[np.inf], np.minimum.accumulate(e)[:-1]])
        costs, errs = c[front], e[front]
    return float(errs.min())


def _layer(rng: np.random.Generator, i: int, convex: bool) -> LayerOptions:
    dense = int(rng.integers(500, 5000))
    cands = [Candidate("dense", None, dense, 0.0, dense, dense)]
    for scheme in ("channel", "spatial")[: int(rng.integers(1, 3))]:
        n = int(rng.integers(5, 40))
        per_rank = dense / (n + rng.integers(1, 10))
        if convex:
            sq = np.sort(rng.exponential(size=n + 5))[::-1]
            tails = 1.0 - np.cumsum(sq) / sq.sum()
        else:
            tails = np.sort(rng.random(n))[::-1]
        for r in range(1, n + 1):
            c = int(r * per_rank) + 1
            if c >= dense:
                break
            cands.append(Candidate(scheme, r, c, float(tails[r - 1]), c, c))
    return LayerOptions(f"l{i}", tuple(cands), {})


@pytest.mark.parametrize("convex", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_lc_equals_the_unpruned_dynamic_program(seed: int, convex: bool) -> None:
    rng = np.random.default_rng(seed)
    options = [_layer(rng, i, convex) for i in range(int(rng.integers(4, 9)))]
    total = int(sum(o.cost[0] for o in options))
    lo = int(sum(o.cost.min() for o in options))
    for frac in (0.2, 0.45, 0.8):
        target = lo + int(frac * (total - lo))
        choice, settings = allocate_lc(options, Budget("macs", target, total))
        assert settings["exact"] is True
        assert cost_of(choice, 0) <= target
        got = sum(c.error for c in choice.values())
        assert got == pytest.approx(_reference(options, target), abs=1e-9), (seed, frac)
