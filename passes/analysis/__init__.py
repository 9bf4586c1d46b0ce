"""Analysis passes: read the graph, write typed facts, never change the graph."""

from lrfx.passes.analysis.costs import annotate_costs
from lrfx.passes.analysis.shapes import propagate_shapes
from lrfx.passes.analysis.spectra import compute_spectra

__all__ = ["annotate_costs", "compute_spectra", "propagate_shapes"]
