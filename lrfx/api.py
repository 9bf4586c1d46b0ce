"""The public entry points: ``analyze``, ``allocate``, ``apply``, ``compress``, ``load``.

Each is a short composition of passes into a :class:`~lrfx.Pipeline` over a traced copy of the
user's model (the model itself is never modified):

=========  ============================================================================
analyze    trace -> propagate_shapes -> annotate_costs -> compute_spectra
allocate   (no model) layer options -> allocator -> fill the budget -> resolved plan
apply      trace -> propagate_shapes -> annotate_costs -> resolve plan
           [-> find_channel_groups -> prune_channels -> analyze again] -> factorize
compress   trace -> propagate_shapes -> annotate_costs [-> collect_input_stats]
           -> compute_spectra (with singular vectors, data-aware with calibration)
           -> allocate -> factorize (factors from the stored vectors) [-> recalibrate BN]
load       trace -> propagate_shapes -> annotate_costs -> factorize (shapes only) -> weights
=========  ============================================================================

With ``latency=``, ``compress`` times the dense model, times each layer's dense and factored
forms (:mod:`lrfx.passes.analysis.latency`, cached), allocates on those times (only forms faster
than dense), then applies and times the plan against the dense model, re-allocating while it
misses the budget. ``profile_latency`` shows where a dense model's time goes.

The figures after a rewrite (MACs, parameters) come from the plan and the cost model; the
rewritten graph is not analyzed again.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from lrfx.analysis import Analysis
from lrfx.batches import model_inputs, take_batches
from lrfx.config import SEQUENTIAL_MEMORY, CompressConfig
from lrfx.cost import ConvGeometry, LinearGeometry
from lrfx.decompositions import Spectrum, check_finite
from lrfx.errors import BudgetInfeasibleError, LrfxError, UnsupportedLayerError
from lrfx.facts import (
    attach_facts,
    get_graph_facts,
    get_node_facts,
    update_graph_facts,
)
from lrfx.inputs import Inputs
from lrfx.io import PLAN_FILE, WEIGHTS_FILE, verify_saved
from lrfx.latency import LatencyModel, LatencyProfile, Probe
from lrfx.modules import Factored, Gate
from lrfx.passes.allocation import (
    ALLOCATORS,
    build_options,
    check_budget,
    fill_budget,
    latency_options,
    make_budget,
    prefer_best_scheme,
    resolve_schemes,
    to_plan,
)
from lrfx.passes.allocation.channels import allocate_channels, per_channel_params, scale_scores
from lrfx.passes.analysis import (
    CalibrationOptions,
    SensitivityOptions,
    SlopeOptions,
    SpectraOptions,
    annotate_costs,
    collect_input_stats,
    compute_spectra,
    layer_sensitivity,
    measure_slopes,
    propagate_shapes,
)
from lrfx.passes.analysis.channels import ChannelGroups, find_channel_groups
from lrfx.passes.analysis.latency import LayerLatency, measure_layers
from lrfx.passes.analysis.spectra import layer_weight
from lrfx.passes.rewrite import (
    FactorizeOptions,
    Refit,
    RefitOptions,
    estimate_memory,
    factorize,
    refit_factors,
)
from lrfx.passes.rewrite.gates import fold_gates as fold_gates_pass
from lrfx.passes.rewrite.gates import insert_gates
from lrfx.passes.rewrite.prune import PruneOptions, PruneRecord, prune_channels
from lrfx.pipeline import GraphPass, PassContext, Pipeline
from lrfx.plan import ChannelPlan, LayerPlan, RankPlan
from lrfx.progress import step
from lrfx.report import CompressionReport, RewriteRecord
from lrfx.tracing import call_inputs, capture, check_module, copy_model, eval_mode

__all__ = [
    "allocate",
    "analyze",
    "apply",
    "as_plan",
    "add_rank_gates",
    "channel_groups",
    "channel_plan",
    "compress",
    "count_macs",
    "fold_gates",
    "load",
    "profile_latency",
    "recalibrate_bn",
    "run_analysis",
    "validate_plan",
]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- analysis -------------------------------------------------------------------------------------


def _analysis_passes(spectra: bool) -> list[GraphPass[Any]]:
    passes: list[GraphPass[Any]] = [propagate_shapes, annotate_costs]
    if spectra:
        passes.append(compute_spectra)
    return passes


def run_analysis(
    gm: fx.GraphModule, example_inputs: Any, *, spectra: bool = True, progress: bool = False
) -> Analysis:
    """Run the analysis passes on an already traced graph module; returns the :class:`Analysis`.

    Example:
        >>> import torch, torchvision, lrfx
        >>> gm = lrfx.trace(torchvision.models.resnet18())
        >>> lrfx.run_analysis(gm, torch.randn(1, 3, 224, 224), spectra=False).total_macs
        1814073344
    """
    ctx = PassContext(example_inputs=_feed(gm, example_inputs), progress=progress)
    Pipeline(_analysis_passes(spectra)).run(gm, ctx)
    return Analysis.from_graph(gm)


def _feed(gm: fx.GraphModule, example_inputs: Any) -> tuple[Any, ...]:
    """The graph's positional arguments for inputs in any accepted form."""
    return get_graph_facts(gm).input_spec.feed(Inputs.of(example_inputs))


def _result(gm: fx.GraphModule) -> nn.Module:
    """What a rewrite returns: the graph module (FX mode), or the model copy the layers were
    substituted into (module mode), carrying the same facts."""
    facts = get_graph_facts(gm)
    root = facts.capture.root
    if facts.capture.mode != "module" or root is None:
        return gm
    attach_facts(root, facts.replace(capture=dataclasses.replace(facts.capture, root=None)))
    return root


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    spectra: bool = True,
    progress: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    mode: str = "auto",
) -> Analysis:
    """Trace ``model`` and report per-layer MACs, parameters and singular-value spectra.

    Args:
        model: Any ``nn.Module``; it is not modified.
        example_inputs: A tensor, a tuple of positional inputs, a mapping of keyword inputs, or
            ``(args, kwargs)``.
        spectra: Also compute the singular values of every factorable layer.
        progress: Show a progress bar while computing spectra.
        leaf_modules: Module types or qualified names to keep as leaves.
        mode: How to capture the model: ``auto``, ``fx`` or ``module`` (see
            :func:`lrfx.tracing.capture`).

    Returns:
        An :class:`Analysis`; ``print(a.table())`` shows it, ``a.to_json()`` serializes it.

    Example:
        >>> import torch, torchvision, lrfx
        >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> a["layer1.0.conv1"].rank_at_energy("channel", 0.9) <= 64
        True
    """
    check_module(model)
    gm = capture(model, example_inputs, leaf_modules=leaf_modules, mode=mode)
    return run_analysis(gm, example_inputs, spectra=spectra, progress=progress)


def profile_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency_model: LatencyModel | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    mode: str = "auto",
) -> LatencyProfile:
    """Where the time goes: the model's measured latency and each conv/linear layer's share.

    The model runs whole (interleaved medians, :func:`lrfx.latency.time_models`); each layer is
    timed alone at its calls' input shapes through ``latency_model`` (default: the model's
    device and dtype, cached on disk). Layers with a low ``gmacs_per_s`` are the ones whose
    MACs are cheap to cut and expensive to run.

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        >>> p = lrfx.profile_latency(net, torch.randn(8, 64))
        >>> [x["layer"] for x in p.layers], p.model_ms > 0
        (['0'], True)
    """
    check_module(model)
    a = analyze(model, example_inputs, spectra=False, leaf_modules=leaf_modules, mode=mode)
    lm = latency_model or _latency_model(model)
    model_s = lm.time_models({"model": model}, example_inputs)["model"]
    rows = []
    for rec in a.layers:
        calls = [g for g in rec.calls if not getattr(g, "transposed", False)]
        if not calls or rec.kind not in ("linear", *(f"conv{d}d" for d in (1, 2, 3))):
            continue
        ms = 1e3 * sum(lm.measure([Probe(g) for g in calls]))
        rows.append({"layer": rec.name, "kind": rec.kind, "macs": rec.macs, "ms": ms,
                     "share": ms / (1e3 * model_s), "gmacs_per_s": rec.macs / max(ms, 1e-9) / 1e6})
    return LatencyProfile(model_s * 1e3, tuple(rows), Inputs.of(example_inputs).describe(),
                          torch.get_num_threads(), lm.environment)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Total multiply-accumulates of ``model`` at the given input (conv, linear, matmul-like).

    Example:
        >>> import torch, torchvision, lrfx
        >>> lrfx.count_macs(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        1814073344
    """
    return analyze(model, example_inputs, spectra=False).total_macs


# --- allocation -----------------------------------------------------------------------------------


def _allocator_settings(allocator: str) -> dict[str, inspect.Parameter]:
    """The settings an allocator takes (its parameters after options, budget and fixed)."""
    params = list(inspect.signature(ALLOCATORS[allocator]).parameters.values())[3:]
    return {p.name: p for p in params}


#: Arguments of compress/allocate that are not allocator settings (for did-you-mean hints).
_CALL_ARGUMENTS = ("macs", "params", "allocator", "scheme", "calibration", "round_to",
                   "recalibrate", "leaf_modules", "progress", "precision", "mode", "spectra")


def _check_settings(allocator: str, round_to: Any, settings: Mapping[str, Any]) -> None:
    """Validate ``round_to`` and the allocator's settings before any work is done.

    Raises:
        LrfxError: ``round_to`` is not a positive integer; a setting the allocator does not take
            (the valid ones named, the closest suggested); a setting of the wrong type or range.
    """
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                 or round_to < 1):
        raise LrfxError(f"round_to must be a positive integer (e.g. 8), got {round_to!r}")
    accepted = _allocator_settings(allocator)
    for key, value in settings.items():
        if key not in accepted:
            everywhere = sorted({*_CALL_ARGUMENTS,
                                 *(k for a in ALLOCATORS for k in _allocator_settings(a))})
            close = difflib.get_close_matches(key, everywhere, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            others = [a for a in ALLOCATORS if key in _allocator_settings(a)]
            if others:
                hint = f"; {key!r} is a setting of allocator={others[0]!r}"
            takes = ", ".join(accepted) or "no settings"
            raise LrfxError(f"unknown argument {key!r}{hint} (allocator {allocator!r} takes "
                            f"{takes})")
        default = accepted[key].default
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and not isinstance(default, bool):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise LrfxError(f"{key} must be a positive integer, got {value!r}")
        elif key == "energy" and not (number and 0 < value <= 1):
            raise LrfxError(f"energy must be a fraction in (0, 1], got {value!r}")
        elif key == "value" and value is not None and not (number and value >= 0):
            raise LrfxError(f"value must be a non-negative number (a singular-value "
                            f"threshold), got {value!r}")


def allocate(
    analysis: Analysis,
    config: CompressConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    macs: float | int | None = None,
    params: float | int | None = None,
    allocator: str | None = None,
    scheme: str | None = None,
    round_to: int | None = None,
    exclude: Sequence[Any] | None = None,
    min_rank: int | Mapping[str, int] | None = None,
    max_rank: int | Mapping[str, int] | None = None,
    max_error: float | Mapping[str, float] | None = None,
    spectra: Mapping[str, Mapping[str, Spectrum]] | None = None,
    **settings: Any,
) -> tuple[RankPlan, dict[str, float]]:
    """Choose ranks for a budget from an analysis (pure: no model is touched).

    Args:
        analysis: From :func:`lrfx.analyze` (with spectra).
        config: A :class:`lrfx.CompressConfig` (or its dict, or a JSON file); the keyword
            arguments below override its fields.
        macs, params: The budget: a fraction of the model's total in (0, 1], or an absolute count.
        allocator: ``lc`` (default), ``energy``, ``global_sigma`` or ``uniform``.
        scheme: ``auto`` or one of ``channel``, ``spatial``, ``tucker2`` (Linear layers use svd).
        round_to: Round ranks to multiples of this.
        exclude, min_rank, max_rank, max_error: Layers left dense and per-layer bounds (see
            :class:`lrfx.CompressConfig`).
        spectra: Per layer spectra to use instead of the analysis's (whitened ones).
        settings: Allocator settings (``rank_min`` for global_sigma...).

    Returns:
        The plan, resolved (weight shapes and predicted MACs/params filled in; the config in
        ``plan.settings["config"]``), and the predicted relative error of each factored layer.

    Raises:
        BudgetInfeasibleError: Even the cheapest plan exceeds the budget (says the minimum).

    Example:
        >>> import torch, torchvision, lrfx
        >>> a = lrfx.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> plan, errors = lrfx.allocate(a, macs=0.5, exclude=["fc"])
        >>> plan.macs <= 0.5 * a.total_macs, "fc" in plan.factored
        (True, False)
    """
    cfg = _config(config, settings, macs=macs, params=params, allocator=allocator,
                  scheme=scheme, round_to=round_to, exclude=exclude, min_rank=min_rank,
                  max_rank=max_rank, max_error=max_error)
    result = _allocate(analysis, cfg, spectra)
    return result.plan, result.errors


def _config(config: Any, settings: Mapping[str, Any], **overrides: Any) -> CompressConfig:
    """The call's config: ``config`` with the keyword arguments given, settings merged."""
    cfg = CompressConfig.of(config, **overrides)
    if settings:
        cfg = cfg.replace(settings={**cfg.settings, **settings})
    _check_settings(cfg.allocator, cfg.round_to, cfg.settings)
    resolve_schemes(cfg.scheme)
    return cfg


@dataclasses.dataclass(frozen=True)
class _Allocation:
    plan: RankPlan
    errors: dict[str, float]
    curves: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    warnings: tuple[str, ...]
    #: With a latency budget: per layer ``(dense ms, planned ms)`` and the model's totals.
    latency: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Timing:
    """What a latency budget needs: the layer timer and the dense model's measured time, at the
    example inputs' batch size and at every other batch size of ``latency_batch_sizes``."""

    model: LatencyModel
    dense_seconds: float
    progress: bool = False
    layers: dict[str, LayerLatency] = dataclasses.field(default_factory=dict)
    #: The lowest budget fraction reachable: every layer in its fastest measured form.
    floor: float = 0.0
    #: The example inputs' batch size.
    batch: int = 1
    #: Other batch sizes: ``{b: (dense model seconds, inputs at b)}``.
    extra: dict[int, tuple[float, Any]] = dataclasses.field(default_factory=dict)
    #: Layer times at the other batch sizes.
    extra_layers: dict[int, dict[str, LayerLatency]] = dataclasses.field(default_factory=dict)


def _at_batch(g: Any, factor: float) -> Any:
    """A layer geometry at another batch size (rows of a Linear scale with the batch)."""
    if isinstance(g, LinearGeometry):
        return dataclasses.replace(g, rows=max(1, round(g.rows * factor)))
    return dataclasses.replace(g, batch=max(1, round(g.batch * factor)))


def _batched(example_inputs: Any, batch: int) -> tuple[int, Inputs]:
    """``(the example's batch size, the inputs at batch)``: every tensor input cycled or cut
    along its first dimension, which must be the batch."""
    inputs = Inputs.of(example_inputs)
    sizes = {t.shape[0] for t in inputs.tensors() if t.dim() >= 1}
    if len(sizes) != 1:
        raise LrfxError(f"latency_batch_sizes resizes the example inputs along their first "
                        f"dimension, which must be the batch in every tensor; got shapes "
                        f"{inputs.describe()}")
    (b0,) = sizes
    idx = torch.arange(batch) % b0
    return b0, inputs.map_tensors(lambda t: t[idx.to(t.device)] if t.dim() >= 1 else t)


def _measure(options: Sequence[Any], analysis: Analysis, timing: _Timing) -> None:
    """Time every layer not yet timed, at the example's batch size and each other one."""
    todo = [o for o in options if o.name not in timing.layers]
    timing.layers.update(measure_layers(
        todo, {o.name: analysis[o.name].calls for o in todo}, timing.model,
        progress=timing.progress))
    for b in timing.extra:
        have = timing.extra_layers.setdefault(b, {})
        todo = [o for o in options if o.name not in have]
        f = b / timing.batch
        have.update(measure_layers(
            todo, {o.name: [_at_batch(g, f) for g in analysis[o.name].calls] for o in todo},
            timing.model, progress=timing.progress))


def _allocate(analysis: Analysis, cfg: CompressConfig,
              spectra: Mapping[str, Mapping[str, Spectrum]] | None = None,
              weights: Mapping[str, float] | None = None,
              timing: _Timing | None = None) -> _Allocation:
    """Allocation with everything the report needs: curves, layers left dense, warnings.
    ``weights``: loss-aware per-layer weights of the errors (the report keeps the unweighted
    errors). ``timing``: the measurements a latency budget allocates on."""
    check_budget(cfg.macs, cfg.params, cfg.latency)
    rules = cfg.rules()
    notes = [*rules.check_against([r.name for r in analysis.factorable],
                                  lambda n: analysis[n].types)]
    skipped: dict[str, str] = {}
    options = build_options(analysis.layers,
                            metric="params" if cfg.params is not None else "macs",
                            schemes=cfg.scheme, round_to=cfg.round_to, spectra=spectra,
                            rules=rules, skipped=skipped)
    if cfg.latency is not None:
        if timing is None:
            raise LrfxError("a latency budget is allocated on times measured on the model: use "
                            "lrfx.compress(model, inputs, latency=...) (allocate() only knows "
                            "the analysis)")
        _measure(options, analysis, timing)
        others = [(timing.extra_layers[b], t / timing.dense_seconds)
                  for b, (t, _) in timing.extra.items()]
        options, slower = latency_options(options, timing.layers, others=others)
        where = "" if not others else " at every batch size ({})".format(
            ", ".join(str(b) for b in sorted([timing.batch, *timing.extra])))
        skipped.update({k: f"latency: {v}{where}" for k, v in slower.items()})
        dense_sum = sum(int(o.cost[0]) for o in options)
        measured = round(timing.dense_seconds * 1e9)
        if measured < dense_sum:
            log.info("the factorable layers timed alone (%.3f ms) take longer than the whole "
                     "model (%.3f ms); the latency budget is taken of their sum",
                     dense_sum / 1e6, measured / 1e6)
        total_ns = max(measured, dense_sum)
        budget = make_budget(None, None, 0, 0, latency=cfg.latency, total_latency=total_ns)
        fastest = total_ns - dense_sum + sum(int(o.cost.min()) for o in options)
        timing.floor = fastest / total_ns
        if fastest > budget.target:
            raise BudgetInfeasibleError(
                f"latency={cfg.latency} cannot be met on this machine at these input shapes: "
                f"with every layer in its fastest measured form the model is predicted at "
                f"{fastest / 1e6:.3f} ms, {fastest / total_ns:.3f} of the dense "
                f"{total_ns / 1e6:.3f} ms ({len(slower)} of {len(options)} layers have no "
                "factored form faster than dense); raise the budget, or compress for the batch "
                "size you deploy at (larger batches gain more from factoring)")
    else:
        budget = make_budget(cfg.macs, cfg.params, analysis.total_macs, analysis.total_params)
    fixed = budget.total - sum(int(o.cost[0]) for o in options)
    if weights is not None:
        weighted = [o.weighted(weights.get(o.name, 1.0)) for o in options]
        choice, used = ALLOCATORS[cfg.allocator](weighted, budget, fixed, **cfg.settings)
        choice = {o.name: o.candidate(o.index_of(choice[o.name])) for o in options}
        used["sensitivity_weights"] = {k: float(f"{v:.4g}") for k, v in weights.items()}
    else:
        choice, used = ALLOCATORS[cfg.allocator](options, budget, fixed, **cfg.settings)
    if cfg.scheme == "auto" and cfg.allocator != "lc":
        choice = prefer_best_scheme(choice, options)
    choice = fill_budget(choice, options, fixed, budget)
    whitened = spectra is not None or any(
        sp.whitened for rec in analysis.factorable for sp in rec.spectra.values())
    used.update(metric=budget.metric, target=budget.target, fraction=budget.fraction,
                scheme=cfg.scheme, round_to=cfg.round_to, whitened=whitened,
                config=cfg.to_dict())
    latency: dict[str, Any] = {}
    if timing is not None and budget.metric == "latency":
        per_layer = {o.name: (o.cost[0] / 1e6, choice[o.name].cost / 1e6) for o in options}
        predicted = fixed + sum(c.cost for c in choice.values())
        latency = {"layers": per_layer, "dense_ms": timing.dense_seconds * 1e3,
                   "predicted_ms": predicted / 1e6, "predicted_ratio": predicted / budget.total,
                   "environment": timing.model.environment}
        used.update(latency_environment=timing.model.environment,
                    dense_latency_ms=round(timing.dense_seconds * 1e3, 4),
                    predicted_latency_ms=round(predicted / 1e6, 4))
    plan = to_plan(choice, cfg.allocator, used).resolve(analysis)
    errors = {name: c.error for name, c in choice.items() if c.scheme != "dense"}
    curves: dict[str, dict[str, Any]] = {}
    bounded = rules.active or cfg.round_to is not None
    for o in options:
        c = choice[o.name]
        if c.scheme == "dense" and o.name not in skipped:
            skipped[o.name] = (
                "no factored form is cheaper than dense"
                + (" within its rank bounds / error cap" if bounded else "")
                if len(o) == 1 else
                f"kept dense by the {cfg.allocator} allocator (no factored form paid off "
                "within the budget)")
            continue
        idx = o.scheme_indices(c.scheme)
        curves[o.name] = {"scheme": c.scheme,
                          "rank": [int(r) for r in o.main_ranks(idx)],
                          "error": [float(e) for e in o.error[idx]]}
    for rec in analysis.layers:
        if not rec.factorable and rec.params and rec.name not in skipped:
            skipped[rec.name] = f"not factorable: {rec.note}" if rec.note else "not factorable"
    if cfg.warn_error is not None:
        useless = []
        for name, c in choice.items():
            if c.scheme == "dense":
                continue
            top = analysis[name].max_rank(c.scheme)
            rank1 = (max(c.rank) if isinstance(c.rank, tuple) else c.rank) == 1 and (
                (max(top) if isinstance(top, tuple) else top) > 1)
            if c.error >= cfg.warn_error or rank1:
                useless.append(f"{name!r} ({c.scheme} rank {c.rank}, error {c.error:.3f})")
        if useless:
            notes.append(
                f"{len(useless)} layer(s) compressed to near-uselessness (rank 1, or predicted "
                f"error >= warn_error={cfg.warn_error}): {', '.join(useless)}; raise the budget, "
                "bound them with min_rank= / max_error=, or exclude= them")
    for note in notes:
        log.warning("%s", note)
    return _Allocation(plan, errors, curves, skipped, tuple(notes), latency)


# --- rewriting ------------------------------------------------------------------------------------


def as_plan(plan: Any) -> RankPlan:
    """Accept a :class:`RankPlan`, a path to its JSON, or a mapping of layer plans."""
    if isinstance(plan, RankPlan):
        return plan
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise LrfxError(f"plan file {str(path)!r} does not exist")
        return RankPlan.from_json(path.read_text())
    if isinstance(plan, Mapping):
        return RankPlan(plan)
    raise LrfxError(f"plan must be a lrfx.RankPlan, a path to its JSON, or a mapping of layer "
                    f"name to LayerPlan; got {type(plan).__name__}")


def _report(before: Analysis, plan: RankPlan, errors: Mapping[str, float] | None, *,
            allocator: str = "", scheme: str = "", whitened: bool = False,
            seconds: float = 0.0, allocation: _Allocation | None = None,
            config: CompressConfig | None = None, refit: Refit | None = None,
            latency: Mapping[str, Any] | None = None) -> CompressionReport:
    rows = []
    for name, lp in plan.factored.items():
        rec = before[name]
        rows.append({
            "layer": name,
            "scheme": lp.scheme,
            "rank": list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank,
            "macs_before": rec.macs,
            "macs_after": lp.macs,
            "params_before": rec.params,
            "params_after": lp.params,
            "error": None if errors is None else errors.get(name),
        })
        if refit is not None:
            rows[-1]["output_error"] = refit.errors.get(name)
            rows[-1]["fit"] = refit.methods.get(name)
        if latency and name in latency.get("layers", {}):
            before_ms, after_ms = latency["layers"][name]
            rows[-1]["latency_before_ms"] = before_ms
            rows[-1]["latency_after_ms"] = after_ms
    budget = {k: plan.settings[k] for k in ("metric", "target", "fraction") if k in plan.settings}
    return CompressionReport(
        mode=before.mode,
        mode_reason=before.mode_reason,
        leaves={leaf.name: leaf.reason for leaf in before.leaves},
        layers=tuple(rows),
        macs_before=before.total_macs,
        macs_after=int(plan.macs if plan.macs is not None else before.total_macs),
        params_before=before.total_params,
        params_after=int(plan.params if plan.params is not None else before.total_params),
        budget=budget,
        allocator=allocator,
        scheme=scheme,
        whitened=whitened,
        sequential=refit is not None,
        seconds=seconds,
        skipped={} if allocation is None else allocation.skipped,
        curves={} if allocation is None else allocation.curves,
        warnings=() if allocation is None else allocation.warnings,
        config={} if config is None else config.to_dict(),
        latency={k: v for k, v in (latency or {}).items() if k != "layers"},
    )


def _refresh_layers(gm: fx.GraphModule) -> None:
    """Re-annotate layer facts after a rewrite that kept the shapes valid (no forward pass)."""
    if "shapes" in get_graph_facts(gm).provided:
        annotate_costs(gm)


def _runner(gm: fx.GraphModule) -> Any:
    """How calibration batches run: through the model itself in module mode (the graph is
    specialized to the example), else through the graph (``None``)."""
    capture_info = get_graph_facts(gm).capture
    if capture_info.mode == "module" and capture_info.root is not None:
        root = capture_info.root
        return lambda batch: call_inputs(root, Inputs.of(batch, "calibration batch")).call(root)
    return None


def _check_weights(gm: fx.GraphModule, plan: RankPlan) -> None:
    """Refuse planned layers whose weights hold NaN/Inf before anything changes."""
    wanted = plan.factored
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            if layer.name in wanted:
                w = layer_weight(gm, layer)
                if w is not None:
                    check_finite(w, layer.name)


def _output_fits(shape: tuple[int, ...], g: Any) -> bool:
    """Whether a layer output of ``shape`` is what the dense layer of geometry ``g`` gives."""
    n = math.prod(shape)
    if isinstance(g, ConvGeometry):
        tail = (g.out_channels, *g.out_spatial)
        return tuple(shape[-len(tail):]) == tail and n == g.batch * math.prod(tail)
    if isinstance(g, LinearGeometry):
        return bool(shape) and shape[-1] == g.out_features and n == g.rows * g.out_features
    return True


def _check_shapes(result: nn.Module, gm: fx.GraphModule, records: Sequence[RewriteRecord],
                  before: Analysis, example_inputs: Any) -> None:
    """Run the rewritten model once on the example inputs and check that every factored layer
    gives the output shape its dense layer gave (a guard against a silently wrong rewrite).

    Raises:
        LrfxError: Names the layer, the shape it gives and the shapes the dense layer gave.
    """
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for rec in records:
        try:
            module = result.get_submodule(rec.path)
        except AttributeError:
            continue
        last = module[-1] if isinstance(module, Factored) else module

        def hook(_m: nn.Module, _a: Any, out: Any, name: str = rec.name) -> None:
            if isinstance(out, torch.Tensor):
                seen.setdefault(name, []).append(tuple(out.shape))

        handles.append(last.register_forward_hook(hook))
    inputs = Inputs.of(example_inputs)
    try:
        with torch.no_grad(), eval_mode(result):
            if result is gm:
                gm(*_feed(gm, inputs))
            else:
                call_inputs(result, inputs).call(result)
    finally:
        for h in handles:
            h.remove()
    for name, shapes in seen.items():
        calls = before[name].calls if name in before else ()
        for shape in shapes:
            if calls and not any(_output_fits(shape, g) for g in calls):
                raise LrfxError(
                    f"layer {name!r}: the factored layer gives an output of shape {shape}, which "
                    "is not the dense layer's output shape on the example inputs; this is a bug "
                    "in lrfx: please report it with the model (the rewritten model was not "
                    "returned)")


def apply(
    model: nn.Module,
    plan: RankPlan | Mapping[str, LayerPlan] | str | Path,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    mode: str = "auto",
    verify: bool = False,
) -> nn.Module:
    """Rewrite ``model`` so that every layer the plan names becomes its factored subgraph.

    The model is traced (a deep copy: the caller's model is never modified), the plan is checked
    against it before anything changes, and the rewrite pass replaces each planned layer. The
    result is an ordinary ``GraphModule``: trainable, and exportable with :func:`lrfx.export`.

    Args:
        model: The model to compress.
        plan: A :class:`RankPlan` (or a path to its JSON, or a dict of ``LayerPlan``).
        example_inputs: A tensor or a tuple of positional inputs (used for shapes and MACs).
        leaf_modules: Module types or qualified names to keep as leaves while tracing.
        verify: Also rewrite a copy with the plan's schemes at full rank and check that it
            reproduces the model on the example inputs (relative error below 1e-4; the layer
            at fault is named). Costs one more capture and rewrite. Every rewrite checks, in any
            case, that each factored layer gives its dense layer's output shape.

    Returns:
        The rewritten graph module. ``gm.meta["lrfx"]`` holds ``plan`` (resolved, with predicted
        MACs/params), ``report`` (a :class:`CompressionReport`) and ``rewrites``.

    Raises:
        PlanMismatchError: The plan names a layer the model does not have, or other shapes.
        UnsupportedLayerError: A scheme does not fit a layer, or a rank is out of range.
        LrfxError: A planned layer's weight holds NaN or Inf.

    Example:
        >>> import torch, torchvision, lrfx
        >>> model = torchvision.models.resnet18()
        >>> x = torch.randn(1, 3, 224, 224)
        >>> gm = lrfx.apply(model, lrfx.RankPlan({"fc": lrfx.LayerPlan("svd", 64)}), x)
        >>> type(gm.fc).__name__, gm.fc[0].weight.shape
        ('Factored', torch.Size([64, 512]))
    """
    t0 = time.perf_counter()
    check_module(model)
    rank_plan = as_plan(plan)
    gm = capture(model, example_inputs, leaf_modules=leaf_modules, mode=mode)
    before = run_analysis(gm, example_inputs, spectra=False)
    pruning = _prune_first(gm, rank_plan, before, example_inputs)
    base, resolved = pruning.base, pruning.lowrank
    _check_weights(gm, resolved)
    records, _ = _rewrite(gm, resolved, base, model, example_inputs, leaf_modules, mode,
                          verify and not pruning.records)
    resolved = pruning.merged(resolved)
    report = pruning.report(_report(base, resolved, None, seconds=time.perf_counter() - t0))
    update_graph_facts(gm, plan=resolved, report=report, rewrites=records)
    return _result(gm)


@dataclasses.dataclass(frozen=True)
class _Pruning:
    """A plan's channel entries applied before its low-rank ones: the channel part resolved
    against the dense model, the pruning records, the analysis of the pruned model (``base``)
    and the low-rank part resolved against it."""

    before: Analysis
    base: Analysis
    channels: RankPlan
    lowrank: RankPlan
    records: tuple[PruneRecord, ...] = ()

    def merged(self, lowrank: RankPlan) -> RankPlan:
        """The whole resolved plan (totals: the pruned and factored model's)."""
        if not self.records and not self.channels:
            return lowrank
        return RankPlan({**self.channels.layers, **lowrank.layers},
                        allocator=lowrank.allocator, settings=lowrank.settings,
                        macs=lowrank.macs, params=lowrank.params)

    def report(self, report: CompressionReport) -> CompressionReport:
        if not self.channels:
            return report
        return dataclasses.replace(
            report, macs_before=self.before.total_macs, params_before=self.before.total_params,
            pruned=tuple({"layer": r.name, "channels_before": r.before,
                          "channels_after": r.after, "members": list(r.members)}
                         for r in self.records))


def _prune_first(gm: fx.GraphModule, plan: RankPlan, before: Analysis,
                 example_inputs: Any) -> _Pruning:
    """Apply the plan's channel entries to ``gm`` (checked first: nothing changes on error),
    analyze the pruned model, and resolve the low-rank entries against it."""
    if not plan.channels:
        return _Pruning(before, before, RankPlan({}), plan.resolve(before))
    channels, lowrank = _split_channels(plan)
    channels = channels.resolve(before)
    records = _prune(gm, channels, before)
    base = run_analysis(gm, example_inputs, spectra=False)
    return _Pruning(before, base, channels, lowrank.resolve(base), records)


def _split_channels(plan: RankPlan) -> tuple[RankPlan, RankPlan]:
    """The plan's channel entries and the rest (applied after the pruning), same settings."""
    channels = {k: v for k, v in plan.layers.items() if isinstance(v, ChannelPlan)}
    rest = {k: v for k, v in plan.layers.items() if k not in channels}
    return (RankPlan(channels, allocator=plan.allocator, settings=plan.settings),
            RankPlan(rest, allocator=plan.allocator, settings=plan.settings))


def _groups(gm: fx.GraphModule, analysis: Analysis) -> ChannelGroups:
    if analysis.mode != "fx":
        raise LrfxError(
            "channel pruning follows channels through the model's graph, and this model was "
            f"captured in module mode ({analysis.mode_reason or 'its forward does not trace'}); "
            "make its top-level forward traceable (or wrap the traceable part) to prune channels")
    return find_channel_groups(gm, PassContext())


def _prune(gm: fx.GraphModule, plan: RankPlan, analysis: Analysis) -> tuple[PruneRecord, ...]:
    """Prune the plan's channel entries from ``gm`` (checked first; nothing changes on error)."""
    groups = _groups(gm, analysis)
    ctx = PassContext(options=[PruneOptions(plan.channels, groups)])
    return Pipeline([prune_channels]).run(gm, ctx)[prune_channels.name]


def channel_plan(
    model: nn.Module,
    example_inputs: Any,
    *,
    percent: float | None = None,
    macs: float | None = None,
    params: float | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    scales: str = "all",
    min_channels: int = 1,
    normalize: str = "none",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> RankPlan:
    """A channel-pruning plan from per-channel importance (network slimming's allocation).

    By default a channel's importance is its BatchNorm scale ``|gamma|`` — or its rank gate's,
    in a factored model with gates (:func:`add_rank_gates`) — averaged over the scales of its
    channel group: train with :class:`lrfx.Slimming` to make them sparse. Groups with no scale
    are kept whole unless ``scores`` gives them a score, and listed in
    ``plan.settings["unscored"]``.

    Args:
        model: The model (not modified).
        example_inputs: Inputs for tracing and MAC counts.
        percent: Prune this fraction of all scored channels, one global threshold (the paper).
        macs: Or prune until the model has at most this fraction of its MACs (bisection on the
            threshold).
        params: Or the same for parameters.
        scores: Per group name (any producer of the group), one score per channel, replacing
            (or adding to) the learned scales.
        scales: Which learned scales score channels: ``all``, ``bn`` or ``gates``.
        min_channels: Channels every group keeps at least (never fewer than one).
        normalize: ``none``: rank the raw scores globally (the paper); ``mean``: each group's
            scores divided by their mean first (channels compete within their own layer).

    Returns:
        A :class:`RankPlan` of :class:`ChannelPlan` entries, with predicted MACs and
        parameters; :func:`apply` it to get the pruned model.

    Example:
        >>> import torch, torchvision, lrfx
        >>> net, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
        >>> plan = lrfx.channel_plan(net, x, macs=0.5)
        >>> plan.macs <= 0.5 * lrfx.count_macs(net, x)
        True
        >>> lrfx.count_macs(lrfx.apply(net, plan, x), x) == plan.macs
        True
    """
    check_module(model)
    given = [k for k, v in (("percent", percent), ("macs", macs), ("params", params))
             if v is not None]
    if len(given) != 1:
        raise LrfxError("channel_plan: give exactly one of percent=, macs=, params= "
                        f"(got {', '.join(given) or 'none'})")
    for key, v in (("macs", macs), ("params", params)):
        if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise LrfxError(f"channel_plan: {key} is a fraction of the dense model's, in (0, 1]; "
                            f"got {v!r}")
    gm = capture(model, example_inputs, leaf_modules=leaf_modules)
    analysis = run_analysis(gm, example_inputs, spectra=False)
    groups = _groups(gm, analysis)
    if scales not in ("all", "bn", "gates"):
        raise LrfxError(f"channel_plan: scales must be 'all', 'bn' or 'gates', got {scales!r}")
    found = scale_scores(gm, groups, scales)
    for name, s in (scores or {}).items():
        if name not in groups:
            raise LrfxError(f"channel_plan: scores names {name!r}, which produces no channel "
                            "group; see lrfx.channel_groups for the names")
        g = groups[name]
        if not g.prunable:
            raise UnsupportedLayerError(name, f"its channels cannot be pruned: {g.reason}")
        t = torch.as_tensor(s).detach().float().cpu().flatten()
        if t.numel() != g.channels:
            raise LrfxError(f"channel_plan: scores for {name!r} have {t.numel()} values, the "
                            f"layer has {g.channels} channels")
        found[g.index] = t
    if not found:
        raise LrfxError("channel_plan: no channel group has a score — the model has no "
                        "BatchNorm (or rank gate) on a prunable channel group; pass scores= "
                        "(e.g. weight norms)")
    metric = "macs" if macs is not None else "params" if params is not None else None
    target = None
    if metric is not None:
        fraction = float(macs if macs is not None else params)  # type: ignore[arg-type]
        target = fraction * (analysis.total_macs if metric == "macs" else analysis.total_params)
    return allocate_channels(groups, found, analysis, percent=percent, metric=metric,
                             target=target, min_channels=min_channels,
                             per_channel=per_channel_params(gm, groups), normalize=normalize)


def add_rank_gates(model: nn.Module, *, init: float = 1.0) -> fx.GraphModule:
    """A copy of a factored model with a rank gate after each factor that feeds a channel-mixing
    factor: one learnable scale per rank component (:class:`lrfx.modules.Gate`), all ``init``.

    Train it with :class:`lrfx.Slimming` (which penalizes the gates like BatchNorm scales), then
    ``finalize`` prunes the gated rank components and folds the gates into the factors: the
    factored layers come out at lower ranks.

    Args:
        model: A factored graph module (the result of :func:`apply` / :func:`compress`).
        init: The gates' initial value (1: the gated model computes what the model did).

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 4))
        >>> x = torch.randn(2, 16)
        >>> gm = lrfx.apply(net, lrfx.RankPlan({"0": lrfx.LayerPlan("svd", 6)}), x)
        >>> gated = lrfx.add_rank_gates(gm)
        >>> gated.get_submodule("0_gate").weight.shape, torch.allclose(gated(x), gm(x))
        (torch.Size([6]), True)
    """
    if not isinstance(model, fx.GraphModule):
        raise LrfxError("add_rank_gates: the model must be a factored graph module (what "
                        "lrfx.apply or lrfx.compress return in FX mode); got "
                        f"{type(model).__name__}")
    gm = copy_model(model)
    assert isinstance(gm, fx.GraphModule)
    added = insert_gates(gm, PassContext())
    if not added:
        raise LrfxError("add_rank_gates: the model has no factored layer to gate; factor it "
                        "first (lrfx.compress or lrfx.apply)")
    if init != 1.0:
        with torch.no_grad():
            for m in gm.modules():
                if isinstance(m, Gate):
                    m.weight.fill_(float(init))
    return gm


def fold_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every rank gate multiplied into the factor before it, and each
    factored layer's ``rank`` set to what its factors have (after pruning gated components)."""
    if not isinstance(model, fx.GraphModule):
        raise LrfxError(f"fold_gates: expected a graph module, got {type(model).__name__}")
    gm = copy_model(model)
    assert isinstance(gm, fx.GraphModule)
    fold_gates_pass(gm, PassContext())
    return gm


def channel_groups(model: nn.Module, example_inputs: Any, *,
                   leaf_modules: Sequence[type[nn.Module] | str] = ()) -> ChannelGroups:
    """The groups of channels of ``model`` that must be pruned together, prunable or not (with
    the reason). A plan's channel entry names a group by any of its producers.

    Example:
        >>> import torch, torchvision, lrfx
        >>> groups = lrfx.channel_groups(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> g = groups["conv1"]   # the stem and every block output of the first stage
        >>> g.channels, g.producers
        (64, ('conv1', 'layer1.0.conv2', 'layer1.1.conv2'))
    """
    check_module(model)
    gm = capture(model, example_inputs, leaf_modules=leaf_modules)
    return _groups(gm, run_analysis(gm, example_inputs, spectra=False))


def _rewrite(gm: fx.GraphModule, plan: RankPlan, before: Analysis, model: nn.Module,
             example_inputs: Any, leaf_modules: Sequence[type[nn.Module] | str], mode: str,
             verify: bool, refit: Refit | None = None
             ) -> tuple[tuple[RewriteRecord, ...], nn.Module]:
    """The rewrite step of :func:`apply` and :func:`compress`: factorize (with the factors of
    ``refit`` where it has them), refresh the layer facts, check every factored layer's output
    shape and, with ``verify``, the full-rank equivalent. Returns the records and the result
    (graph module or module-mode model)."""
    factors = None if refit is None else {
        name: (w, refit.biases.get(name)) for name, w in refit.weights.items()}
    records = factorize(gm, FactorizeOptions(plan=plan, factors=factors))
    _refresh_layers(gm)
    result = _result(gm)
    _check_shapes(result, gm, records, before, example_inputs)
    if verify:
        _verify_full_rank(model, plan, example_inputs, leaf_modules, mode)
    return records, result


def _full_rank(plan: RankPlan, before: Analysis, names: Iterable[str]) -> RankPlan:
    """The plan's schemes at their largest ranks (cp, which has no exact rank, as channel)."""
    layers: dict[str, LayerPlan] = {}
    for name in names:
        scheme = plan[name].scheme
        scheme = "channel" if scheme == "cp" else scheme
        layers[name] = LayerPlan(scheme, before[name].max_rank(scheme))
    return RankPlan(layers)


def _verify_full_rank(model: nn.Module, plan: RankPlan, example_inputs: Any,
                      leaf_modules: Sequence[type[nn.Module] | str], mode: str,
                      tol: float = 1e-4) -> None:
    """Rewrite a copy with the plan's schemes at full rank; it must reproduce the model.

    On a mismatch each layer is rewritten alone to find the culprit.

    Raises:
        LrfxError: Names the layer whose full-rank rewrite changes the model's output.
    """
    inputs = Inputs.of(example_inputs)
    factored = list(plan.factored)
    if not factored:
        return

    def error(names: Sequence[str]) -> float:
        gm = capture(model, example_inputs, leaf_modules=leaf_modules, mode=mode)
        before = run_analysis(gm, example_inputs, spectra=False)
        full = _full_rank(plan, before, names).resolve(before)
        factorize(gm, FactorizeOptions(plan=full))
        _refresh_layers(gm)
        result = _result(gm)
        with torch.no_grad(), eval_mode(model), eval_mode(result):
            ref = [t for t in tree_leaves(call_inputs(model, inputs).call(model))
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
            got = [t for t in tree_leaves(call_inputs(result, inputs).call(result)
                                          if result is not gm else gm(*_feed(gm, inputs)))
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=False)):
            return float("inf")
        worst = 0.0
        for a, b in zip(got, ref, strict=True):
            den = float(b.double().norm()) or 1.0
            worst = max(worst, float((a.double() - b.double()).norm()) / den)
        return worst

    if error(factored) <= tol:
        return
    for name in factored:
        e = error([name])
        if e > tol:
            raise LrfxError(f"verify: layer {name!r} rewritten at full rank changes the model's "
                            f"output (relative error {e:.2e}); this is a bug in lrfx: please "
                            "report it with the model")
    raise LrfxError("verify: the rewrite at full rank changes the model's output, though no "
                    "single layer does; this is a bug in lrfx: please report it with the model")


def recalibrate_bn(model: nn.Module, batches: Iterable[Any], *, inputs: Any = "auto",
                   max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (in place).

    ``batches`` may be a ``DataLoader`` of ``(inputs, targets)`` pairs; ``inputs`` selects the
    model's part of a batch as for calibration (see :mod:`lrfx.batches`), ``max_batches`` bounds
    how many are read.

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
            for batch in take_batches(batches, max_batches, "recalibrate_bn"):
                x = model_inputs(batch, model, inputs, f"batch {n}")
                call_inputs(model, Inputs.of(x, f"batch {n}")).call(model)
                n += 1
        if n == 0:
            raise LrfxError("recalibrate_bn needs at least one batch")
    finally:
        for m, flag in flags:
            m.training = flag
        for bn, mom in momenta:
            bn.momentum = mom
    return len(bns)


def compress(
    model: nn.Module,
    example_inputs: Any,
    config: CompressConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    macs: float | int | None = None,
    params: float | int | None = None,
    latency: float | None = None,
    allocator: str | None = None,
    scheme: str | None = None,
    calibration: Iterable[Any] | None = None,
    latency_batch_sizes: Sequence[int] | None = None,
    round_to: int | None = None,
    exclude: Sequence[Any] | None = None,
    min_rank: int | Mapping[str, int] | None = None,
    max_rank: int | Mapping[str, int] | None = None,
    max_error: float | Mapping[str, float] | None = None,
    calibration_batches: int | None = None,
    calibration_inputs: Any = None,
    recalibrate: bool | None = None,
    sequential: bool | None = None,
    sensitivity: str | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    progress: bool = False,
    precision: str | None = None,
    mode: str | None = None,
    verify: bool | None = None,
    latency_model: LatencyModel | None = None,
    **settings: Any,
) -> nn.Module:
    """Compress ``model`` to a MACs, parameter or latency budget in one call.

    Traces the model (a copy: the caller's model is never modified), computes spectra (whitened
    by the calibration data when given) with their singular vectors, allocates ranks for the
    budget, rewrites the graph with factors taken from those vectors and, with calibration data,
    re-estimates BatchNorm statistics. The result is in ``model``'s train/eval mode.

    Args:
        model: The model.
        example_inputs: A tensor, a tuple of positional inputs, a dict of keyword inputs or
            ``(args, kwargs)`` (shapes for MACs).
        config: A :class:`lrfx.CompressConfig`, its dict, or the path of its JSON; the keyword
            arguments override its fields (``None``: as configured).
        macs, params: The budget (exactly one of these and ``latency``): a fraction in (0, 1]
            or an absolute count.
        latency: A latency budget: a fraction in (0, 1] of the dense model's latency, measured
            on this machine at ``example_inputs``' shapes (batch size included), on the model's
            device and dtype. Each factorable layer's dense and factored forms are timed at a
            few candidate ranks (cached on disk, :mod:`lrfx.latency`); only forms measured
            faster than dense are candidates, so no layer gets slower. The compressed model is
            timed against the dense one afterwards: ``report.latency``.
        latency_batch_sizes: With ``latency``, also time at these batch sizes: no layer gets
            slower at any of them, and the budget applies to the mean ratio (see
            :class:`lrfx.CompressConfig`).
        allocator: ``lc`` (default), ``energy``, ``global_sigma`` or ``uniform``.
        scheme: ``auto`` (per layer, the scheme with the lowest error for the cost) or one of
            ``channel``, ``spatial``, ``tucker2``; Linear layers always use ``svd``.
        calibration: Batches for data-aware (whitened) factorization and BN recalibration: a
            list, a ``DataLoader`` (of inputs, ``(inputs, targets)`` pairs, or dicts...).
        round_to: Round ranks to multiples of this (e.g. 8 for SIMD-friendly shapes).
        exclude: Layers left dense: names, globs (``"layer4.*"``) or module types.
        min_rank, max_rank, max_error: Per-layer bounds: a number, or ``{selector: number}``.
        calibration_batches: Use at most this many calibration batches.
        calibration_inputs: Which part of a batch feeds the model (default ``"auto"``; see
            :mod:`lrfx.batches`).
        recalibrate: Re-estimate BN statistics on the calibration data (default True).
        sequential: Fit each layer to the inputs the compressed layers before it give it
            (default: automatic, see :class:`lrfx.CompressConfig`).
        sensitivity: Loss-aware allocation: ``fisher``, ``output`` or ``None`` (see
            :class:`lrfx.CompressConfig`).
        leaf_modules: Module types or names to keep as leaves while tracing.
        progress: Report progress on stderr (a bar on a terminal, periodic lines elsewhere).
        precision: Of the spectra: ``auto`` (float64 for small unfoldings, float32 above 512
            rows and columns), ``float64`` or ``float32``.
        mode: Capture: ``auto``, ``fx`` or ``module``.
        verify: Check the plan's schemes at full rank against the model (see :func:`apply`).
        latency_model: How layers are timed for a latency budget (a
            :class:`lrfx.latency.LatencyModel`: its timer and cache); default: wall-clock
            timing on the model's device, cached under :func:`lrfx.latency.cache_dir`.
        settings: Allocator settings, e.g. ``rank_min=5`` for ``global_sigma``.

    Returns:
        The compressed model; ``gm.meta["lrfx"]`` (or :func:`lrfx.facts_of`) holds ``plan`` (the
        config in ``plan.settings["config"]``), ``report`` (a :class:`CompressionReport`: per
        layer figures, the layers left dense and why, warnings) and ``rewrites``.

    Raises:
        LrfxError: Bad budget (none or both, zero, negative, fraction above 1), unknown
            allocator or scheme, an exclusion naming no layer.
        BudgetInfeasibleError: The budget is below the smallest reachable cost.
        ShapeError: A calibration batch does not fit the model (names the batch and the node).

    Example:
        >>> import torch, torchvision, lrfx
        >>> gm = lrfx.compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                    macs=0.5, exclude=["fc"])
        >>> gm.meta["lrfx"].report.macs_after <= 0.5 * 1814073344
        True
    """
    t0 = time.perf_counter()
    check_module(model)
    cfg = _config(config, settings, macs=macs, params=params, latency=latency,
                  latency_batch_sizes=None if latency_batch_sizes is None else tuple(
                      latency_batch_sizes),
                  allocator=allocator, scheme=scheme, round_to=round_to, exclude=exclude,
                  min_rank=min_rank, max_rank=max_rank, max_error=max_error,
                  calibration_batches=calibration_batches,
                  calibration_inputs=calibration_inputs, recalibrate=recalibrate,
                  sequential=sequential, sensitivity=sensitivity, precision=precision,
                  mode=mode, verify=verify)
    check_budget(cfg.macs, cfg.params, cfg.latency)
    with step("calibration data", progress, enabled=calibration is not None):
        batches = None if calibration is None else _calibration_batches(model, calibration, cfg)
    with step("capture", progress):
        gm = capture(model, example_inputs, leaf_modules=leaf_modules, mode=cfg.mode)
    passes: list[GraphPass[Any]] = [propagate_shapes, annotate_costs]
    options: list[Any] = [SpectraOptions(vectors=True, precision=cfg.precision)]
    if batches is not None:
        passes.append(collect_input_stats)
        options.append(CalibrationOptions(calibration=batches, run=_runner(gm)))
    passes.append(compute_spectra)
    ctx = PassContext(example_inputs=_feed(gm, example_inputs), progress=progress,
                      options=options)
    Pipeline(passes).run(gm, ctx)
    before = Analysis.from_graph(gm)
    if not before.factorable:
        log.warning("%s has no layer lrfx can factor; returning an equivalent graph",
                    type(model).__name__)
    weights = None
    if batches is not None and cfg.sensitivity in ("fisher", "output") and before.factorable:
        with step("layer sensitivity", progress):
            weights = layer_sensitivity(gm, PassContext(progress=progress, options=[
                SensitivityOptions(calibration=batches, kind=cfg.sensitivity,
                                   run=_runner(gm))]))
    timing = None
    if cfg.latency is not None:
        lm = latency_model or _latency_model(model)
        with step("latency of the dense model", progress):
            dense_s = lm.time_models({"dense": model}, example_inputs)["dense"]
            timing = _Timing(lm, dense_s, progress)
            if cfg.latency_batch_sizes:
                timing.batch = _batched(example_inputs, 1)[0]
                for b in cfg.latency_batch_sizes:
                    if b != timing.batch:
                        xb = _batched(example_inputs, b)[1]
                        timing.extra[b] = (lm.time_models({"dense": model}, xb)["dense"], xb)
    with step("allocation", progress):
        alloc = _allocate(before, cfg, weights=weights, timing=timing)
    if batches is not None and cfg.sensitivity == "measured" and alloc.plan.factored:
        if get_graph_facts(gm).capture.mode == "module":
            raise LrfxError("sensitivity='measured' replays the traced graph; this model was "
                            "captured in module mode: use sensitivity='fisher' or 'output'")
        with step("layer sensitivity", progress):
            weights = measure_slopes(gm, PassContext(progress=progress, options=[
                SlopeOptions(calibration=batches, plan=alloc.plan, errors=alloc.errors)]))
        with step("allocation (loss-aware)", progress):
            alloc = _allocate(before, cfg, weights=weights, timing=timing)
    if timing is not None and alloc.plan.factored:
        alloc = _correct_latency(alloc, before, cfg, weights, timing, model, example_inputs,
                                 leaf_modules)
    refit, why_not = None, "no calibration data"
    if batches is not None and alloc.plan.factored:
        refit, why_not = _sequential(gm, alloc.plan, batches, cfg, progress)
    how: dict[str, Any] = {"sequential": refit is not None}
    if refit is None and batches is not None:
        how["sequential_reason"] = why_not
    alloc = dataclasses.replace(alloc, plan=dataclasses.replace(
        alloc.plan, settings={**alloc.plan.settings, **how}))
    with step("rewrite", progress):
        records, result = _rewrite(gm, alloc.plan, before, model, example_inputs, leaf_modules,
                                   cfg.mode, cfg.verify, refit)
    if batches is not None and cfg.recalibrate:
        with step("BatchNorm recalibration", progress):
            recalibrate_bn(result, batches if result is not gm else
                           [_feed(gm, b) for b in batches])
    latency_report: dict[str, Any] = {}
    if timing is not None:
        with step("latency of the result", progress):
            latency_report = _measured_latency(timing, model, result, example_inputs,
                                               alloc.latency)
    report = _report(before, alloc.plan, alloc.errors, allocator=cfg.allocator,
                     scheme=cfg.scheme, whitened=batches is not None,
                     seconds=time.perf_counter() - t0, allocation=alloc, config=cfg,
                     refit=refit, latency=latency_report)
    facts = update_graph_facts(gm, plan=alloc.plan, report=report, rewrites=records)
    if result is not gm:
        attach_facts(result, facts.replace(capture=dataclasses.replace(facts.capture, root=None)))
    log.info("compressed %s: MACs %.3fx, params %.3fx, %d layers factored in %.1f s",
             type(model).__name__, report.macs_ratio,
             report.params_after / max(report.params_before, 1), len(report), report.seconds)
    return result


#: How many times a latency plan is re-allocated when the whole model, measured, misses it.
LATENCY_CORRECTIONS = 2

#: A measured latency ratio within this relative tolerance of the budget counts as met (noise).
LATENCY_TOLERANCE = 0.02

#: Warn when the budget had to be lowered by more than this fraction to be met in the model.
LATENCY_SQUEEZE = 0.1


def _correct_latency(alloc: _Allocation, before: Analysis, cfg: CompressConfig,
                     weights: Mapping[str, float] | None, timing: _Timing, model: nn.Module,
                     example_inputs: Any, leaf_modules: Sequence[type[nn.Module] | str]
                     ) -> _Allocation:
    """Close the loop on the whole model: layers timed alone do not add up exactly to the model
    (the glue between the pieces, memory traffic, cache effects), so the plan is applied and the
    model timed against the dense one; while the measured ratio misses the budget, the budget
    handed to the allocator is lowered (first in proportion, then along the secant through the
    last two tries, at most twice the proportional step; at most :data:`LATENCY_CORRECTIONS`
    times). The plan kept is the one with
    the largest allocated budget among those measured within the budget (else the fastest).
    Each try is recorded in ``plan.settings["latency_tries"]``."""
    assert cfg.latency is not None
    target = fraction = cfg.latency
    tries: list[tuple[float, float, _Allocation]] = []
    for i in range(LATENCY_CORRECTIONS + 1):
        trial = apply(model, alloc.plan, example_inputs, leaf_modules=leaf_modules,
                      mode=cfg.mode)
        measured = statistics.mean(
            r["ratio"] for r in _side_by_side(timing, model, trial, example_inputs).values())
        tries.append((fraction, measured, alloc))
        log.info("latency plan for %.3f: predicted %.3fx, measured %.3fx", fraction,
                 float(alloc.latency.get("predicted_ratio", 0)), measured)
        if measured <= target * (1 + LATENCY_TOLERANCE) or i == LATENCY_CORRECTIONS:
            break
        proportional = fraction * target / measured
        nxt = proportional
        if len(tries) >= 2:
            (f1, m1, _), (f2, m2, _) = tries[-2], tries[-1]
            if m2 != m1 and (f2 - f1) / (m2 - m1) > 0:
                # the secant, but never more than twice the proportional step: a measured ratio
                # that hardly moved (noise, glue the layers do not show) must not send the
                # budget to the floor
                nxt = max(f2 + (target - m2) * (f2 - f1) / (m2 - m1),
                          fraction - 2 * (fraction - proportional))
        if fraction <= timing.floor * 1.001:
            break  # already the fastest plan the measurements allow
        fraction = min(max(nxt, timing.floor * 1.0001), fraction * 0.99)
        try:
            alloc = _allocate(before, cfg.replace(latency=fraction), weights=weights,
                              timing=timing)
        except BudgetInfeasibleError:
            break
    met = [x for x in tries if x[1] <= target * (1 + LATENCY_TOLERANCE)]
    chosen = max(met, key=lambda x: x[0]) if met else min(tries, key=lambda x: x[1])
    best = chosen[2]
    record = [{"budget": round(f, 4),
               "predicted": round(float(a.latency.get("predicted_ratio", 0)), 4),
               "measured": round(m, 4)} for f, m, a in tries]
    settings = {**best.plan.settings, "latency_tries": record, "fraction": target,
                "allocated_fraction": round(chosen[0], 4),
                "config": {**best.plan.settings.get("config", {}), "latency": target}}
    warnings = best.warnings
    if chosen[0] < target * (1 - LATENCY_SQUEEZE):
        note = (f"latency={target} was met only by allocating for {chosen[0]:.3f} (the fastest "
                f"plan the layer timings allow is {timing.floor:.3f}): this model's glue "
                "between layers costs more than its layers timed alone show, so the ranks were "
                "cut much deeper than the budget suggests; check the accuracy, or raise the "
                "budget" if met else
                f"latency={target} was not met: the fastest plan tried measured "
                f"{chosen[1]:.3f}x; raise the budget")
        log.warning("%s", note)
        warnings = (*warnings, note)
    plan = dataclasses.replace(best.plan, settings=settings)
    return dataclasses.replace(best, plan=plan, warnings=warnings)


def _latency_model(model: nn.Module) -> LatencyModel:
    """The default layer timer: the model's device and floating dtype, the disk cache."""
    p = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
             None)
    return LatencyModel(device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None else torch.float32)


def _side_by_side(timing: _Timing, model: nn.Module, result: nn.Module, example_inputs: Any
                  ) -> dict[int, dict[str, float]]:
    """Dense and compressed models timed side by side at every batch size of the budget."""
    inputs = {timing.batch: example_inputs, **{b: x for b, (_, x) in timing.extra.items()}}
    out = {}
    for b, x in inputs.items():
        t = timing.model.time_models({"dense": model, "compressed": result}, x)
        out[b] = {"dense_ms": t["dense"] * 1e3, "compressed_ms": t["compressed"] * 1e3,
                  "ratio": t["compressed"] / t["dense"]}
    return out


def _measured_latency(timing: _Timing, model: nn.Module, result: nn.Module,
                      example_inputs: Any, planned: Mapping[str, Any]) -> dict[str, Any]:
    """Dense and compressed models timed side by side, next to the allocator's prediction."""
    per = _side_by_side(timing, model, result, example_inputs)
    out = {k: v for k, v in planned.items() if k != "layers"}
    out.update(per[timing.batch], threads=torch.get_num_threads(),
               inputs=Inputs.of(example_inputs).describe(), layers=planned.get("layers", {}))
    if timing.extra:
        out["batches"] = {str(b): v for b, v in sorted(per.items())}
        out["mean_ratio"] = statistics.mean(v["ratio"] for v in per.values())
    log.info("latency %.3f ms -> %.3f ms (%.3fx measured, %.3fx predicted)", out["dense_ms"],
             out["compressed_ms"], out["ratio"], out.get("predicted_ratio", float("nan")))
    return out


def _sequential(gm: fx.GraphModule, plan: RankPlan, batches: Sequence[Any], cfg: CompressConfig,
                progress: bool) -> tuple[Refit | None, str]:
    """Sequential calibration when the config asks for it (or, automatically, when it can run
    within :data:`~lrfx.config.SEQUENTIAL_MEMORY`); else ``(None, why not)``."""
    if cfg.sequential is False:
        return None, "sequential=False"
    if get_graph_facts(gm).capture.mode == "module":
        if cfg.sequential:
            raise LrfxError("sequential=True needs a traced graph; this model was captured in "
                            "module mode (the report says why). Use sequential=False")
        return None, "module mode: no graph to walk"
    samples = sum(_samples(b) for b in batches)
    need = estimate_memory(gm, samples)
    if cfg.sequential is None and need > SEQUENTIAL_MEMORY:
        why = (f"it would hold about {need / 2**30:.1f} GiB of activations for {samples} "
               f"calibration samples (limit {SEQUENTIAL_MEMORY / 2**30:.0f} GiB); pass "
               "sequential=True to run it anyway, or fewer calibration batches")
        log.warning("sequential calibration skipped: %s", why)
        return None, why
    with step("sequential calibration", progress):
        refit = refit_factors(gm, PassContext(progress=progress, options=[RefitOptions(
            plan=plan, calibration=batches, recalibrate=cfg.recalibrate)]))
    return refit, ""


def _samples(batch: Any) -> int:
    """The number of samples in a batch (the leading dim of its first tensor)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


def _calibration_batches(model: nn.Module, calibration: Iterable[Any], cfg: CompressConfig
                         ) -> list[Any]:
    """The model inputs of the calibration batches (at most ``calibration_batches``)."""
    out = [model_inputs(b, model, cfg.calibration_inputs, f"calibration batch {i}")
           for i, b in enumerate(take_batches(calibration, cfg.calibration_batches))]
    if not out:
        raise LrfxError("calibration holds no batch: pass a non-empty list or DataLoader "
                        "(or calibration=None for data-free compression)")
    return out


def validate_plan(plan: RankPlan | Mapping[str, LayerPlan] | str | Path, model: nn.Module,
                  example_inputs: Any) -> RankPlan:
    """Check a plan against a model at the given inputs; returns it resolved.

    Raises:
        PlanMismatchError: Names the first layer that does not fit.
        UnsupportedLayerError: A scheme does not apply to a layer, or a rank is out of range.
    """
    return as_plan(plan).resolve(analyze(model, example_inputs, spectra=False))


# --- loading --------------------------------------------------------------------------------------


def _blank_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are zeros (their values
    are about to be replaced: nothing is copied). Tied parameters stay tied; non-persistent
    buffers (constants made at construction: position ids, rotary frequencies) and tensors kept
    as plain attributes are copied as they are."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(torch.zeros_like(p), requires_grad=p.requires_grad))
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                memo.setdefault(id(b), torch.zeros_like(b))
    return copy_model(model, memo)


def _assign_weights(result: nn.Module, file: Path, model: nn.Module, where: str,
                    verified: bool = False, layers: Sequence[str] = ()) -> None:
    """Put the saved tensors into ``result`` (by assignment, no copy), tying aliases again, and
    take the buffers a checkpoint does not hold (non-persistent ones) from ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise LrfxError(f"cannot read the weights {str(file)!r}: {exc}") from exc
    groups: dict[int, list[tuple[str, torch.Tensor, bool]]] = {}
    for name, p in result.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append((name, p, True))
    for name, b in result.named_buffers(remove_duplicate=False):
        groups.setdefault(id(b), []).append((name, b, False))
    known = dict(model.named_buffers(remove_duplicate=False))
    full: dict[str, tuple[torch.Tensor, bool]] = {}
    used: set[str] = set()
    missing = []
    for members in groups.values():
        hit = next((n for n, _, _ in members if n in saved), None)
        name0, t0, is_param = members[0]
        if hit is not None:
            value: torch.Tensor = saved[hit]
            used.add(hit)
            if value.shape != t0.shape:
                layer = max((n for n in layers if hit.startswith(f"{n}.")), key=len,
                            default=hit.rpartition(".")[0])
                raise LrfxError(f"{hit!r} in {where!r} has shape {tuple(value.shape)}; the "
                                f"model rebuilt from the plan expects {tuple(t0.shape)} (layer "
                                f"{layer!r}): was plan.json edited? Pass the architecture (and "
                                "inputs) the plan was made for, with its own plan")
            if is_param:
                value = nn.Parameter(value, requires_grad=t0.requires_grad)
        elif not is_param and name0 in known:
            value = known[name0].detach().clone()  # a buffer the checkpoint does not hold
        else:
            missing.append(name0)
            continue
        for name, _, _ in members:
            full[name] = (value, is_param)
    unexpected = sorted(set(saved) - used - set(full))
    if missing or unexpected:
        layers = sorted({k.rpartition(".")[0] or k for k in [*missing, *unexpected]})
        raise LrfxError(
            f"the weights in {where!r} do not fit the model rebuilt from its plan at "
            f"{', '.join(repr(n) for n in layers[:5])} (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}): was plan.json edited, or is this another architecture? Pass "
            "the architecture the plan was made for, with the plan it was saved with"
        )
    bad = [n for n, (v, _) in full.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad and verified:  # byte for byte what was saved: the model itself had them
        log.warning("the weights in %s hold non-finite values in %s, as they were saved",
                    where, bad[:5])
    elif bad:
        raise LrfxError(f"the weights in {where!r} hold non-finite values in {bad[:5]}: the file "
                        "is damaged or was saved from a diverged model; save it again")
    for name, (value, is_param) in full.items():
        owner, _, attr = name.rpartition(".")
        module = result.get_submodule(owner)
        if is_param:
            assert isinstance(value, nn.Parameter)
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value


def load(
    path: str | Path,
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> nn.Module:
    """Rebuild a saved rewrite: the plan's factored shapes on ``model``, then the saved weights.

    Nothing is decomposed and no weight is copied: the model's structure is copied with blank
    tensors, traced and rewritten (factored shapes only, from the plan), and the saved tensors
    are then assigned in place. Models whose forward cannot run on blank weights (a leaf with
    data-dependent checks, say) are rebuilt from a full copy instead.

    Args:
        path: A directory written by :func:`lrfx.save`.
        model: The original (dense) architecture; its weights are not used (nor modified).
        example_inputs: Inputs of the shapes the model was rewritten at.

    Returns:
        What was saved, rebuilt: a graph module, or (for a model compressed in module mode) a
        copy of ``model`` with the factored layers in place; its outputs equal those of the
        saved one. In the train/eval mode the saved model was in (recorded in the manifest;
        eval mode for directories saved before lrfx 0.2), whatever ``model``'s mode is.
    """
    t0 = time.perf_counter()
    check_module(model)
    d = Path(path)
    manifest = verify_saved(d)
    mode = str(manifest.get("mode") or "auto")
    try:
        plan = RankPlan.from_json((d / PLAN_FILE).read_text())
    except LrfxError as exc:
        raise LrfxError(f"{str(d / PLAN_FILE)!r}: {exc}") from None
    try:
        gm = capture(_blank_copy(model), example_inputs, leaf_modules=leaf_modules, mode=mode,
                     copy=False)
        pruning = _prune_first(gm, plan, run_analysis(gm, example_inputs, spectra=False),
                               example_inputs)
    except Exception as exc:  # a forward that needs real weights (branches on them, say)
        log.info("cannot rebuild %s on blank weights (%s); using a full copy",
                 type(model).__name__, exc)
        gm = capture(model, example_inputs, leaf_modules=leaf_modules, mode=mode)
        pruning = _prune_first(gm, plan, run_analysis(gm, example_inputs, spectra=False),
                               example_inputs)
    before, resolved = pruning.base, pruning.lowrank
    records = factorize(gm, FactorizeOptions(plan=resolved, decompose=False))
    _refresh_layers(gm)
    result = _result(gm)
    _assign_weights(result, d / WEIGHTS_FILE, model, str(d),
                    verified=bool((manifest.get("sha256") or {}).get(WEIGHTS_FILE)),
                    layers=tuple(resolved.layers))
    result.train(bool(manifest.get("training", False)))  # the mode it was saved in
    _check_shapes(result, gm, records, before, example_inputs)
    resolved = pruning.merged(resolved)
    report = pruning.report(_report(before, resolved, None, seconds=time.perf_counter() - t0))
    facts = update_graph_facts(gm, plan=resolved, report=report, rewrites=records)
    if result is not gm:
        attach_facts(result, facts.replace(capture=dataclasses.replace(facts.capture, root=None)))
    return result
