"""Rewrite passes: consume a plan and change the graph; they never decide ranks.

:func:`refit_factors` belongs here although it changes nothing: it chooses the factors of a
plan's layers (on calibration data) for :func:`factorize` to build.
"""

from lrfx.passes.rewrite.factorize import FactorizeOptions, RewriteRecord, factorize
from lrfx.passes.rewrite.gates import fold_gates, insert_gates, sync_ranks
from lrfx.passes.rewrite.prune import PruneOptions, PruneRecord, group_masks, prune_channels
from lrfx.passes.rewrite.refit import Refit, RefitOptions, estimate_memory, refit_factors

__all__ = ["FactorizeOptions", "PruneOptions", "PruneRecord", "Refit", "RefitOptions",
           "RewriteRecord", "estimate_memory", "factorize", "fold_gates", "group_masks",
           "insert_gates", "prune_channels", "refit_factors", "sync_ranks"]
