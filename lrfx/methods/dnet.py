"""Decomposable-Net (Yaguchi et al., 2019/2021): one set of weights that works at any size.

Every step trains the full-rank network and a low-rank one drawn at random from the same
weights: ``rho ~ U[0.01, 0.25]``, every target layer truncated to the rank the global
singular-value criterion gives (the top ``rho`` of all layers' pooled singular values, at least
``rank_min`` per layer; :func:`global_sigma_ranks`), the low-rank loss backpropagated through the
truncation (:func:`lrfx.decompositions.project_matrix`, its exact derivative with the ratio
across the cut clipped at 0.99), each layer's low-rank gradient rescaled to the norm of its
full-rank gradient, and ``g = 0.5 g_full + 0.5 g_low`` left for the optimizer (its weight decay
is yours: the paper's 5e-4 with Nesterov SGD). The two networks share BatchNorm's affine
parameters; the low-rank one keeps its own running statistics.

Afterwards the trained weights are truncated to **any** size without retraining —
:meth:`DecomposableNet.finalize` for one budget, :meth:`DecomposableNet.sizes` for several —
and BatchNorm statistics are recomputed on a few training batches.

In your own loop the method replaces ``loss.backward()`` (it needs the batch twice)::

    dnet = lrfx.DecomposableNet(model, example_inputs)
    for x, y in data:
        optimizer.zero_grad()
        loss_full, loss_low = dnet.backward(model, x, y)   # both passes, gradients combined
        optimizer.step()
    small = dnet.finalize(model, macs=0.3, calibration=some_training_batches)

or ``lrfx.fit(model, data, callbacks=[dnet])`` (``fit`` lets a callback's ``backward`` replace its
own). Under ``DistributedDataParallel`` pass the wrapped model: the full pass goes through it, the
low-rank gradients are averaged across processes by the method, and every process draws the same
``rho`` (same ``seed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from lrfx.api import allocate, analyze, apply, recalibrate_bn
from lrfx.decompositions import project_matrix
from lrfx.errors import LrfxError
from lrfx.methods._targets import Method, find_targets, plan_of, unwrap, weights_of
from lrfx.passes.allocation import global_sigma_ranks
from lrfx.plan import RankPlan
from lrfx.training import logits_of

__all__ = ["DecomposableNet"]

log = logging.getLogger(__name__)

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


class DecomposableNet(Method):
    """Decomposable-Net training as one call per batch, and deployment at any size.

    Args:
        model: The dense model (trained in place).
        example_inputs: Inputs of the model (shapes, MACs, the final rewrite).
        rho: The range ``(low, high)`` the kept fraction of singular values is drawn from each
            step (default the paper's ``(0.01, 0.25)``).
        rank_min: Smallest rank of any layer (default 5).
        scheme: ``channel`` (default) or ``spatial`` unfolding of conv weights.
        layers: ``"all"`` (default: every conv and linear module, the classifier included, as in
            the paper), ``"paper"`` (TRP's choice) or selectors.
        exclude: Selectors of layers left alone.
        full_weight: Weight of the full-rank gradient (the low-rank one gets the rest; 0.5).
        rescale: Rescale each layer's low-rank gradient to its full-rank gradient's norm.
        clip: Bound on ``(s_dropped / s_kept)^2`` in the truncation's gradient (0.99; ``None``:
            exact).
        seed: Seed of the ``rho`` draws (every process of a distributed run must use the same).
        criterion: ``criterion(output, targets)``; default cross-entropy of the logits.

    Attributes:
        targets, skipped: The layers truncated, and the other factorable layers with reasons.
        step: Batches trained.
        last: ``{"rho", "ranks", "loss_full", "loss_low"}`` of the last batch.

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                           torch.nn.Linear(32, 4))
        >>> dnet = lrfx.DecomposableNet(net, torch.randn(1, 16), rank_min=2)
        >>> full, low = dnet.backward(net, torch.randn(8, 16), torch.randint(0, 4, (8,)))
        >>> sorted(dnet.last["ranks"].values()) >= [2, 2]
        True
    """

    name = "dnet"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        rho: tuple[float, float] = (0.01, 0.25),
        rank_min: int = 5,
        scheme: str = "channel",
        layers: Any = "all",
        exclude: Any = (),
        full_weight: float = 0.5,
        rescale: bool = True,
        clip: float | None = 0.99,
        seed: int = 0,
        criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        try:
            lo, hi = (float(v) for v in rho)
        except (TypeError, ValueError):
            raise LrfxError(f"DecomposableNet: rho must be a (low, high) pair of fractions, got "
                            f"{rho!r}") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise LrfxError(f"DecomposableNet: rho must satisfy 0 < low <= high <= 1, got "
                            f"{rho!r}")
        if isinstance(rank_min, bool) or not isinstance(rank_min, int) or rank_min < 1:
            raise LrfxError(f"DecomposableNet: rank_min must be a positive integer, got "
                            f"{rank_min!r}")
        if (isinstance(full_weight, bool) or not isinstance(full_weight, (int, float))
                or not 0.0 <= full_weight <= 1.0):
            raise LrfxError(f"DecomposableNet: full_weight must be in [0, 1], got "
                            f"{full_weight!r}")
        if clip is not None and not 0.0 < clip < 1.0:
            raise LrfxError(f"DecomposableNet: clip must be in (0, 1) or None, got {clip!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.rho = (lo, hi)
        self.rank_min = rank_min
        self.scheme = scheme
        self.full_weight = float(full_weight)
        self.rescale = bool(rescale)
        self.clip = clip
        self.seed = int(seed)
        self.criterion = criterion or (lambda out, y: F.cross_entropy(logits_of(out), y))
        self.targets, self.skipped, _ = find_targets(
            model, example_inputs, scheme=scheme, layers=layers,
            exclude=exclude,
            method="DecomposableNet")
        inner = unwrap(model)
        #: The low-rank network's BatchNorm running statistics (``"bn.running_mean"``...).
        self.bn_stats: dict[str, torch.Tensor] = {}
        for name, m in inner.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                for b in _STATS:
                    buf = getattr(m, b, None)
                    if isinstance(buf, torch.Tensor):
                        self.bn_stats[f"{name}.{b}"] = buf.detach().clone()
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = 0
        self.last: dict[str, Any] = {}

    # --- the criterion ----------------------------------------------------------------------------

    def ranks_at(self, rho: float, model: nn.Module | None = None) -> dict[str, int]:
        """Each target's rank when the top ``rho`` of all singular values are kept."""
        values = {}
        with torch.no_grad():
            for t, w in zip(self.targets, weights_of(self._model(model), self.targets),
                            strict=True):
                s = torch.linalg.svdvals(t.matrices(w.detach().float()))
                values[t.name] = s.amax(dim=0).cpu().numpy()
        return global_sigma_ranks(values, rho, self.rank_min)

    # --- training ---------------------------------------------------------------------------------

    def backward(self, model: nn.Module | None, inputs: Any, targets: Any,
                 criterion: Callable[[Any, Any], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward the full-rank and a random low-rank network on one batch, and
        leave the combined gradient in ``.grad`` for the optimizer.

        Args:
            model: The model (or its ``DistributedDataParallel`` wrapper); ``None``: the one
                the method was built with.
            inputs: The model's inputs (a tensor, a tuple of positional inputs or a dict).
            targets: What ``criterion`` compares the output with.
            criterion: Overrides the method's criterion for this call.

        Returns:
            The full-rank and the low-rank loss (detached).
        """
        model = self._model(model)
        inner = unwrap(model)
        crit = criterion or self.criterion
        args, kwargs = _call_args(inputs)
        loss_full = crit(model(*args, **kwargs), targets)
        loss_full.backward()
        params = [p for p in inner.parameters() if p.requires_grad]
        full = [p.grad for p in params]
        for p in params:
            p.grad = None

        weights = weights_of(inner, self.targets)
        rho = self.rho[0] + (self.rho[1] - self.rho[0]) * float(
            torch.rand((), generator=self.generator))
        svds = {}
        values: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for t, w in zip(self.targets, weights, strict=True):
                svds[t.name] = t.svd(w)
                values[t.name] = svds[t.name][1].amax(dim=0).cpu().numpy()
        ranks = global_sigma_ranks(values, rho, self.rank_min)
        overrides: dict[str, torch.Tensor] = {}
        for t, w in zip(self.targets, weights, strict=True):
            mats = t.matrices(w.to(svds[t.name][0].dtype))
            trunc = project_matrix(mats, ranks[t.name], clip=self.clip, svd=svds[t.name])
            overrides[f"{t.name}.weight"] = t.fold(trunc, w.shape).to(w.dtype)
        for key, buf in self.bn_stats.items():
            device = weights[0].device
            if buf.device != device:
                buf = self.bn_stats[key] = buf.to(device)
            overrides[key] = buf
        loss_low = crit(functional_call(inner, overrides, args, kwargs), targets)
        loss_low.backward()

        low = [p.grad for p in params]
        if isinstance(model, nn.parallel.DistributedDataParallel) and dist.is_initialized():
            self._average(low)
        target_ids = {id(w) for w in weights}
        for p, gf, gl in zip(params, full, low, strict=True):
            if gl is not None and gf is not None and self.rescale and id(p) in target_ids:
                gl = gl * (gf.norm() / gl.norm().clamp_min(torch.finfo(gl.dtype).tiny))
            if gf is None or gl is None:
                part = gf if gl is None else gl
                weight = self.full_weight if gl is None else 1.0 - self.full_weight
                p.grad = None if part is None else weight * part
            else:
                p.grad = self.full_weight * gf + (1.0 - self.full_weight) * gl
        self.step += 1
        self.last = {"rho": rho, "ranks": ranks, "loss_full": loss_full.item(),
                     "loss_low": loss_low.item()}
        return loss_full.detach(), loss_low.detach()

    @staticmethod
    def _average(grads: Sequence[torch.Tensor | None]) -> None:
        present = [g for g in grads if g is not None]
        if not present:
            return
        flat = torch.cat([g.reshape(-1) for g in present])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in present:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # --- deployment at any size -------------------------------------------------------------------

    def plan(self, model: nn.Module | None = None, *, macs: float | int | None = None,
             params: float | int | None = None, rho: float | None = None) -> RankPlan:
        """The plan of one size: a MACs or parameter budget (``rho`` bisected by the
        ``global_sigma`` allocator), or a kept fraction ``rho`` of the singular values. Layers
        past break-even stay dense."""
        inner = unwrap(self._model(model))
        if (rho is None) == (macs is None and params is None):
            raise LrfxError("DecomposableNet: give the size as macs=, params= or rho=")
        if rho is not None:
            if not 0.0 < rho <= 1.0:
                raise LrfxError(f"DecomposableNet: rho must be in (0, 1], got {rho!r}")
            return plan_of(self.targets, self.ranks_at(rho, inner), "dnet",
                           {"rho": rho, "rank_min": self.rank_min})
        names = {t.name for t in self.targets}
        analysis = analyze(inner, self.example_inputs)
        others = [r.name for r in analysis.factorable if r.name not in names]
        plan, _ = allocate(analysis, macs=macs, params=params, allocator="global_sigma",
                           scheme=self.scheme, exclude=others, rank_min=self.rank_min)
        return plan

    def finalize(self, model: nn.Module | None = None, *, macs: float | int | None = None,
                 params: float | int | None = None, rho: float | None = None,
                 calibration: Iterable[Any] | None = None, inputs: Any = "auto") -> nn.Module:
        """The model at one size: truncated and factored (:func:`lrfx.apply`), then BatchNorm
        statistics recomputed on ``calibration`` (training batches; the paper's deployment).
        Without ``calibration`` the low-rank network's running statistics from training are used
        (averaged over the sizes drawn; less accurate). The model is not modified."""
        inner = unwrap(self._model(model))
        plan = self.plan(inner, macs=macs, params=params, rho=rho)
        result = apply(inner, plan, self.example_inputs)
        if calibration is not None:
            recalibrate_bn(result, calibration, inputs=inputs)
        elif self.bn_stats:
            log.warning("DecomposableNet.finalize without calibration: using the low-rank "
                        "network's running BatchNorm statistics from training; pass "
                        "calibration=<a few training batches> to recompute them for this size")
            with torch.no_grad():
                for key, buf in self.bn_stats.items():
                    module, _, attr = key.rpartition(".")
                    try:
                        getattr(result.get_submodule(module), attr).copy_(buf)
                    except AttributeError:
                        continue
        return result

    def sizes(self, model: nn.Module | None = None, *, macs: Sequence[float | int] = (),
              params: Sequence[float | int] = (), calibration: Iterable[Any] | None = None,
              inputs: Any = "auto") -> dict[tuple[str, float | int], nn.Module]:
        """Several sizes from the one trained model: ``{("macs", 0.3): model, ...}``."""
        batches = None if calibration is None else list(calibration)
        out: dict[tuple[str, float | int], nn.Module] = {}
        for b in macs:
            out[("macs", b)] = self.finalize(model, macs=b, calibration=batches, inputs=inputs)
        for b in params:
            out[("params", b)] = self.finalize(model, params=b, calibration=batches,
                                               inputs=inputs)
        return out

    # --- state ------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"rho": list(self.rho), "rank_min": self.rank_min, "scheme": self.scheme,
                "full_weight": self.full_weight, "rescale": self.rescale, "clip": self.clip,
                "seed": self.seed, "layers": [t.name for t in self.targets]}

    def state_dict(self) -> dict[str, Any]:
        """Step, the ``rho`` generator's state, the low-rank BatchNorm statistics, settings."""
        return {"method": self.name, "step": self.step,
                "generator": self.generator.get_state(), "bn_stats": dict(self.bn_stats),
                "last": dict(self.last), "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            LrfxError: The state is of another method or of other settings.
        """
        self._check_state(state)
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.bn_stats = {k: v.clone() for k, v in state["bn_stats"].items()}
        self.last = dict(state.get("last", {}))

    def __repr__(self) -> str:
        return (f"DecomposableNet(rho={self.rho}, rank_min={self.rank_min}, "
                f"{len(self.targets)} layers, step {self.step})")

