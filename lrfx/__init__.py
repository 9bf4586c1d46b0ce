"""lrfx: low-rank compression of PyTorch models as graph-rewriting passes on torch.fx.

The public API lives here; everything else is an implementation module.

Example:
    >>> import torch, torchvision, lrfx
    >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    >>> a.total_macs
    1814073344
"""

from lrfx.analysis import Analysis, LayerRecord, analyze, count_macs, run_analysis
from lrfx.compress import CompressionReport, allocate, compress, recalibrate_bn
from lrfx.cost import ConvGeometry, Cost, LinearGeometry, dense_cost, factored_cost
from lrfx.errors import (
    BudgetInfeasibleError,
    LrfxError,
    PassError,
    PipelineError,
    PlanMismatchError,
    ShapeError,
    TraceError,
    UnsupportedLayerError,
)
from lrfx.facts import GraphFacts, LayerFacts, NodeFacts, Spectrum
from lrfx.io import export, load, save
from lrfx.pipeline import GraphPass, PassContext, Pipeline, graph_pass
from lrfx.plan import LayerPlan, RankPlan
from lrfx.rewriting import apply
from lrfx.tracing import trace

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BudgetInfeasibleError",
    "ConvGeometry",
    "CompressionReport",
    "Cost",
    "GraphFacts",
    "GraphPass",
    "LayerFacts",
    "LayerPlan",
    "LayerRecord",
    "LinearGeometry",
    "LrfxError",
    "NodeFacts",
    "PassContext",
    "PassError",
    "Pipeline",
    "PipelineError",
    "PlanMismatchError",
    "RankPlan",
    "ShapeError",
    "Spectrum",
    "TraceError",
    "UnsupportedLayerError",
    "__version__",
    "allocate",
    "analyze",
    "apply",
    "compress",
    "count_macs",
    "dense_cost",
    "export",
    "factored_cost",
    "graph_pass",
    "load",
    "recalibrate_bn",
    "run_analysis",
    "save",
    "trace",
]
