"""Analysis passes: read the graph, write typed facts, never change the graph."""

from lrfx.passes.analysis.activations import CalibrationOptions, collect_input_stats
from lrfx.passes.analysis.channels import ChannelGroup, ChannelGroups, Member, find_channel_groups
from lrfx.passes.analysis.costs import annotate_costs
from lrfx.passes.analysis.latency import LayerLatency, measure_layers
from lrfx.passes.analysis.sensitivity import (
    SensitivityOptions,
    SlopeOptions,
    layer_sensitivity,
    measure_slopes,
)
from lrfx.passes.analysis.shapes import propagate_shapes
from lrfx.passes.analysis.spectra import SpectraOptions, compute_spectra

__all__ = [
    "CalibrationOptions",
    "ChannelGroup",
    "ChannelGroups",
    "LayerLatency",
    "Member",
    "SensitivityOptions",
    "SlopeOptions",
    "SpectraOptions",
    "annotate_costs",
    "collect_input_stats",
    "compute_spectra",
    "find_channel_groups",
    "layer_sensitivity",
    "measure_layers",
    "measure_slopes",
    "propagate_shapes",
]
