"""Rank allocation (algorithms.md §1-§3): the pure allocators and ``lrfx.allocate``.

The knapsack allocator is checked against brute force on hand-built options; every allocator is
then run through ``lrfx.allocate`` on the CIFAR ResNet-20 analysis (module-scoped, computed once).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import pytest
import torch
from _rewrite_models import small_cnn

import lrfx
from lrfx.contrib.zoo import resnet20
from lrfx.cost import break_even_rank
from lrfx.passes.allocation import (
    Budget,
    Candidate,
    LayerOptions,
    allocate_energy,
    allocate_global_sigma,
    allocate_lagrangian,
    allocate_lc,
    build_options,
    check_reachable,
    cost_of,
    make_budget,
)
from lrfx.passes.allocation import allocators as allocators_mod

ALLOCATORS = ("lc", "energy", "global_sigma", "uniform")
FRACTIONS = (0.7, 0.5, 0.3)


@pytest.fixture(scope="module")
def r20() -> lrfx.Analysis:
    torch.manual_seed(0)
    return lrfx.analyze(resnet20(), torch.randn(1, 3, 32, 32))


@pytest.fixture(scope="module")
def plans(r20: lrfx.Analysis) -> dict[tuple[str, str, float], tuple[lrfx.RankPlan, dict]]:
    """Every allocator at every fraction, for MACs and parameter budgets (scheme auto)."""
    out = {}
    for alloc in ALLOCATORS:
        for metric in ("macs", "params"):
            for f in FRACTIONS:
                out[alloc, metric, f] = lrfx.allocate(r20, allocator=alloc, **{metric: f})
    return out


# --- pure allocators on hand-built options --------------------------------------------------------


def _random_options(rng: random.Random) -> list[LayerOptions]:
    """2-5 layers of 2-6 candidates: dense first (highest cost, zero error), random rest."""
    layers = []
    for i in range(rng.randint(2, 5)):
        dense_cost = rng.randint(50, 200)
        cands = [Candidate("dense", None, dense_cost, 0.0, dense_cost, dense_cost)]
        for r in range(1, rng.randint(2, 6)):
            c = rng.randint(1, dense_cost - 1)
            cands.append(Candidate("channel", r, c, rng.random(), c, c))
        layers.append(LayerOptions(f"l{i}", tuple(cands), {}))
    return layers


def _brute_force(options: list[LayerOptions], cap: int) -> float:
    best = float("inf")
    for combo in itertools.product(*(o.candidates for o in options)):
        if sum(c.cost for c in combo) <= cap:
            best = min(best, sum(c.error for c in combo))
    return best


def test_lc_is_optimal_against_brute_force() -> None:
    rng = random.Random(1234)
    for _ in range(30):
        options = _random_options(rng)
        fixed = rng.randint(0, 100)
        lo = fixed + sum(min(c.cost for c in o.candidates) for o in options)
        hi = fixed + sum(o.dense.cost for o in options)
        target = rng.randint(lo, hi)
        budget = Budget("macs", target, hi)
        choice, settings = allocate_lc(options, budget, fixed)
        assert settings["exact"] is True
        assert isinstance(settings["lambda"], float)
        assert set(choice) == {o.name for o in options}
        for o in options:
            assert choice[o.name] in o.candidates
        assert cost_of(choice, fixed) <= target
        got = sum(c.error for c in choice.values())
        assert got == pytest.approx(_brute_force(options, target - fixed), abs=1e-12)


def test_lagrangian_choice_minimizes_error_plus_priced_cost_per_layer() -> None:
    rng = random.Random(7)
    for _ in range(20):
        options = _random_options(rng)
        previous = None
        for m in (0.0, 1e-3, 1e-2, 0.1, 1.0):
            choice, settings = allocate_lagrangian(options, m)
            assert settings["lambda"] == m
            for o in options:
                best = min(c.error + m * c.cost for c in o.candidates)
                c = choice[o.name]
                assert c.error + m * c.cost == pytest.approx(best, abs=1e-12)
                # ties go to the cheapest candidate
                assert c.cost == min(x.cost for x in o.candidates
                                     if x.error + m * x.cost <= best + 1e-12)
            cost = cost_of(choice, 0)
            assert previous is None or cost <= previous  # a higher price never costs more
            previous = cost
    with pytest.raises(lrfx.LrfxError, match="multiplier"):
        allocate_lagrangian(_random_options(rng), -1.0)


def test_lc_at_the_full_budget_keeps_everything_dense() -> None:
    options = _random_options(random.Random(7))
    total = sum(o.dense.cost for o in options)
    choice, _ = allocate_lc(options, Budget("macs", total, total))
    assert all(c.scheme == "dense" for c in choice.values())


def test_lc_thinned_frontier_is_flagged_and_still_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # an instance whose Lagrangian gap is wide enough that bound pruning leaves frontiers of more
    # than 3 points (the bound prunes most instances down to a handful)
    rng = random.Random(0)
    options = [o for _ in range(3) for o in _random_options(rng)]
    options = [LayerOptions(f"x{i}", o.candidates, {}) for i, o in enumerate(options)]
    hi = sum(o.dense.cost for o in options)
    budget = Budget("macs", int(0.6 * hi), hi)
    monkeypatch.setattr(allocators_mod, "MAX_FRONTIER", 3)
    choice, settings = allocate_lc(options, budget)
    assert settings["exact"] is False
    assert cost_of(choice, 0) <= budget.target


def test_check_reachable_states_the_minimum() -> None:
    options = _random_options(random.Random(3))
    cheapest = 10 + sum(min(c.cost for c in o.candidates) for o in options)
    check_reachable(options, 10, Budget("macs", cheapest, 10_000))
    msg = f"smallest reachable cost is {cheapest:,}"
    with pytest.raises(lrfx.BudgetInfeasibleError, match=msg):
        check_reachable(options, 10, Budget("macs", cheapest - 1, 10_000))
    with pytest.raises(lrfx.BudgetInfeasibleError):
        allocate_lc(options, Budget("macs", cheapest - 1, 10_000), 10)


# --- make_budget ----------------------------------------------------------------------------------


def test_make_budget_fractions_and_counts() -> None:
    b = make_budget(0.5, None, 1000, 80)
    assert (b.metric, b.target, b.total) == ("macs", 500, 1000)
    assert b.fraction == pytest.approx(0.5)
    b = make_budget(None, 40, 1000, 80)
    assert (b.metric, b.target, b.total) == ("params", 40, 80)
    assert make_budget(1.0, None, 1000, 80).target == 1000
    assert make_budget(2000, None, 1000, 80).target == 2000  # an absolute count may exceed


@pytest.mark.parametrize(
    ("macs", "params", "match"),
    [
        (None, None, "exactly one budget"),
        (0.5, 0.5, "exactly one budget"),
        (0, None, "must be positive"),
        (0.0, None, "must be positive"),
        (-0.5, None, "must be positive"),
        (None, -3, "must be positive"),
        (1.5, None, "fraction above 1"),
        (None, 1.01, "fraction above 1"),
        (True, None, "must be a number"),
        (float("nan"), None, "must be a number"),
        (float("inf"), None, "must be a number"),
        ("0.5", None, "must be a number"),
    ],
)
def test_make_budget_rejects(macs: Any, params: Any, match: str) -> None:
    with pytest.raises(lrfx.LrfxError, match=match):
        make_budget(macs, params, 1000, 80)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"macs": 0}, {"macs": -0.1}, {"macs": 1.5}, {"params": 2.0}, {"macs": 0.5, "params": 0.5}],
)
def test_allocate_and_compress_reject_bad_budgets(r20: lrfx.Analysis, kwargs: dict) -> None:
    with pytest.raises(lrfx.LrfxError, match=r"budget|fraction"):
        lrfx.allocate(r20, **kwargs)
    with pytest.raises(lrfx.LrfxError, match=r"budget|fraction"):
        lrfx.compress(small_cnn(), torch.randn(1, 3, 16, 16), **kwargs)


def test_unknown_allocator(r20: lrfx.Analysis) -> None:
    with pytest.raises(lrfx.LrfxError, match=r"unknown allocator 'greedy'.*lc"):
        lrfx.allocate(r20, macs=0.5, allocator="greedy")
    with pytest.raises(lrfx.LrfxError, match="unknown allocator"):
        lrfx.compress(small_cnn(), torch.randn(1, 3, 16, 16), macs=0.5, allocator="greedy")


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_unreachable_budget_states_the_smallest_cost(r20: lrfx.Analysis, metric: str) -> None:
    options = build_options(r20.layers, metric=metric, schemes="auto")
    total = r20.total_macs if metric == "macs" else r20.total_params
    fixed = total - sum(o.dense.cost for o in options)
    cheapest = fixed + sum(min(c.cost for c in o.candidates) for o in options)
    with pytest.raises(lrfx.BudgetInfeasibleError) as info:
        lrfx.allocate(r20, **{metric: 1e-6})
    assert isinstance(info.value, lrfx.LrfxError)
    assert f"smallest reachable cost is {cheapest:,}" in str(info.value)
    # the cheapest plan itself is reachable, exactly
    plan, _ = lrfx.allocate(r20, **{metric: cheapest})
    assert (plan.macs if metric == "macs" else plan.params) == cheapest


def test_compress_unreachable_budget() -> None:
    with pytest.raises(lrfx.BudgetInfeasibleError, match=r"smallest reachable cost is [\d,]+"):
        lrfx.compress(small_cnn(), torch.randn(1, 3, 16, 16), macs=1e-6)


# --- every allocator on ResNet-20 -----------------------------------------------------------------


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("alloc", ALLOCATORS)
def test_plans_meet_and_use_the_budget(
    r20: lrfx.Analysis, plans: dict, alloc: str, metric: str
) -> None:
    total = r20.total_macs if metric == "macs" else r20.total_params
    for f in FRACTIONS:
        plan, errors = plans[alloc, metric, f]
        got = plan.macs if metric == "macs" else plan.params
        target = int(f * total)
        assert got <= target, (alloc, metric, f)
        assert got >= 0.99 * target, (alloc, metric, f, got / total)
        assert plan.allocator == alloc
        assert plan.settings["metric"] == metric
        assert plan.settings["target"] == target
        assert set(errors) == set(plan.factored)
        assert all(0.0 <= e <= 1.0 for e in errors.values())
        assert set(plan) == {r.name for r in r20.factorable}


def test_lc_is_exact_and_has_the_lowest_summed_error(r20: lrfx.Analysis, plans: dict) -> None:
    for metric in ("macs", "params"):
        for f in FRACTIONS:
            lc_plan, lc_err = plans["lc", metric, f]
            assert lc_plan.settings["exact"] is True
            for alloc in ALLOCATORS[1:]:
                _, err = plans[alloc, metric, f]
                assert sum(lc_err.values()) <= sum(err.values()) + 1e-9, (alloc, metric, f)
    # the gap is real somewhere, not a tie everywhere
    assert any(
        sum(plans["lc", "macs", f][1].values()) < 0.95 * sum(plans[a, "macs", f][1].values())
        for a in ALLOCATORS[1:]
        for f in FRACTIONS
    )


def test_auto_scheme_uses_more_than_channel(plans: dict) -> None:
    schemes = {lp.scheme for (alloc, _, _), (plan, _) in plans.items() if alloc == "lc"
               for lp in plan.values()}
    assert schemes - {"channel", "dense", "svd"}, schemes
    assert "spatial" in {lp.scheme for lp in plans["lc", "macs", 0.5][0].values()}


def _candidate(opts: LayerOptions, scheme: str, rank: Any) -> Candidate:
    rank = tuple(rank) if isinstance(rank, (list, tuple)) else rank
    found = [c for c in opts.candidates if c.scheme == scheme and c.rank == rank]
    assert len(found) == 1, (opts.name, scheme, rank)
    return found[0]


@pytest.mark.parametrize("alloc", ALLOCATORS)
def test_no_layer_choice_is_dominated(r20: lrfx.Analysis, plans: dict, alloc: str) -> None:
    """Per layer, no other candidate has lower error at equal or lower cost (scheme auto)."""
    options = {o.name: o for o in build_options(r20.layers, metric="macs", schemes="auto")}
    for f in FRACTIONS:
        plan, errors = plans[alloc, "macs", f]
        for name, lp in plan.items():
            opts = options[name]
            chosen = opts.dense if lp.dense else _candidate(opts, lp.scheme, lp.rank)
            assert errors.get(name, 0.0) == pytest.approx(chosen.error)
            assert lp.macs == chosen.macs
            better = [c for c in opts.candidates
                      if c.cost <= chosen.cost and c.error < chosen.error - 1e-12]
            assert not better, (alloc, f, name, chosen, better[:2])


@pytest.mark.parametrize("alloc", ALLOCATORS)
def test_factored_layers_are_below_break_even(r20: lrfx.Analysis, plans: dict, alloc: str) -> None:
    for metric in ("macs", "params"):
        for f in FRACTIONS:
            plan, _ = plans[alloc, metric, f]
            for name, lp in plan.factored.items():
                rec = r20[name]
                assert lp.macs is not None and lp.params is not None
                if metric == "macs":
                    assert lp.macs < rec.macs, (name, lp)
                    if lp.scheme in ("channel", "spatial", "svd"):
                        assert lp.rank < break_even_rank(rec.calls[0], lp.scheme)
                else:
                    assert lp.params < rec.params, (name, lp)


def test_options_stop_at_break_even(r20: lrfx.Analysis) -> None:
    options = {o.name: o for o in build_options(r20.layers, metric="macs", schemes="auto")}
    for name, opts in options.items():
        g = r20[name].calls[0]
        assert opts.dense.scheme == "dense" and opts.dense.error == 0.0
        assert opts.dense.cost == r20[name].macs
        for scheme in ("channel", "spatial", "svd"):
            ranks = [c.rank for c in opts.of_scheme(scheme)]
            if scheme in r20[name].schemes:
                assert ranks == list(range(1, break_even_rank(g, scheme))), (name, scheme)
            else:
                assert ranks == []
        assert all(c.cost < opts.dense.cost for c in opts.candidates[1:])


@pytest.mark.parametrize("alloc", ALLOCATORS)
def test_round_to_gives_multiples(r20: lrfx.Analysis, alloc: str) -> None:
    plan, _ = lrfx.allocate(r20, macs=0.5, allocator=alloc, round_to=8)
    assert plan.macs <= 0.5 * r20.total_macs
    assert plan.factored
    for name, lp in plan.factored.items():
        ranks = lp.rank if isinstance(lp.rank, tuple) else (lp.rank,)
        assert all(r % 8 == 0 for r in ranks), (name, lp)
    assert plan.settings["round_to"] == 8


def test_energy_without_budget_matches_rank_at_energy(r20: lrfx.Analysis) -> None:
    for scheme in ("channel", "spatial"):
        options = build_options(r20.layers, metric="macs", schemes=scheme)
        n_factored = n_dense = 0
        for e in (0.5, 0.9, 0.99):
            choice, settings = allocate_energy(options, energy=e)
            assert settings == {"energy": e}
            for o in options:
                rec = r20[o.name]
                s = "svd" if "svd" in rec.schemes else scheme
                r = rec.rank_at_energy(s, e)
                c = choice[o.name]
                if r < break_even_rank(rec.calls[0], s):
                    assert (c.scheme, c.rank) == (s, r), (o.name, e)
                    assert 1.0 - c.error >= e - 1e-9
                    n_factored += 1
                else:
                    assert c.scheme == "dense", (o.name, e, r)
                    n_dense += 1
        assert n_factored > 0 and n_dense > 0  # both branches exercised
    with pytest.raises(lrfx.LrfxError, match="energy"):
        allocate_energy(options, energy=0.0)


def test_energy_value_rule(r20: lrfx.Analysis) -> None:
    options = build_options(r20.layers, metric="macs", schemes="channel")
    choice, settings = allocate_energy(options, value=0.5)
    assert settings == {"value": 0.5}
    for o in options:
        rec = r20[o.name]
        s = "svd" if "svd" in rec.schemes else "channel"
        r = rec.spectra["rows" if s == "svd" else "channel"].rank_at_value(0.5)
        c = choice[o.name]
        assert c.rank == r if r < break_even_rank(rec.calls[0], s) else c.scheme == "dense"


def test_energy_with_budget_reports_the_bisected_energy(r20: lrfx.Analysis) -> None:
    options = build_options(r20.layers, metric="macs", schemes="channel")
    fixed = r20.total_macs - sum(o.dense.cost for o in options)
    budget = make_budget(0.5, None, r20.total_macs, r20.total_params)
    choice, settings = allocate_energy(options, budget, fixed)
    assert 0.0 < settings["energy"] < 1.0
    assert cost_of(choice, fixed) <= budget.target
    # a slightly higher energy no longer fits
    above, _ = allocate_energy(options, energy=min(1.0, settings["energy"] + 1e-3))
    assert cost_of(above, fixed) > budget.target


@pytest.mark.parametrize("rank_min", [5, 10])
def test_global_sigma_respects_rank_min(r20: lrfx.Analysis, rank_min: int) -> None:
    for f in (0.7, 0.5):
        plan, _ = lrfx.allocate(r20, macs=f, allocator="global_sigma", scheme="channel",
                                rank_min=rank_min)
        assert plan.settings["rank_min"] == rank_min
        assert plan.macs <= f * r20.total_macs
        assert plan.factored
        assert all(lp.rank >= rank_min for lp in plan.factored.values()), plan.factored


def test_global_sigma_pools_raw_singular_values(r20: lrfx.Analysis) -> None:
    """The kept values are the top of the pooled list: a layer's smallest kept value beats every
    other layer's largest dropped one (ranks above rank_min, before the budget is filled)."""
    options = build_options(r20.layers, metric="macs", schemes="channel")
    fixed = r20.total_macs - sum(o.dense.cost for o in options)
    budget = make_budget(0.5, None, r20.total_macs, r20.total_params)
    choice, settings = allocate_global_sigma(options, budget, fixed, rank_min=1)
    assert 0.0 < settings["rho"] < 1.0
    kept, dropped = [], []
    for o in options:
        c = choice[o.name]
        if c.scheme == "dense":
            continue
        unit = "rows" if c.scheme == "svd" else "channel"
        vals = o.spectra[unit].values[0]
        if c.rank > 1:  # rank 1 may be the rank_min floor, not a kept value
            kept.append(float(vals[c.rank - 1]))
        if c.rank < len(vals):
            dropped.append(float(vals[c.rank]))
    assert min(kept) >= max(dropped) - 1e-9


# --- rule allocators never return a plan over budget ---------------------------------------------


@pytest.mark.parametrize("alloc", ["energy", "global_sigma", "uniform"])
@pytest.mark.parametrize(("fraction", "round_to"), [(0.03, None), (0.2, 8)])
def test_rule_allocators_never_exceed_a_reachable_budget(
    r20: lrfx.Analysis, alloc: str, fraction: float, round_to: int | None
) -> None:
    target = int(fraction * r20.total_macs)  # reachable: lc finds a plan
    lc_plan, _ = lrfx.allocate(r20, macs=target, allocator="lc", round_to=round_to)
    assert lc_plan.macs <= target
    try:
        plan, _ = lrfx.allocate(r20, macs=target, allocator=alloc, round_to=round_to)
    except lrfx.BudgetInfeasibleError:
        return  # refusing is acceptable; a plan over the budget is not
    assert plan.macs <= target


def test_global_sigma_rank_min_floor_never_exceeds_the_budget(r20: lrfx.Analysis) -> None:
    try:
        plan, _ = lrfx.allocate(r20, macs=0.1, allocator="global_sigma", scheme="channel")
    except lrfx.BudgetInfeasibleError as exc:
        assert re.search(r"rank_min|smallest reachable|at the lowest", str(exc))
        return
    assert plan.macs <= 0.1 * r20.total_macs
