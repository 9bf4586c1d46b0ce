"""Loss-aware layer weights: how much a layer's relative output error moves the model's output.

Allocators compare layers by their relative output errors ``e_l = ||Y_l - Y_l'||^2 / ||Y_l||^2``,
as if an error of 1 % cost the same in every layer. It does not: an error in a layer whose output
the rest of the network amplifies costs more. To second order, a perturbation ``d`` of a layer's
output ``y`` changes the loss by ``1/2 d^T F d`` with ``F = E[g g^T]`` (``g`` the gradient of the
loss with respect to ``y``: the Fisher information). For an error spread over the output,
``E[d^T F d] ~ e ||y||^2 tr(F) / dim(y)``, so each layer's weight is

    ``w_l = E[||y_l||^2] * E[||g_l||^2] / dim(y_l)``   (per sample; normalized to mean 1)

and the budgeted allocators minimize ``sum_l w_l e_l``. Two choices of ``g``, both needing no
labels (calibration batches rarely have them):

* ``fisher`` — the model's output is read as logits over its last dimension, and the loss is the
  cross-entropy against labels *sampled from the model's own prediction*: ``g`` is then a sample
  of the true Fisher's square root (its expectation over the samples is ``F``). For classifiers
  and language models.
* ``output`` — a random Gaussian probe ``v`` of the output's shape, loss ``<v, output>``:
  ``E||g||^2 = tr(J J^T)`` (Hutchinson), the sensitivity of the output itself in the Euclidean
  norm. For any model (regression, embeddings).

Both assume the error is spread evenly over the layer's output; a truncation's is not (it lies
where the layer's whitened spectrum is small), and on the Fashion-MNIST ResNet-20 both weights
skew allocations towards crushing the last stage. :func:`measure_slopes` measures instead
(``measured``): each factored layer of a first, unweighted plan is truncated *alone* at its
planned rank, and its slope is the relative change of the model's output over its own predicted
error, ``s_l = (||f(x) - f_l(x)||^2 / ||f(x)||^2) / e_l`` — the layer's error-to-output slope
where the plan puts it (one forward pass of a few calibration batches per factored layer); the
weight is ``sqrt(s_l)`` (see :class:`SlopeOptions`).

Layers the hooks cannot reach (functional ``F.linear`` on a graph attribute, the projections of
``nn.MultiheadAttention``) get the median weight of the others.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils._pytree import tree_leaves

from lrfx.errors import LrfxError, ShapeError
from lrfx.facts import get_graph_facts, get_node_facts
from lrfx.inputs import Inputs
from lrfx.passes.analysis.activations import _statable, run_checked
from lrfx.passes.analysis.replay import Replay, lowrank_overrides, planned_layers, relative_error
from lrfx.pipeline import PassContext, graph_pass
from lrfx.progress import progress_bar
from lrfx.tracing import eval_mode

__all__ = ["SENSITIVITIES", "SensitivityOptions", "SlopeOptions", "layer_sensitivity",
           "measure_slopes"]

log = logging.getLogger(__name__)

#: The kinds of sensitivity :func:`layer_sensitivity` measures.
SENSITIVITIES = ("fisher", "measured", "output")


@dataclass(frozen=True)
class SensitivityOptions:
    """Options of :func:`layer_sensitivity`.

    Attributes:
        calibration: The batches (each in any form :class:`~lrfx.inputs.Inputs` accepts).
        kind: ``fisher`` or ``output`` (see the module docstring).
        run: How to run one batch and return the output (module-mode captures run the model);
            by default the graph runs it.
        seed: Of the sampled labels / random probes (the weights are deterministic).
    """

    calibration: Iterable[Any]
    kind: str = "fisher"
    run: Callable[[Any], Any] | None = None
    seed: int = 0


def _output_tensor(out: Any) -> torch.Tensor:
    """The model output the loss is taken on: its first floating-point tensor (logits of a
    ``ModelOutput``, the first item of a tuple...)."""
    for leaf in tree_leaves(out) if not isinstance(out, torch.Tensor) else [out]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    if hasattr(out, "values"):  # transformers' ModelOutput is a dict subclass
        for v in out.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
    raise LrfxError(f"the model's output ({type(out).__name__}) holds no floating-point tensor "
                    "to measure layer sensitivity on; use sensitivity=None")


def _probe_loss(out: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "output":
        v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
        return (out * v).sum()
    logits = out.reshape(-1, out.shape[-1]).float()
    if logits.shape[-1] < 2:
        raise LrfxError("sensitivity='fisher' reads the output as logits over its last "
                        f"dimension, which has size {out.shape[-1]}; use sensitivity='output'")
    probs = torch.softmax(logits.detach(), -1).cpu()
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)
    return F.cross_entropy(logits, labels, reduction="sum")


@graph_pass(requires=["layers"], options=SensitivityOptions)
def layer_sensitivity(gm: fx.GraphModule, ctx: PassContext) -> Mapping[str, float]:
    """Per factorable layer, its loss-aware weight ``w_l`` (mean 1; see the module docstring).

    Reads: :class:`SensitivityOptions` and the layer facts. Writes nothing; returns the weights.
    Runs the model in eval mode with gradients (each batch: one forward, one backward to the
    hooked layer outputs only; no parameter gradient is stored); modules and their
    ``requires_grad`` flags are restored.

    Raises:
        LrfxError: No batch, an unknown kind, or an output the kind cannot read.
        ShapeError: A batch does not fit the model (names the batch and the node).
    """
    opts = ctx.option(SensitivityOptions)
    if opts.kind not in SENSITIVITIES:
        raise LrfxError(f"unknown sensitivity {opts.kind!r}; choose one of "
                        f"{', '.join(SENSITIVITIES)} (or None to weigh every layer alike)")
    names: list[str] = []
    modules = {}
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            if layer.name in names:
                continue
            names.append(layer.name)
            m = _statable(gm, layer)
            if m is not None:
                modules[layer.name] = m
    act = dict.fromkeys(modules, 0.0)
    grad = dict.fromkeys(modules, 0.0)
    dims: dict[str, int] = {}
    outputs: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: Any, _a: Any, y: Any) -> None:
            if isinstance(y, torch.Tensor) and y.requires_grad:
                outputs.setdefault(name, []).append(y)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    flags = {p: p.requires_grad for p in gm.parameters()}
    gen = torch.Generator().manual_seed(opts.seed)
    spec = get_graph_facts(gm).input_spec
    samples = 0
    batches = opts.calibration
    try:
        for p in flags:  # gradients must reach every activation (no .grad is stored)
            if p.is_floating_point():
                p.requires_grad_(True)
        total = len(batches) if isinstance(batches, Sized) else 0
        with eval_mode(gm), torch.enable_grad(), progress_bar(
                "layer sensitivity", total, enabled=ctx.progress) as advance:
            for k, batch in enumerate(batches):
                advance()
                outputs.clear()
                try:
                    out = opts.run(batch) if opts.run is not None else run_checked(
                        gm, *spec.feed(Inputs.of(batch, f"calibration batch {k}")))
                except ShapeError as exc:
                    raise ShapeError(exc.node, exc.target, exc.reason,
                                     inputs=f"calibration batch {k}") from exc
                y = _output_tensor(out)
                n = int(y.shape[0]) if y.dim() > 0 else 1
                samples += n
                flat = [(name, t) for name, ts in outputs.items() for t in ts]
                if not flat:
                    continue
                loss = _probe_loss(y, opts.kind, gen)
                grads = torch.autograd.grad(loss, [t for _, t in flat], allow_unused=True)
                for (name, t), g in zip(flat, grads, strict=True):
                    act[name] += float(t.detach().double().pow(2).sum())
                    dims[name] = t[0].numel() if t.dim() > 1 else t.numel()
                    if g is not None:
                        grad[name] += float(g.double().pow(2).sum())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if samples == 0:
        raise LrfxError("layer sensitivity needs at least one calibration batch")
    raw = {n: (act[n] / samples) * (grad[n] / samples) / max(dims.get(n, 1), 1)
           for n in modules if n in dims}
    measured = [v for v in raw.values() if v > 0]
    if not measured:
        log.warning("layer sensitivity: no gradient reached any layer; every layer weighs 1")
        return dict.fromkeys(names, 1.0)
    mean = sum(measured) / len(measured)
    out_w = {n: v / mean for n, v in raw.items()}
    fill = statistics.median(out_w.values())
    missing = [n for n in names if n not in out_w]
    if missing:
        log.info("layer sensitivity: %d layer(s) out of reach of module hooks (%s) get the "
                 "median weight %.3g", len(missing), ", ".join(missing[:5]), fill)
    return {n: max(out_w.get(n, fill), 1e-12) for n in names}


@dataclass(frozen=True)
class SlopeOptions:
    """Options of :func:`measure_slopes`.

    Attributes:
        calibration: The batches.
        plan: A resolved plan: each factored layer is truncated alone at its rank.
        errors: Per factored layer, its predicted relative output error at that rank.
        max_samples: Measure on the first batches up to this many samples.
        power: The weights are the slopes to this power (then normalized): the slope is
            measured at one rank, and the allocator then moves ranks far from it, where the
            linear picture overstates differences between layers. 0.5 measured best on the
            Fashion-MNIST nets (1 crushed the low-slope layers; ``bench/posttrain_quality.py``).
    """

    calibration: Iterable[Any]
    plan: Any
    errors: Mapping[str, float]
    max_samples: int = 256
    power: float = 0.5


@graph_pass(requires=["layers"], options=SlopeOptions)
def measure_slopes(gm: fx.GraphModule, ctx: PassContext) -> Mapping[str, float]:
    """Per layer, the measured slope of the model's relative output error over the layer's own
    predicted error (mean 1 over the plan's layers; the median for the others).

    Reads: :class:`SlopeOptions`, the layer facts and spectra (for the truncated weights).
    Writes nothing. Runs the graph in eval mode without gradients, with one layer replaced at a
    time (:class:`~lrfx.passes.analysis.replay.Replay`); no module is changed.
    """
    opts = ctx.option(SlopeOptions)
    feeds = []
    spec = get_graph_facts(gm).input_spec
    samples = 0
    for k, batch in enumerate(opts.calibration):
        if samples >= opts.max_samples:
            break
        feed = spec.feed(Inputs.of(batch, f"calibration batch {k}"))
        feeds.append(feed)
        first = next((t for t in tree_leaves(feed) if isinstance(t, torch.Tensor)), None)
        samples += int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    if not feeds:
        raise LrfxError("measured sensitivity needs at least one calibration batch")
    found = planned_layers(gm, opts.plan)
    names = [n for n in opts.plan.factored if n in found]
    slopes: dict[str, float] = {}
    with eval_mode(gm), torch.no_grad(), progress_bar(
            "layer sensitivity", len(names), enabled=ctx.progress) as advance:
        refs = [_output_tensor(Replay(gm, (), {}, {}).run(*f)) for f in feeds]
        for name in names:
            advance()
            modules, attrs = lowrank_overrides(gm, found, opts.plan, [name])
            predicted = opts.errors.get(name, 0.0)
            if (not modules and not attrs) or predicted <= 0:
                continue
            outs = [_output_tensor(Replay(gm, (), modules, attrs).run(*f)) for f in feeds]
            change = relative_error(refs, outs)
            if change == 0.0:  # the truncation could not be applied here: not measured
                log.info("measured sensitivity: truncating %r did not change the output; "
                         "it gets the median weight", name)
                continue
            slopes[name] = change / predicted
    every = []
    for node in gm.graph.nodes:
        nf = get_node_facts(node)
        every += [layer.name for layer in nf.layers] if nf is not None else []
    positive = [v for v in slopes.values() if v > 0]
    if not positive:
        log.warning("measured sensitivity: no truncation changed the output; every layer "
                    "weighs 1")
        return dict.fromkeys(every, 1.0)
    slopes = {n: v ** opts.power for n, v in slopes.items()}
    positive = [v for v in slopes.values() if v > 0]
    mean = sum(positive) / len(positive)
    weights = {n: max(v / mean, 1e-6) for n, v in slopes.items()}
    fill = statistics.median(weights.values())
    return {n: weights.get(n, fill) for n in dict.fromkeys(every)}
