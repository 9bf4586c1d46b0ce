"""The LC algorithm for rank selection (Idelbayev & Carreira-Perpiñán, CVPR 2020).

Learning (L) and compression (C) steps alternate on ``min L(W) + sum_l alpha * C_l(r_l)`` with
``W_l = Theta_l``, ``rank(Theta_l) <= r_l``, through an augmented Lagrangian whose ``mu`` grows:

* **L step** — a few epochs of *your* loss plus :meth:`LC.penalty`,
  ``sum_l mu/2 ||W_l - Theta_l - lambda_l/mu||^2``;
* **C step** (:meth:`LC.c_step`) — per layer, with ``M = W_l - lambda_l/mu`` and the singular
  values of its unfolding, the rank minimizing ``alpha * C_l(r) + mu/2 * err_l(r)`` (``err``: the
  relative squared truncation error of ``M``) and ``Theta_l`` its truncation; the candidates,
  costs and errors are those of the post-training allocators (:func:`build_options`), the choice
  is the ``lc`` allocator's — in the **penalty form** (``alpha=``) each layer independently
  (:func:`allocate_lagrangian`), in the **budgeted form** (``macs=`` / ``params=``) the exact
  multiple-choice knapsack that meets the budget (:func:`allocate_lc`), which is what bisecting
  ``alpha`` approximates;
* **multipliers** — ``lambda_l <- lambda_l - mu (W_l - Theta_l)``, then ``mu <- growth * mu``.

In your own loop, one L step being ``epochs_per_step`` epochs::

    lc = lrfx.LC(model, example_inputs, macs=0.3, mu0=1e-3, growth=1.25)
    for epoch in range(steps * lc.epochs_per_step):
        for x, y in data:
            optimizer.zero_grad()
            (criterion(model(x), y) + lc.penalty(model)).backward()
            optimizer.step()
        lc.end_epoch(model, epoch)      # a C step (and multiplier update) after each L step
    small = lc.finalize(model)          # the nested model Theta, factored

or ``lrfx.fit(model, data, epochs=..., callbacks=[lc])``. The paper restarts the L step's learning
rate each step (7e-4, x0.99 per epoch): that schedule is your optimizer's. The penalty is an
ordinary term of the loss, so AMP, any optimizer and DistributedDataParallel need nothing more
(every process runs the same C step on the same weights).

Afterwards fine-tune the factored model with :class:`ProductDecay` (weight decay on the product
of the factors, not on each factor) as the paper does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lrfx.api import apply
from lrfx.batches import split_batch
from lrfx.errors import LrfxError
from lrfx.methods._targets import Method, candidate_options, find_targets, unwrap, weights_of
from lrfx.modules import Factored
from lrfx.passes.allocation import (
    Candidate,
    allocate_lagrangian,
    allocate_lc,
    make_budget,
)
from lrfx.plan import LayerPlan, RankPlan
from lrfx.training import logits_of

__all__ = ["LC", "ProductDecay"]


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value <= 0:
        raise LrfxError(f"LC: {name} must be a positive number, got {value!r}")
    return float(value)


class LC(Method):
    """The LC rank-selection algorithm as hooks for your training loop.

    Args:
        model: The (pretrained) dense model; trained in place by your L steps.
        example_inputs: Inputs of the model (shapes, MACs, the final rewrite).
        macs, params: The budgeted form: the C step meets this budget (a fraction of the whole
            model's MACs / parameters, or an absolute count) exactly.
        alpha: The penalty form instead: the price of one unit of cost (the paper's lambda x
            1e-6; ResNet sweeps use 1e-9 to 3.2e-8 with MACs).
        cost: What ``alpha`` prices: ``macs`` (default) or ``params`` (storage).
        mu0, growth: The schedule ``mu_k = mu0 * growth**k`` (the paper's ResNets: 1e-3 and
            1.25 over 50 steps; VGG: 2e-5 and 1.2 over 60).
        epochs_per_step: Epochs of one L step (:meth:`end_epoch` runs a C step after each).
        layers: ``"all"`` (default: every conv and linear module), ``"paper"``, or selectors.
        exclude: Selectors of layers left alone.
        scheme: ``channel`` (default) or ``spatial`` unfolding of conv weights.
        monitor: Batches (with targets) on which the nested model ``Theta`` is evaluated after
            every C step; :meth:`finalize` then returns the best one (the paper keeps the best
            by training loss). ``None``: the last.
        criterion: ``criterion(output, targets)`` for ``monitor``; default cross-entropy.

    Attributes:
        targets, skipped: The layers compressed, and the other factorable layers with reasons.
        step: C steps done after the initial compression.
        mu: The current ``mu``.
        ranks: Each target's rank in ``Theta`` (``None``: dense, past break-even).
        history: One record per C step: step, mu, ranks, predicted MACs/params, monitor loss.

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                           torch.nn.Linear(32, 4))
        >>> lc = lrfx.LC(net, torch.randn(1, 16), macs=0.5)
        >>> lc.history[0]["macs"] <= 0.5 * 640
        True
        >>> lc.penalty(net).item() > 0
        True
    """

    name = "lc"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        macs: float | int | None = None,
        params: float | int | None = None,
        alpha: float | None = None,
        cost: str = "macs",
        mu0: float = 1e-3,
        growth: float = 1.25,
        epochs_per_step: int = 1,
        layers: Any = "all",
        exclude: Any = (),
        scheme: str = "channel",
        monitor: Iterable[Any] | None = None,
        criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        if alpha is not None:
            if macs is not None or params is not None:
                raise LrfxError("LC: give either alpha= (the penalty form) or a budget "
                                "(macs= or params=), not both")
            if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                    or not math.isfinite(alpha) or alpha < 0):
                raise LrfxError(f"LC: alpha must be a non-negative number, got {alpha!r}")
            if cost not in ("macs", "params"):
                raise LrfxError(f"LC: cost must be 'macs' or 'params', got {cost!r}")
        elif macs is None and params is None:
            raise LrfxError("LC: give a budget (macs=0.3, params=...) or the penalty form's "
                            "alpha=")
        self.mu0 = _positive(mu0, "mu0")
        self.growth = _positive(growth, "growth")
        if self.growth < 1:
            raise LrfxError(f"LC: growth must be at least 1 (mu grows), got {growth!r}")
        if (isinstance(epochs_per_step, bool) or not isinstance(epochs_per_step, int)
                or epochs_per_step < 1):
            raise LrfxError(f"LC: epochs_per_step must be a positive integer, got "
                            f"{epochs_per_step!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.alpha = None if alpha is None else float(alpha)
        self.epochs_per_step = epochs_per_step
        self.scheme = scheme
        self.monitor = None if monitor is None else list(monitor)
        self.criterion = criterion or (lambda out, y: F.cross_entropy(logits_of(out), y))
        self.targets, self.skipped, analysis = find_targets(
            model, example_inputs, scheme=scheme, layers=layers,
            exclude=exclude,
            method="LC")
        self._records = {t.name: analysis[t.name] for t in self.targets}
        self.metric = cost if alpha is not None else ("macs" if macs is not None else "params")
        self.total_macs, self.total_params = analysis.total_macs, analysis.total_params
        self.budget = None if alpha is not None else make_budget(
            macs, params, analysis.total_macs, analysis.total_params)
        total = self.total_macs if self.metric == "macs" else self.total_params
        self._fixed = total - sum(getattr(r, self.metric) for r in self._records.values())
        self.budget_setting = {"macs": macs, "params": params}
        self.step = 0
        self.epochs = 0
        self.mu = self.mu0
        self.ranks: dict[str, int | None] = {}
        self.history: list[dict[str, Any]] = []
        self.multipliers: dict[str, torch.Tensor] = {}
        self.theta: dict[str, torch.Tensor] = {}
        self.best: dict[str, Any] | None = None
        self._anchor: dict[str, torch.Tensor] = {}
        self._compress(self.model, update=False)  # the initial direct compression (lambda = 0)

    # --- the C step -------------------------------------------------------------------------------

    def _choose(self, options: Sequence[Any]) -> dict[str, Candidate]:
        if self.budget is None:
            assert self.alpha is not None
            choice, _ = allocate_lagrangian(options, 2.0 * self.alpha / self.mu)
        else:
            choice, _ = allocate_lc(options, self.budget, self._fixed)
        return choice

    @torch.no_grad()
    def _compress(self, model: nn.Module, update: bool) -> None:
        weights = weights_of(model, self.targets)
        shifted: dict[str, torch.Tensor] = {}  # M = W - lambda / mu
        svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for t, w in zip(self.targets, weights, strict=True):
            m = w.detach().to(torch.promote_types(w.dtype, torch.float32))
            lam = self.multipliers.get(t.name)
            if lam is not None:
                m = m - lam.to(m.device) / self.mu
            shifted[t.name], svds[t.name] = m, t.svd(m)
        values = {n: s for n, (_, s, _) in svds.items()}
        choice = self._choose(candidate_options(self.targets, self._records, self.metric, values))
        macs = self.total_macs - sum(r.macs for r in self._records.values())
        params = self.total_params - sum(r.params for r in self._records.values())
        for t, w in zip(self.targets, weights, strict=True):
            c = choice[t.name]
            if c.scheme == "dense":
                theta, rank = shifted[t.name], None
            else:
                rank = int(c.rank)  # type: ignore[arg-type]
                theta = t.truncation(svds[t.name], rank, w.shape)
            if update:  # lambda <- lambda - mu (W - Theta)
                self.multipliers[t.name] = (self.multipliers[t.name].to(w.device)
                                            - self.mu * (w.detach().to(theta.dtype) - theta))
            else:
                self.multipliers.setdefault(t.name, torch.zeros_like(theta))
            self.theta[t.name] = theta
            self.ranks[t.name] = rank
            macs += c.macs
            params += c.params
        record: dict[str, Any] = {"step": self.step, "mu": self.mu, "ranks": dict(self.ranks),
                                  "macs": int(macs), "params": int(params)}
        if update:
            self.step += 1
            self.mu = self.mu0 * self.growth ** self.step
        self._anchor = {n: self.theta[n] + self.multipliers[n] / self.mu for n in self.theta}
        if self.monitor is not None:
            record["monitor_loss"] = loss = self._monitor_loss(model)
            if self.best is None or loss <= self.best["monitor_loss"]:
                self.best = {**record, "theta": {n: v.clone() for n, v in self.theta.items()}}
        self.history.append(record)

    def c_step(self, model: nn.Module | None = None) -> dict[str, int | None]:
        """The C step at the current ``mu``, the multiplier update, and ``mu``'s growth.

        Returns:
            Each target's rank (``None``: dense).
        """
        self._compress(self._model(model), update=True)
        return dict(self.ranks)

    def _monitor_loss(self, model: nn.Module) -> float:
        inner = unwrap(model)
        overrides = {f"{t.name}.weight": self.theta[t.name].to(w.dtype)
                     for t, w in zip(self.targets, weights_of(inner, self.targets), strict=True)}
        was = inner.training
        inner.eval()
        total, count = 0.0, 0
        try:
            for k, batch in enumerate(self.monitor or ()):
                x, y = split_batch(batch, inner, "auto", f"LC monitor batch {k}")
                if y is None:
                    raise LrfxError("LC: monitor batches need targets ((inputs, targets) pairs)")
                args = x if isinstance(x, tuple) else (x,)
                out = functional_call(inner, overrides, args)
                total += float(self.criterion(out, y))
                count += 1
        finally:
            inner.train(was)
        if count == 0:
            raise LrfxError("LC: monitor holds no batch")
        return total / count

    # --- hooks ------------------------------------------------------------------------------------

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """``sum_l mu/2 ||W_l - Theta_l - lambda_l/mu||^2``: add it to the L step's loss."""
        total: torch.Tensor | None = None
        for t, w in zip(self.targets, weights_of(self._model(model), self.targets), strict=True):
            anchor = self._anchor[t.name]
            if anchor.device != w.device:
                anchor = self._anchor[t.name] = anchor.to(w.device)
            term = (w.to(anchor.dtype) - anchor).square().sum()
            total = term if total is None else total + term
        assert total is not None
        return 0.5 * self.mu * total

    def end_epoch(self, model: nn.Module | None = None, epoch: int | None = None) -> None:
        """Count the epoch; after every ``epochs_per_step`` epochs, :meth:`c_step`."""
        self.epochs += 1
        if self.epochs % self.epochs_per_step == 0:
            self.c_step(model)

    # --- the result -------------------------------------------------------------------------------

    def plan(self, which: str = "best") -> RankPlan:
        """The plan of the nested model (``best`` by monitor loss if monitored, else the last)."""
        ranks = self._pick(which)[0]
        entries = {t.name: LayerPlan("dense") if ranks[t.name] is None
                   else LayerPlan(t.scheme, int(ranks[t.name]))  # type: ignore[arg-type]
                   for t in self.targets}
        return RankPlan(entries, allocator="lc-train", settings=self.settings())

    def _pick(self, which: str) -> tuple[dict[str, int | None], dict[str, torch.Tensor]]:
        if which not in ("best", "last"):
            raise LrfxError(f"LC: which must be 'best' or 'last', got {which!r}")
        if which == "best" and self.best is not None:
            return self.best["ranks"], self.best["theta"]
        return self.ranks, self.theta

    def finalize(self, model: nn.Module | None = None, which: str = "best") -> nn.Module:
        """The nested model ``Theta`` factored at its ranks (dense past break-even), by
        :func:`lrfx.apply`; the other weights are the model's. The model is not modified."""
        inner = unwrap(self._model(model))
        theta = self._pick(which)[1]
        result = copy.deepcopy(inner)
        with torch.no_grad():
            for t, w in zip(self.targets, weights_of(result, self.targets), strict=True):
                w.copy_(theta[t.name].to(w.device, w.dtype))
        return apply(result, self.plan(which), self.example_inputs)

    # --- state ------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "cost": self.metric, **self.budget_setting,
                "mu0": self.mu0, "growth": self.growth, "epochs_per_step": self.epochs_per_step,
                "scheme": self.scheme, "layers": [t.name for t in self.targets]}

    def state_dict(self) -> dict[str, Any]:
        """Step, epoch, ``mu``, the multipliers and ``Theta`` (tensors), ranks, history and the
        best nested model so far."""
        return {"method": self.name, "step": self.step, "epochs": self.epochs, "mu": self.mu,
                "multipliers": dict(self.multipliers), "theta": dict(self.theta),
                "ranks": dict(self.ranks), "history": list(self.history), "best": self.best,
                "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            LrfxError: The state is of another method or of other settings.
        """
        self._check_state(state)
        self.step, self.epochs, self.mu = int(state["step"]), int(state["epochs"]), state["mu"]
        self.multipliers = dict(state["multipliers"])
        self.theta = dict(state["theta"])
        self.ranks = dict(state["ranks"])
        self.history = list(state["history"])
        self.best = state["best"]
        self._anchor = {n: self.theta[n] + self.multipliers[n] / self.mu for n in self.theta}

    def __repr__(self) -> str:
        form = f"alpha={self.alpha}" if self.budget is None else (
            f"{self.budget.metric}={self.budget.fraction:.3g}")
        return (f"LC({form}, mu={self.mu:.3g}, step {self.step}, {len(self.targets)} layers)")


class ProductDecay:
    """Weight decay on the dense weight a factored layer computes (``U V``), not on its
    factors: the fine-tuning penalty of the LC paper, ``weight_decay/2 * ||U V||^2`` summed over
    the :class:`~lrfx.modules.Factored` layers. Add :meth:`penalty` to the loss (or pass it to
    :func:`lrfx.fit` as a callback) and give the factors no other weight decay.

    Example:
        >>> import torch, lrfx
        >>> gm = lrfx.apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"0": ("svd", 2)},
        ...                 torch.randn(1, 8))
        >>> ProductDecay(1e-4).penalty(gm).item() > 0
        True
    """

    def __init__(self, weight_decay: float = 1e-4) -> None:
        if (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
                or not math.isfinite(weight_decay) or weight_decay < 0):
            raise LrfxError(f"ProductDecay: weight_decay must be a non-negative number, got "
                            f"{weight_decay!r}")
        self.weight_decay = float(weight_decay)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        terms = [m.weight.square().sum() for m in unwrap(model).modules()
                 if isinstance(m, Factored)]
        if not terms:
            return None
        return 0.5 * self.weight_decay * torch.stack(terms).sum()
