"""Allocation passes: turn facts into a RankPlan; pure functions of the facts and the budget."""

from lrfx.passes.allocation.allocators import (
    ALLOCATORS,
    allocate_energy,
    allocate_global_sigma,
    allocate_lc,
    allocate_uniform,
    fill_budget,
    prefer_best_scheme,
    to_plan,
)
from lrfx.passes.allocation.candidates import (
    AUTO_SCHEMES,
    Budget,
    Candidate,
    LayerOptions,
    allocatable_schemes,
    build_options,
    check_budget,
    check_reachable,
    cost_of,
    latency_options,
    make_budget,
    resolve_schemes,
)

__all__ = [
    "ALLOCATORS",
    "AUTO_SCHEMES",
    "Budget",
    "Candidate",
    "LayerOptions",
    "allocatable_schemes",
    "allocate_energy",
    "allocate_global_sigma",
    "allocate_lc",
    "allocate_uniform",
    "build_options",
    "check_budget",
    "latency_options",
    "check_reachable",
    "cost_of",
    "fill_budget",
    "make_budget",
    "prefer_best_scheme",
    "resolve_schemes",
    "to_plan",
]
