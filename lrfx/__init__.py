"""lrfx: low-rank compression of PyTorch models as graph-rewriting passes on torch.fx.

The public API lives here; everything else is an implementation module. Names are imported on
first use, so ``import lrfx.plan`` (say) loads the core it needs and nothing above it.

Layers, bottom to top (a test keeps the rule):

* **core** — ``errors``, ``cost``, ``decompositions``, ``schemes``, ``modules``, ``facts``,
  ``plan``, ``pipeline``, ``report``, ``analysis``, ``tracing``, ``io``, ``progress``,
  ``config``, ``batches``, ``training``: never imports the passes;
* **passes** — ``lrfx.passes.analysis``, ``.allocation``, ``.rewrite``: import the core;
* **API, tools** — ``lrfx.api`` (analyze, allocate, apply, compress, load), ``lrfx.methods``
  (training-time methods: TRP...), ``lrfx.cli``, ``lrfx.contrib``: import both.

Example:
    >>> import torch, torchvision, lrfx
    >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    >>> a.total_macs
    1814073344
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lrfx._version import __version__

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from lrfx.analysis import Analysis, LayerRecord
    from lrfx.api import (
        add_rank_gates,
        allocate,
        analyze,
        apply,
        channel_groups,
        channel_plan,
        compress,
        count_macs,
        fold_gates,
        load,
        profile_latency,
        recalibrate_bn,
        run_analysis,
        validate_plan,
    )
    from lrfx.config import CompressConfig
    from lrfx.cost import ConvGeometry, Cost, LinearGeometry, dense_cost
    from lrfx.errors import (
        BudgetInfeasibleError,
        LrfxError,
        PassError,
        PipelineError,
        PlanMismatchError,
        SchemeError,
        ShapeError,
        TraceError,
        UnsupportedLayerError,
    )
    from lrfx.facts import GraphFacts, LayerFacts, NodeFacts, Spectrum, facts_of
    from lrfx.inputs import Inputs
    from lrfx.io import export, save
    from lrfx.latency import LatencyModel, LatencyProfile
    from lrfx.layers import LinearLike, register_linear_like
    from lrfx.methods import LC, TRP, DecomposableNet, Penalty, ProductDecay, Slimming
    from lrfx.pipeline import (
        GraphPass,
        PassContext,
        Pipeline,
        graph_pass,
        invalidate,
        mark_weights_changed,
    )
    from lrfx.plan import ChannelPlan, LayerPlan, PlanEntry, RankPlan
    from lrfx.report import CompressionReport, RewriteRecord
    from lrfx.schemes import Scheme, factored_cost, get_scheme, register_scheme, scheme_names
    from lrfx.tracing import trace
    from lrfx.training import Evaluation, FitResult, evaluate, fit

_EXPORTS: dict[str, str] = {
    "Analysis": "lrfx.analysis",
    "LayerRecord": "lrfx.analysis",
    "add_rank_gates": "lrfx.api",
    "allocate": "lrfx.api",
    "analyze": "lrfx.api",
    "apply": "lrfx.api",
    "channel_groups": "lrfx.api",
    "channel_plan": "lrfx.api",
    "compress": "lrfx.api",
    "count_macs": "lrfx.api",
    "fold_gates": "lrfx.api",
    "load": "lrfx.api",
    "profile_latency": "lrfx.api",
    "recalibrate_bn": "lrfx.api",
    "run_analysis": "lrfx.api",
    "validate_plan": "lrfx.api",
    "CompressConfig": "lrfx.config",
    "ConvGeometry": "lrfx.cost",
    "Cost": "lrfx.cost",
    "LinearGeometry": "lrfx.cost",
    "dense_cost": "lrfx.cost",
    "BudgetInfeasibleError": "lrfx.errors",
    "LrfxError": "lrfx.errors",
    "PassError": "lrfx.errors",
    "PipelineError": "lrfx.errors",
    "PlanMismatchError": "lrfx.errors",
    "SchemeError": "lrfx.errors",
    "ShapeError": "lrfx.errors",
    "TraceError": "lrfx.errors",
    "UnsupportedLayerError": "lrfx.errors",
    "GraphFacts": "lrfx.facts",
    "LayerFacts": "lrfx.facts",
    "NodeFacts": "lrfx.facts",
    "Spectrum": "lrfx.facts",
    "facts_of": "lrfx.facts",
    "Inputs": "lrfx.inputs",
    "LatencyModel": "lrfx.latency",
    "LatencyProfile": "lrfx.latency",
    "DecomposableNet": "lrfx.methods",
    "LC": "lrfx.methods",
    "Penalty": "lrfx.methods",
    "ProductDecay": "lrfx.methods",
    "Slimming": "lrfx.methods",
    "TRP": "lrfx.methods",
    "LinearLike": "lrfx.layers",
    "register_linear_like": "lrfx.layers",
    "export": "lrfx.io",
    "save": "lrfx.io",
    "GraphPass": "lrfx.pipeline",
    "PassContext": "lrfx.pipeline",
    "Pipeline": "lrfx.pipeline",
    "graph_pass": "lrfx.pipeline",
    "invalidate": "lrfx.pipeline",
    "mark_weights_changed": "lrfx.pipeline",
    "ChannelPlan": "lrfx.plan",
    "LayerPlan": "lrfx.plan",
    "PlanEntry": "lrfx.plan",
    "RankPlan": "lrfx.plan",
    "CompressionReport": "lrfx.report",
    "RewriteRecord": "lrfx.report",
    "Scheme": "lrfx.schemes",
    "factored_cost": "lrfx.schemes",
    "get_scheme": "lrfx.schemes",
    "register_scheme": "lrfx.schemes",
    "scheme_names": "lrfx.schemes",
    "trace": "lrfx.tracing",
    "Evaluation": "lrfx.training",
    "FitResult": "lrfx.training",
    "evaluate": "lrfx.training",
    "fit": "lrfx.training",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lrfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
