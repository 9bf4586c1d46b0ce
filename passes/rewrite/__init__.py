"""Rewrite passes: consume a plan and change the graph; they never decide ranks."""

from lrfx.passes.rewrite.factorize import FactorizeOptions, RewriteRecord, factorize

__all__ = ["FactorizeOptions", "RewriteRecord", "factorize"]
