"""Network slimming as hooks for your training loop: sparsity penalties on channel scales.

A :class:`Slimming` object penalizes the scale factors of the model's prunable channel groups
(:func:`lrfx.channel_groups`): BatchNorm ``gamma`` (Liu et al. 2017) and the rank gates of a
factored model (:func:`lrfx.add_rank_gates`), with the l1, lp or transformed-l1 penalty of Bui et
al. (2020) (:class:`lrfx.methods.penalties.Penalty`), as a subgradient added after ``backward``
or as a proximal step after ``optimizer.step()``. ``finalize`` turns the learned scales into a
channel plan (:func:`lrfx.channel_plan`: a global threshold, or a MACs / parameters budget) and
prunes structurally (:func:`lrfx.apply`); rank gates are folded into their factors, so a pruned
gate is a lower rank.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from lrfx.api import apply, channel_groups, channel_plan
from lrfx.errors import LrfxError
from lrfx.facts import get_graph_facts, update_graph_facts
from lrfx.methods._targets import Method, unwrap
from lrfx.methods.penalties import Penalty
from lrfx.modules import Factored, Gate
from lrfx.passes.rewrite.gates import fold_gates
from lrfx.pipeline import PassContext
from lrfx.plan import RankPlan

__all__ = ["Slimming"]

log = logging.getLogger(__name__)

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FORMS = ("subgradient", "prox")
_SCALES = ("all", "bn", "gates")


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


class Slimming(Method):
    """Network slimming with l1 / lp / transformed-l1 penalties, inside your own loop.

    Args:
        model: The model being trained (trained in place; ``finalize`` returns a pruned copy).
        example_inputs: Inputs of the model (shapes for the channel analysis and the rewrite).
        penalty: ``l1`` (network slimming), ``lp`` or ``tl1`` (transformed l1, Bui et al.).
        s: The penalty's weight (1e-4, the paper's VGG value; 1e-5 for ResNets there).
        a: Tl1's parameter (1).
        p: lp's exponent (0.5).
        eps: lp's subgradient uses ``|x|`` clamped at ``eps`` (1e-3; see
            :class:`~lrfx.methods.penalties.Penalty`).
        form: ``subgradient`` (add ``s * P'(x)`` to each scale's gradient in
            ``after_backward``) or ``prox`` (replace each scale by its proximal point after
            ``optimizer.step()``; needs the step size: ``optimizer=`` or ``lr=``).
        optimizer: The optimizer, to read each scale's current learning rate (prox form).
        lr: A fixed step size for the prox form instead.
        init: Set every BatchNorm scale to this value now (the paper: 0.5); ``None`` leaves them.
        scales: ``all`` (BatchNorm scales and rank gates), ``bn`` or ``gates``.

    Any optimizer, any device (the penalty is elementwise on the scales' own device and dtype);
    under AMP call ``after_backward`` after ``scaler.unscale_(optimizer)``, so the subgradient
    lands on unscaled gradients. Pass the wrapped model of ``DistributedDataParallel``: the
    scales are found inside it, and every process applies the same step to the same averaged
    gradients.

    Attributes:
        scales: The names of the penalized modules (BatchNorms / gates), in graph order.
        skipped: Other BatchNorms / gates and why they are not penalized (their channels cannot
            be pruned).
        step: Optimizer steps seen.

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> slim = lrfx.Slimming(net, torch.randn(1, 3, 12, 12), penalty="tl1", s=1e-4)
        >>> slim.scales
        ['1']
    """

    name = "slimming"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        penalty: str = "l1",
        s: float = 1e-4,
        a: float = 1.0,
        p: float = 0.5,
        eps: float = 1e-3,
        form: str = "subgradient",
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        init: float | None = None,
        scales: str = "all",
    ) -> None:
        self.penalty_fn = Penalty(kind=penalty, s=s, a=a, p=p, eps=eps)
        if form not in _FORMS:
            raise LrfxError(f"Slimming: form must be one of {', '.join(_FORMS)}, got {form!r}")
        if scales not in _SCALES:
            raise LrfxError(f"Slimming: scales must be one of {', '.join(_SCALES)}, got "
                            f"{scales!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or lr < 0):
            raise LrfxError(f"Slimming: lr must be a non-negative step size, got {lr!r}")
        if form == "prox" and optimizer is None and lr is None:
            raise LrfxError("Slimming: form='prox' needs the step size of each proximal step: "
                            "pass optimizer= (its current lr is read) or lr=")
        self.model = model
        self.example_inputs = example_inputs
        self.form = form
        self.optimizer = optimizer
        self.lr = None if lr is None else float(lr)
        self.kind = scales
        self.step = 0
        inner = unwrap(model)
        groups = channel_groups(inner, example_inputs)
        wanted = (_BNS, Gate) if scales == "all" else (_BNS,) if scales == "bn" else (Gate,)
        found: dict[str, str] = {}
        for g in groups:
            for m in g.members:
                if m.role == "norm" and isinstance(inner.get_submodule(m.target), wanted):
                    found.setdefault(m.target, g.reason)
        self.scales = [n for n, why in found.items() if not why]
        self.skipped = {n: why for n, why in found.items() if why}
        for n in self.scales:
            if getattr(inner.get_submodule(n), "weight", None) is None:
                raise LrfxError(f"Slimming: {n} has no scale to penalize (affine=False); "
                                "build it with affine=True")
        if not self.scales:
            raise LrfxError(
                f"Slimming: the model has no {'BatchNorm or gate' if scales == 'all' else scales}"
                " scale on a prunable channel group"
                + (f" (skipped: {self.skipped})" if self.skipped else "")
                + "; add BatchNorm after the layers, or rank gates (lrfx.add_rank_gates) to a "
                "factored model")
        if init is not None:
            with torch.no_grad():
                for n in self.scales:
                    mod = inner.get_submodule(n)
                    if isinstance(mod, _BNS):
                        mod.weight.fill_(float(init))
        self.init = init

    def _weights(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        inner = unwrap(self._model(model))
        try:
            return [_weight(inner.get_submodule(n)) for n in self.scales]
        except AttributeError as exc:
            raise LrfxError(f"Slimming: the model has no {exc}; pass the model the method was "
                            "built for") from None

    # --- hooks ------------------------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self, model: nn.Module | None = None) -> None:
        """Subgradient form: add ``s * P'(gamma)`` to every scale's gradient."""
        if self.form != "subgradient":
            return
        for w in self._weights(model):
            g = self.penalty_fn.subgradient(w.detach())
            if w.grad is None:
                w.grad = g.to(w.dtype)
            else:
                w.grad.add_(g.to(w.grad.dtype))

    @torch.no_grad()
    def after_step(self, model: nn.Module | None = None) -> None:
        """Count the step; prox form: replace every scale by its proximal point."""
        self.step += 1
        if self.form != "prox":
            return
        for w in self._weights(model):
            w.copy_(self.penalty_fn.prox(w.detach(), self._lr_of(w)))

    def _lr_of(self, w: torch.Tensor) -> float:
        if self.lr is not None:
            return self.lr
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            if any(q is w for q in group["params"]):
                return float(group["lr"])
        raise LrfxError("Slimming: a penalized scale is not in the optimizer given; give the "
                        "optimizer that trains the model (or lr=)")

    def value(self, model: nn.Module | None = None) -> float:
        """The penalty ``s * sum P(x)`` over every scale now (for logging)."""
        with torch.no_grad():
            return float(sum(float(self.penalty_fn.value(w.detach()))
                             for w in self._weights(model)))

    def sparsity(self, model: nn.Module | None = None, tol: float = 1e-3) -> float:
        """The fraction of scales with ``|x| <= tol``."""
        ws = [w.detach().abs().flatten() for w in self._weights(model)]
        allw = torch.cat(ws)
        return float((allw <= tol).float().mean())

    # --- the result -------------------------------------------------------------------------------

    def plan(self, model: nn.Module | None = None, *, percent: float | None = None,
             macs: float | None = None, params: float | None = None,
             min_channels: int = 1, normalize: str = "none") -> RankPlan:
        """The channel plan :meth:`finalize` applies (:func:`lrfx.channel_plan` on the scales;
        ``percent=0.5`` when no budget is given; ``normalize="mean"`` ranks each scale against
        its own layer's mean). The model is not modified."""
        if percent is None and macs is None and params is None:
            percent = 0.5
        inner = unwrap(self._model(model))
        plan = channel_plan(inner, self.example_inputs, percent=percent, macs=macs,
                            params=params, scales=self.kind, min_channels=min_channels,
                            normalize=normalize)
        return RankPlan(plan.layers, allocator="slimming",
                        settings={**plan.settings, **self.settings()},
                        macs=plan.macs, params=plan.params)

    def finalize(self, model: nn.Module | None = None, *, percent: float | None = None,
                 macs: float | None = None, params: float | None = None,
                 min_channels: int = 1, normalize: str = "none") -> nn.Module:
        """The pruned model: :meth:`plan`, applied by :func:`lrfx.apply`, rank gates folded into
        their factors (so a factored layer's rank is what its gates kept). The model being
        trained is not modified."""
        inner = unwrap(self._model(model))
        plan = self.plan(inner, percent=percent, macs=macs, params=params,
                         min_channels=min_channels, normalize=normalize)
        result = apply(copy.deepcopy(inner), plan, self.example_inputs)
        if isinstance(result, fx.GraphModule) and any(
                isinstance(m, Gate) for m in result.modules()):
            fold_gates(result, PassContext())
            # the rank each factored layer kept, next to the channel entries that lowered it
            facts = get_graph_facts(result)
            done = facts.plan if facts.plan is not None else plan
            ranks = {path: (list(m.rank) if isinstance(m.rank, tuple) else m.rank)
                     for path, m in result.named_modules() if isinstance(m, Factored)}
            update_graph_facts(result, plan=RankPlan(
                done.layers, allocator=done.allocator,
                settings={**done.settings, "ranks": ranks}, macs=done.macs, params=done.params))
        return result

    # --- state ------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"penalty": self.penalty_fn.to_dict(), "form": self.form, "scales": self.kind,
                "init": self.init, "layers": list(self.scales)}

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the settings (checkpoint it with the model and optimizer)."""
        return {"method": self.name, "step": self.step, "settings": self.settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            LrfxError: The state is of another method or of other settings.
        """
        self._check_state(state)
        self.step = int(state["step"])

    def __repr__(self) -> str:
        pen = self.penalty_fn
        extra = {"tl1": f", a={pen.a}", "lp": f", p={pen.p}"}.get(pen.kind, "")
        return (f"Slimming({pen.kind}, s={pen.s}{extra}, form={self.form!r}, "
                f"{len(self.scales)} scales, step {self.step})")
