"""One call: analyze, allocate ranks for a budget, rewrite, recalibrate — ``lrfx.compress``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lrfx.analysis import Analysis, run_analysis
from lrfx.errors import LrfxError
from lrfx.facts import FrozenMap, get_graph_facts, set_graph_facts
from lrfx.pipeline import PassContext
from lrfx.plan import RankPlan
from lrfx.tracing import as_input_tuple, check_module, trace

__all__ = ["CompressionReport", "allocate", "compress", "recalibrate_bn"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (in place).

    The statistics are reset and recomputed as an exact average over the batches (momentum
    ``None``); other layers stay in eval mode (no dropout), nothing else changes, and every
    module's training flag and momentum are restored afterwards.

    Returns:
        The number of BatchNorm layers recalibrated (0 if the model has none).

    Example:
        >>> import torch, torchvision
        >>> m = torchvision.models.resnet18()
        >>> recalibrate_bn(m, [torch.randn(4, 3, 64, 64) for _ in range(2)])
        20
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        n = 0
        with torch.no_grad():
            for batch in batches:
                model(*as_input_tuple(batch, "batches"))
                n += 1
        if n == 0:
            raise LrfxError("recalibrate_bn needs at least one batch")
    finally:
        for m, flag in flags:
            m.training = flag
        for bn, mom in momenta:
            bn.momentum = mom
    return len(bns)


@dataclass(frozen=True)
class CompressionReport:
    """Before/after figures of one compression (``gm.meta["lrfx"].extra["report"]``).

    Attributes:
        layers: Per factored layer: ``layer``, ``scheme``, ``rank``, ``macs_before``,
            ``macs_after``, ``params_before``, ``params_after``, ``error`` (relative squared
            error the allocator predicted: of the weight, or of the output when whitened).
        macs_before, macs_after, params_before, params_after: Model totals.
        budget: ``{"metric", "target", "fraction"}``.
        allocator, scheme, whitened: How the plan was made.
        seconds: Wall time of the whole call.
    """

    layers: tuple[Mapping[str, Any], ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    budget: Mapping[str, Any] = field(default_factory=dict)
    allocator: str = ""
    scheme: str = ""
    whitened: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator,
            "scheme": self.scheme,
            "whitened": self.whitened,
            "budget": dict(self.budget),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": self.seconds,
            "layers": [dict(x) for x in self.layers],
        }

    def table(self) -> str:
        """Per-layer lines and a totals line, as plain text."""
        cols = ["layer", "scheme", "rank", "MACs before", "MACs after", "error"]
        rows = [[str(x["layer"]), str(x["scheme"]), str(x["rank"]), f"{x['macs_before']:,}",
                 f"{x['macs_after']:,}", f"{x['error']:.4f}"] for x in self.layers]
        width = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

        def line(r: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(r, width, strict=True)))

        out = [line(cols)] + [line(r) for r in rows]
        ratio = self.macs_after / self.macs_before if self.macs_before else 1.0
        out.append(
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({ratio:.3f}x); params "
            f"{self.params_before:,} -> {self.params_after:,}; {len(self.layers)} layers "
            f"factored ({self.allocator}, scheme {self.scheme}"
            f"{', whitened' if self.whitened else ''}) in {self.seconds:.1f} s"
        )
        return "\n".join(out)


def allocate(
    analysis: Analysis,
    *,
    macs: float | int | None = None,
    params: float | int | None = None,
    allocator: str = "lc",
    scheme: str = "auto",
    round_to: int | None = None,
    spectra: Mapping[str, Mapping[str, Any]] | None = None,
    **settings: Any,
) -> tuple[RankPlan, dict[str, float]]:
    """Choose ranks for a budget from an analysis (pure: no model is touched).

    Args:
        analysis: From :func:`lrfx.analyze` (with spectra).
        macs, params: The budget: a fraction of the model's total in (0, 1], or an absolute count.
        allocator: ``lc``, ``energy``, ``global_sigma`` or ``uniform``.
        scheme: ``auto`` or one of ``channel``, ``spatial``, ``tucker2`` (Linear layers use svd).
        round_to: Round ranks to multiples of this.
        spectra: Per layer spectra to use instead of the analysis's (whitened ones).
        settings: Allocator settings (``rank_min`` for global_sigma...).

    Returns:
        The plan, resolved (weight shapes and predicted MACs/params filled in), and the
        predicted relative error of each factored layer.

    Raises:
        BudgetInfeasibleError: Even the cheapest plan exceeds the budget (says the minimum).

    Example:
        >>> import torch, torchvision, lrfx
        >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> plan, errors = lrfx.allocate(a, macs=0.5)
        >>> plan.macs <= 0.5 * a.total_macs
        True
    """
    from lrfx.passes.allocation import (
        ALLOCATORS,
        build_options,
        fill_budget,
        make_budget,
        prefer_best_scheme,
        to_plan,
    )

    if allocator not in ALLOCATORS:
        raise LrfxError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    budget = make_budget(macs, params, analysis.total_macs, analysis.total_params)
    options = build_options(analysis.layers, metric=budget.metric, schemes=scheme,
                            round_to=round_to, spectra=spectra)
    fixed = budget.total - sum(o.dense.cost for o in options)
    choice, used = ALLOCATORS[allocator](options, budget, fixed, **settings)
    if scheme == "auto" and allocator != "lc":
        choice = prefer_best_scheme(choice, options)
    choice = fill_budget(choice, options, fixed, budget)
    used.update(metric=budget.metric, target=budget.target, fraction=budget.fraction,
                scheme=scheme, round_to=round_to, whitened=spectra is not None)
    plan = to_plan(choice, allocator, used).resolve(analysis)
    errors = {name: c.error for name, c in choice.items() if c.scheme != "dense"}
    return plan, errors


def compress(
    model: nn.Module,
    example_inputs: Any,
    *,
    macs: float | int | None = None,
    params: float | int | None = None,
    allocator: str = "lc",
    scheme: str = "auto",
    calibration: Iterable[Any] | None = None,
    round_to: int | None = None,
    recalibrate: bool = True,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    progress: bool = False,
    **settings: Any,
) -> fx.GraphModule:
    """Compress ``model`` to a MACs or parameter budget in one call.

    Traces the model (a copy: the caller's model is never modified), computes spectra (whitened
    by the calibration data when given), allocates ranks for the budget, rewrites the graph and,
    with calibration data, re-estimates BatchNorm statistics.

    Args:
        model: The model.
        example_inputs: A tensor or tuple of positional inputs (shapes for MACs).
        macs, params: The budget (exactly one): a fraction in (0, 1] or an absolute count.
        allocator: ``lc`` (default), ``energy``, ``global_sigma`` or ``uniform``.
        scheme: ``auto`` (per layer, the scheme with the lowest error for the cost) or one of
            ``channel``, ``spatial``, ``tucker2``; Linear layers always use ``svd``.
        calibration: A few batches (tensors or tuples of inputs) for data-aware (whitened)
            factorization and BN recalibration.
        round_to: Round ranks to multiples of this (e.g. 8 for SIMD-friendly shapes).
        recalibrate: Re-estimate BN statistics on the calibration data (when given).
        leaf_modules: Module types or names to keep as leaves while tracing.
        progress: Show progress bars.
        settings: Allocator settings, e.g. ``rank_min=5`` for ``global_sigma``.

    Returns:
        The compressed graph module; ``gm.meta["lrfx"].extra`` holds ``plan`` and ``report``
        (a :class:`CompressionReport`).

    Raises:
        LrfxError: Bad budget (none or both, zero, negative, fraction above 1).
        BudgetInfeasibleError: The budget is below the smallest reachable cost.
        ShapeError: A calibration batch does not fit the model (names the node).

    Example:
        >>> import torch, torchvision, lrfx
        >>> gm = lrfx.compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                    macs=0.5)
        >>> gm.meta["lrfx"].extra["report"].macs_after <= 0.5 * 1814073344
        True
    """
    from lrfx.passes.analysis.activations import collect_input_stats, whitened_spectra
    from lrfx.passes.rewrite import factorize

    t0 = time.perf_counter()
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, leaf_modules=leaf_modules)
    before = run_analysis(gm, inputs, spectra=True, progress=progress)
    batches = None if calibration is None else list(calibration)
    spectra = whitening = None
    if batches is not None:
        stats = collect_input_stats(gm, PassContext(options={"calibration": batches}))
        spectra, whitening = whitened_spectra(gm, before.layers, stats)
    if not before.factorable:
        log.warning("%s has no layer lrfx can factor; returning an equivalent graph",
                    type(model).__name__)
    plan, errors = allocate(before, macs=macs, params=params, allocator=allocator,
                            scheme=scheme, round_to=round_to, spectra=spectra, **settings)
    factorize(gm, PassContext(options={"plan": plan, "whitening": whitening or {}}))
    if batches is not None and recalibrate:
        recalibrate_bn(gm, batches)
    after = run_analysis(gm, inputs, spectra=False)
    report = _report(before, after, plan, errors, allocator, scheme, spectra is not None,
                     time.perf_counter() - t0)
    facts = get_graph_facts(gm)
    extra = dict(facts.extra)
    extra.update(plan=plan, report=report, macs_before=before.total_macs,
                 macs_after=after.total_macs, input_shapes=tuple(tuple(x.shape) for x in inputs))
    extra.pop("input_stats", None)  # large; not needed once the graph is rewritten
    set_graph_facts(gm, facts.replace(extra=FrozenMap(extra)))
    return gm


def _report(before: Analysis, after: Analysis, plan: RankPlan, errors: Mapping[str, float],
            allocator: str, scheme: str, whitened: bool, seconds: float) -> CompressionReport:
    from lrfx.rewriting import layer_report

    rows = []
    for row in layer_report(before, after, plan):
        row["error"] = errors.get(row["layer"], 0.0)
        rows.append(row)
    return CompressionReport(
        layers=tuple(rows),
        macs_before=before.total_macs,
        macs_after=after.total_macs,
        params_before=before.total_params,
        params_after=int(plan.params or 0),
        budget={k: plan.settings.get(k) for k in ("metric", "target", "fraction")},
        allocator=allocator,
        scheme=scheme,
        whitened=whitened,
        seconds=seconds,
    )
