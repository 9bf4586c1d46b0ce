"""Sequential calibration: fit every factored layer to the inputs the *compressed* model gives it.

The one-shot data-aware factors (:mod:`lrfx.passes.analysis.activations`) whiten each layer with
the statistics of its inputs in the *original* model. Once the layers before it are truncated,
a layer sees other inputs, and their errors add up through the depth. This pass walks the graph
in execution order, running every calibration batch through two copies of the network side by
side, node by node: the original, and the compressed prefix (the layers already fitted, with BN
statistics re-estimated on what they output). At each planned layer, with ``x`` its input in
the original and ``x~`` in the compressed model, it chooses the factors for the planned rank
that best reproduce the *original* output:

* ``svd`` and ``channel`` (one matrix unfolding): the closed form of
  :func:`~lrfx.decompositions.fit_low_rank`, ``min ||W x + b - (L x~ + b')||`` over rank-``r``
  ``L`` and, when the layer has a bias, ``b'`` (centered statistics; a layer without bias keeps
  none: a BatchNorm after it absorbs the mean once recalibrated);
* ``spatial``, ``tucker2``, ``cp``: the factors of the plan's spectra, then the last piece (the
  horizontal ``1 x kw`` conv, or the final ``1 x 1``) and the bias refit by least squares to the
  original output given what the pieces before it compute.

Layers it cannot run this way (inside leaf modules, functional ``F.linear`` / ``F.conv*``,
attention projections, one module called twice, module-mode captures) keep the factors of their
spectra; their low-rank weights are still what the compressed prefix computes, so the layers
after them correct for them.

The pass changes nothing: it returns the factors (:class:`Refit`), which
:func:`~lrfx.passes.rewrite.factorize` builds the layers from, and the output error each layer
has on the calibration data in the compressed model.

**Memory**: every calibration batch's live activations are held twice (original and compressed)
at once, as the walk goes node by node: about ``2 x calibration samples x`` the widest set of
live activations per sample (:func:`estimate_memory`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lrfx.decompositions import fit_low_rank, least_squares, unfold
from lrfx.errors import LrfxError, ShapeError
from lrfx.facts import LayerFacts, get_graph_facts
from lrfx.inputs import Inputs
from lrfx.layers import is_linear
from lrfx.modules import Factored, build_factored
from lrfx.passes.analysis.activations import BLOCK_ROWS, _pad_conv_input, _patches
from lrfx.passes.analysis.grams import patch_gram, patch_sums
from lrfx.passes.analysis.replay import (
    Replay,
    lowrank_overrides,
    planned_layers,
    relative_error,
)
from lrfx.pipeline import PassContext, graph_pass
from lrfx.plan import LayerPlan, RankPlan
from lrfx.progress import progress_bar
from lrfx.schemes import get_scheme
from lrfx.tracing import eval_mode

__all__ = ["Refit", "RefitOptions", "estimate_memory", "refit_factors"]

log = logging.getLogger(__name__)

_JOINT = ("svd", "channel")

#: The layers the walk fits (plain modules; subclasses with their own forward are kept).
_Layer = nn.Linear | nn.Conv1d | nn.Conv2d
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class RefitOptions:
    """Options of :func:`refit_factors`.

    Attributes:
        plan: The plan, resolved against this graph.
        calibration: The batches (each in any form :class:`~lrfx.inputs.Inputs` accepts).
        recalibrate: Re-estimate BatchNorm statistics of the compressed prefix as the walk
            passes them (as :func:`lrfx.recalibrate_bn` would on the finished model), so each
            layer is fitted to the normalized inputs it will see.
    """

    plan: RankPlan
    calibration: Sequence[Any]
    recalibrate: bool = True


@dataclass(frozen=True)
class Refit:
    """What :func:`refit_factors` found.

    Attributes:
        weights: Per refit layer, its factor weights in the scheme's layout order (float64).
        biases: Per refit layer, the bias of its last piece (``None``: the layer has none).
        errors: Per planned layer, its relative squared output error on the calibration data
            in the compressed model (against the original model's output of that layer).
        methods: Per planned layer, how its factors were chosen: ``joint`` (closed form),
            ``last`` (last piece refit), or ``spectra`` (kept; with the reason).
    """

    weights: Mapping[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    biases: Mapping[str, torch.Tensor | None] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)
    methods: Mapping[str, str] = field(default_factory=dict)


# --- statistics ----------------------------------------------------------------------------------


class _Moments:
    """Running ``sum a^T b`` (per group), ``sum a`` and ``sum b`` over rows, in float64."""

    def __init__(self) -> None:
        self.ab: torch.Tensor | None = None
        self.bb: torch.Tensor | None = None
        self.sa: torch.Tensor | None = None
        self.sb: torch.Tensor | None = None
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, groups: int = 1) -> None:
        """``a`` (rows, groups * da), ``b`` (rows, groups * db): rows are samples."""
        work = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        ga = a.to(work).reshape(a.shape[0], groups, -1).transpose(0, 1)
        gb = b.to(work).reshape(b.shape[0], groups, -1).transpose(0, 1)
        for start in range(0, ga.shape[1], BLOCK_ROWS):
            ba, bb = ga[:, start:start + BLOCK_ROWS], gb[:, start:start + BLOCK_ROWS]
            ab = (ba.transpose(1, 2) @ bb).double()
            b2 = (bb.transpose(1, 2) @ bb).double()
            self.ab = ab if self.ab is None else self.ab.add_(ab)
            self.bb = b2 if self.bb is None else self.bb.add_(b2)
        sa, sb = ga.double().sum(1), gb.double().sum(1)
        self.sa = sa if self.sa is None else self.sa.add_(sa)
        self.sb = sb if self.sb is None else self.sb.add_(sb)
        self.n += a.shape[0]

    def add_conv(self, m: nn.Module, x: torch.Tensor, xt: torch.Tensor) -> None:
        """:meth:`add` of the im2col patches of a conv's inputs ``x`` (``a``) and ``xt``
        (``b``), from their shift structure (:func:`patch_gram`): no patches are built."""
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        k, s, d = _conv_dims(m)
        xp, flat = _pad_conv_input(x.detach(), m)
        xtp, _ = _pad_conv_input(xt.detach(), m)
        if isinstance(m, nn.Conv1d):
            xp, xtp, flat = xp.unsqueeze(-2), xtp.unsqueeze(-2), [*flat, 0, 0]
        work = torch.float64 if torch.float64 in (x.dtype, xt.dtype) else torch.float32
        xp, xtp = xp.to(work), xtp.to(work)
        zeros = (flat[2], flat[3], flat[0], flat[1]) if m.padding_mode == "zeros" else (0,) * 4
        ab = patch_gram(xp, k, s, d, m.groups, y=xtp, pad=zeros)
        bb = patch_gram(xtp, k, s, d, m.groups, pad=zeros)
        assert isinstance(ab, torch.Tensor) and isinstance(bb, torch.Tensor)
        sa, sb = patch_sums(xp, k, s, d, m.groups), patch_sums(xtp, k, s, d, m.groups)
        self.ab = ab if self.ab is None else self.ab.add_(ab)
        self.bb = bb if self.bb is None else self.bb.add_(bb)
        self.sa = sa if self.sa is None else self.sa.add_(sa)
        self.sb = sb if self.sb is None else self.sb.add_(sb)
        h, w = xp.shape[-2:]
        self.n += xp.shape[0] * ((h - d[0] * (k[0] - 1) - 1) // s[0] + 1) * (
            (w - d[1] * (k[1] - 1) - 1) // s[1] + 1)

    def moments(self, centered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        """``(E[a b^T], E[b b^T], E[a], E[b])``, centered when asked, on the CPU."""
        assert self.ab is not None and self.bb is not None and self.sa is not None \
            and self.sb is not None
        n = max(self.n, 1)
        ab, bb = self.ab.cpu() / n, self.bb.cpu() / n
        ma, mb = self.sa.cpu() / n, self.sb.cpu() / n
        if centered:
            ab = ab - ma.unsqueeze(-1) * mb.unsqueeze(-2)
            bb = bb - mb.unsqueeze(-1) * mb.unsqueeze(-2)
        return ab, bb, ma, mb


def _conv_dims(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    assert isinstance(m, (nn.Conv1d, nn.Conv2d))
    if isinstance(m, nn.Conv1d):
        return (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
    return m.kernel_size, m.stride, m.dilation  # type: ignore[return-value]


def _padded(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """The conv's input as a padded 4-D batch (Conv1d as height 1)."""
    p, _ = _pad_conv_input(x, m)
    return p.unsqueeze(-2) if isinstance(m, nn.Conv1d) else p


def _rows(x: torch.Tensor, m: nn.Module, start: int, stop: int) -> torch.Tensor:
    """Input rows of samples ``start:stop``: the features of a Linear, the im2col patches of a
    conv (``(samples * positions, C * kh * kw)``)."""
    if is_linear(m):
        return x[start:stop].reshape(-1, x.shape[-1])
    return _patches(_padded(x[start:stop], m), *_conv_dims(m))


def _out_rows(y: torch.Tensor, m: nn.Module, start: int, stop: int) -> torch.Tensor:
    """Output rows of samples ``start:stop`` in the order of :func:`_rows`."""
    y = y[start:stop]
    if is_linear(m):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _chunks(n: int, per_sample: int) -> Iterator[tuple[int, int]]:
    per = max(1, BLOCK_ROWS // max(1, per_sample))
    for start in range(0, n, per):
        yield start, min(n, start + per)


def _positions(x: torch.Tensor, m: nn.Module) -> int:
    if is_linear(m):
        return math.prod(x.shape[1:-1]) if x.dim() > 1 else 1
    k, s, d = _conv_dims(m)
    p = _padded(x[:1], m)
    h = (p.shape[-2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w = (p.shape[-1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return h * w


def _batched(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """The input (or output) with a sample axis: unbatched calls get one sample."""
    unbatched = 1 if is_linear(m) else (2 if isinstance(m, nn.Conv1d) else 3)
    return x.unsqueeze(0) if x.dim() == unbatched else x


# --- fitting -------------------------------------------------------------------------------------


def _weight_mats(m: _Layer, groups: int) -> torch.Tensor:
    w = m.weight.detach().to("cpu", torch.float64)
    return w.unsqueeze(0) if is_linear(m) else unfold(w, "channel", groups)


def _fit_joint(m: _Layer, lp: LayerPlan, xs: Sequence[torch.Tensor],
               xts: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Both factors (and the bias) of an ``svd`` / ``channel`` layer in closed form."""
    groups = 1 if isinstance(m, nn.Linear) else m.groups
    mom = _Moments()
    for x, xt in zip(xs, xts, strict=True):
        x, xt = _batched(x, m), _batched(xt, m)
        if not is_linear(m):
            mom.add_conv(m, x, xt)
            continue
        for a, b in _chunks(x.shape[0], _positions(x, m)):
            mom.add(_rows(x, m, a, b), _rows(xt, m, a, b), groups)
    has_bias = m.bias is not None
    cross, cov, mean, mean_t = mom.moments(centered=has_bias)
    w = _weight_mats(m, groups)  # (g, N/g, d)
    (r,) = get_scheme(lp.scheme).ranks(lp.rank)  # type: ignore[arg-type]
    left, right = fit_low_rank(w, cross, cov, r)  # (g, N/g, r), (g, r, d)
    bias = None
    if has_bias:
        assert m.bias is not None
        shift = (w @ mean.unsqueeze(-1) - left @ (right @ mean_t.unsqueeze(-1))).reshape(-1)
        bias = m.bias.detach().to("cpu", torch.float64) + shift
    if is_linear(m):
        return (right[0], left[0]), bias
    n, cg, *k = m.weight.shape
    first = right.reshape(groups * r, cg, *k)
    second = left.reshape(n, r, *([1] * len(k)))
    return (first.contiguous(), second.contiguous()), bias


def _fit_last(f: Factored, ys: Sequence[torch.Tensor], xts: Sequence[torch.Tensor]) -> bool:
    """Refit the last piece of ``f`` (and its bias) by least squares so that ``f(x~)`` best
    matches ``y``; in place. ``False`` (nothing changed) when the last piece is grouped."""
    last = f[-1]
    if not isinstance(last, (nn.Linear, nn.Conv1d, nn.Conv2d)) or getattr(last, "groups", 1) != 1:
        return False
    head = nn.Sequential(*list(f)[:-1])
    mom = _Moments()
    with torch.no_grad():
        for y, xt in zip(ys, xts, strict=True):
            z = _batched(head(xt), last)
            y = _batched(y, last)
            for a, b in _chunks(z.shape[0], _positions(z, last)):
                mom.add(_out_rows(y, last, a, b), _rows(z, last, a, b))
    has_bias = last.bias is not None
    cross, cov, mean_y, mean_z = mom.moments(centered=has_bias)
    a_new = least_squares(cross, cov)[0]  # (N, r * kw)
    w = last.weight
    with torch.no_grad():
        w.copy_(a_new.reshape(w.shape).to(w))
        if has_bias:
            assert last.bias is not None
            last.bias.copy_((mean_y[0] - a_new @ mean_z[0]).to(last.bias))
    return True


def _bn_recalibrated(bn: nn.Module, xs: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``bn`` whose running statistics are the mean of the batches' means and unbiased
    variances (what :func:`lrfx.recalibrate_bn` computes with ``momentum=None``)."""
    new = copy.deepcopy(bn)
    assert isinstance(new, _BN)
    dims = [0, *range(2, xs[0].dim())]
    means = [x.float().mean(dims) for x in xs]
    vars_ = [x.float().var(dims, unbiased=True) if x.numel() // x.shape[1] > 1
             else torch.zeros_like(m) for x, m in zip(xs, means, strict=True)]
    assert new.running_mean is not None and new.running_var is not None
    new.running_mean.copy_(torch.stack(means).mean(0))
    new.running_var.copy_(torch.stack(vars_).mean(0))
    return new.eval()


def estimate_memory(gm: fx.GraphModule, samples: int) -> int:
    """Bytes the walk holds at most: twice (original and compressed) the largest sum of live
    activations over the graph, per sample (from the shapes pass), times ``samples``."""
    last: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            last[inp] = node
    live: dict[fx.Node, int] = {}
    peak = 0
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
        if shape is not None and len(shape) > 0:
            dtype = getattr(tm, "dtype", torch.float32)
            size = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            live[node] = size
        peak = max(peak, sum(live.values()))
        for inp in node.all_input_nodes:
            if last.get(inp) is node:
                live.pop(inp, None)
    return 2 * peak * samples


# --- the pass ------------------------------------------------------------------------------------


def _why_not(gm: fx.GraphModule, uses: list[tuple[fx.Node, LayerFacts]]) -> str | None:
    node, layer = uses[0]
    if len(uses) > 1:
        return "called more than once"
    if layer.inside_leaf is not None:
        return f"inside leaf {layer.inside_leaf}"
    if node.op != "call_module" or node.target != layer.name:
        return "a functional or attention layer"
    if layer.weight_effective:
        return "its forward transforms the weight"
    m = gm.get_submodule(layer.name)
    if type(m) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return f"a {type(m).__name__} (not a plain Linear/Conv)"
    return None


@graph_pass(requires=["layers", "shapes"], options=RefitOptions)
def refit_factors(gm: fx.GraphModule, ctx: PassContext) -> Refit:
    """Fit every planned layer to the compressed prefix's inputs (see the module docstring).

    Reads: :class:`RefitOptions` (plan, calibration batches), the layer facts and spectra.
    Writes nothing: returns a :class:`Refit` for :class:`~lrfx.passes.rewrite.FactorizeOptions`.
    Runs the graph in eval mode without gradients; no module or graph is changed.

    Raises:
        LrfxError: Module-mode capture (no graph to walk), or no calibration batch.
        ShapeError: A batch does not fit the model (names the batch and the node).
    """
    opts = ctx.option(RefitOptions)
    facts = get_graph_facts(gm)
    if facts.capture.mode == "module":
        raise LrfxError("sequential calibration walks the traced graph; this model was captured "
                        "in module mode. Use sequential=False")
    batches = list(opts.calibration)
    if not batches:
        raise LrfxError("sequential calibration needs at least one calibration batch")
    plan = opts.plan
    found = planned_layers(gm, plan)
    kept = {name: why for name, uses in found.items()
            if (why := _why_not(gm, uses)) is not None}
    modules, attrs = lowrank_overrides(gm, found, plan, kept)
    spec = facts.input_spec
    feeds = [spec.feed(Inputs.of(b, f"calibration batch {k}")) for k, b in enumerate(batches)]
    weights: dict[str, tuple[torch.Tensor, ...]] = {}
    biases: dict[str, torch.Tensor | None] = {}
    errors: dict[str, float] = {}
    methods: dict[str, str] = {n: f"spectra ({why})" for n, why in kept.items()}
    by_node = {uses[0][0]: name for name, uses in found.items() if name not in kept}
    nodes = list(gm.graph.nodes)
    with eval_mode(gm), torch.no_grad(), progress_bar(
            "sequential calibration", len(nodes), enabled=ctx.progress) as advance:
        orig = [Replay(gm, f, {}, {}) for f in feeds]
        work = [Replay(gm, f, modules, attrs) for f in feeds]
        for node in nodes:
            advance()
            name = by_node.get(node)
            if name is not None:
                m = gm.get_submodule(name)
                assert isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
                xs = [r.input_of(node) for r in orig]
                xts = [r.input_of(node) for r in work]
                lp = plan.factored[name]
                f = _fit(name, m, lp, found[name][0][1], xs, xts)
                weights[name] = tuple(p.get_parameter("weight").detach().to("cpu", torch.float64)
                                      for p in f)
                last_bias = f[-1].get_parameter("bias") if f[-1].bias is not None else None
                biases[name] = None if last_bias is None else \
                    last_bias.detach().to("cpu", torch.float64)
                methods[name] = "joint" if lp.scheme in _JOINT else "last"
                modules[name] = f
            elif opts.recalibrate and node.op == "call_module" \
                    and isinstance(mod := gm.get_submodule(str(node.target)), _BN) \
                    and mod.track_running_stats and mod.running_mean is not None:
                modules[str(node.target)] = _bn_recalibrated(
                    mod, [r.input_of(node) for r in work])
            outs = []
            for k, (o, w) in enumerate(zip(orig, work, strict=True)):
                try:
                    outs.append((o.step(node), w.step(node)))
                except ShapeError as exc:
                    raise ShapeError(exc.node, exc.target, exc.reason,
                                     inputs=f"calibration batch {k}") from exc
            if name is not None:
                errors[name] = relative_error(*zip(*outs, strict=True))
    return Refit(weights, biases, errors, methods)


def _fit(name: str, m: _Layer, lp: LayerPlan, layer: LayerFacts,
         xs: Sequence[torch.Tensor], xts: Sequence[torch.Tensor]) -> Factored:
    """The factored layer fitted to ``xts`` (compressed inputs) and ``m(xs)`` (original)."""
    g, rank = layer.geometry, lp.rank
    assert g is not None and rank is not None
    scheme = get_scheme(lp.scheme)
    w = m.get_parameter("weight")
    if lp.scheme in _JOINT:
        factors, bias = _fit_joint(m, lp, xs, xts)
    else:
        factors = tuple(scheme.factors(w.detach(), g, rank, spectra=layer.spectra))
        bias = None if m.bias is None else m.get_parameter("bias").detach()
    if bias is not None:
        bias = bias.to(w.dtype)
    f = build_factored(scheme.layout(g, rank), scheme=lp.scheme, rank=rank, weights=factors,
                       bias=bias, dtype=w.dtype, device=w.device, requires_grad=False, like=g)
    if lp.scheme not in _JOINT:
        ys = [m(x) for x in xs]
        if not _fit_last(f, ys, xts):
            log.info("%s: the last piece of its %s layout is grouped; not refit", name,
                     lp.scheme)
    return f.eval()
