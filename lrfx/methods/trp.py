"""Trained Rank Pruning (Xu et al., 2019): train the dense model while pushing it toward low rank.

Every ``every`` optimizer steps each target weight is replaced by its truncation to the rank the
energy criterion picks (channel- or spatial-wise unfolding), and at every step the subgradient of
the nuclear norm of the kept part, ``lambda_nuc * U_k V_k^T``, is added to the weight's
gradient. At the end the weights are factored at those ranks, with no fine-tuning: the factored
model computes what the projected dense model computed.

In your own loop::

    trp = lrfx.TRP(model, example_inputs)           # energy 0.9, every step, lambda_nuc 3e-4
    for x, y in data:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        trp.after_backward(model)                   # adds the nuclear-norm subgradient
        optimizer.step()
        trp.after_step(model)                       # projects every `every` steps
    small = trp.finalize(model)                     # a factored GraphModule

or ``lrfx.fit(model, data, callbacks=[trp])``. With AMP's ``GradScaler`` call
``scaler.unscale_(optimizer)`` before ``after_backward`` (the subgradient is added to unscaled
gradients). Under ``DistributedDataParallel`` pass the wrapped or the inner model: gradients are
already averaged when ``after_backward`` runs, and every process projects the same weights the
same way, so the replicas stay identical.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from lrfx.api import apply
from lrfx.decompositions import Spectrum
from lrfx.errors import LrfxError
from lrfx.methods._targets import (
    Method,
    candidate_options,
    find_targets,
    plan_of,
    unwrap,
    weights_of,
)
from lrfx.passes.allocation import allocate_energy, fill_budget, make_budget
from lrfx.plan import RankPlan

__all__ = ["TRP"]


class TRP(Method):
    """Trained Rank Pruning as hooks for your training loop.

    Args:
        model: The dense model being trained (it is trained in place; ``finalize`` returns the
            factored copy).
        example_inputs: Inputs of the model (shapes for the analysis and the final rewrite).
        energy: Rank rule: the smallest rank keeping this fraction of the squared singular
            values (default 0.9, the paper's).
        macs, params: A budget instead (a fraction of the whole model's MACs / parameters, or
            an absolute count): at every projection the energy is the largest one whose ranks
            fit (the ``energy`` allocator with a budget, one energy for every layer, what is
            left of the budget filled greedily as :func:`lrfx.allocate` does; a layer past
            break-even is left unprojected).
        value: Instead of ``energy``: keep the singular values ``>= value`` (the paper's
            deploy-time rule; 0.05 there).
        every: Project every this many optimizer steps (the paper's ``m``; 1 by default).
        lambda_nuc: Weight of the nuclear-norm subgradient (default 3e-4; 0 turns it off).
        scheme: ``channel`` (default) or ``spatial`` unfolding of conv weights.
        layers: ``"paper"`` (convs with a kernel larger than 1x1 except the first; no linear
            layer — the paper's choice), ``"all"``, or selectors (names, globs, module types).
        exclude: Selectors of layers to leave alone.

    Attributes:
        targets: The layers trained low-rank, in graph order.
        skipped: The other factorable layers and why they are left alone.
        step: Optimizer steps seen (``after_step`` calls).
        ranks: Each target's rank at its last projection.

    Example:
        >>> import torch, lrfx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 8, 3))
        >>> trp = lrfx.TRP(net, torch.randn(1, 3, 12, 12))
        >>> [t.name for t in trp.targets]
        ['2']
        >>> ranks = trp.project(net)
        >>> ranks["2"] <= 8
        True
    """

    name = "trp"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        energy: float | None = None,
        value: float | None = None,
        macs: float | int | None = None,
        params: float | int | None = None,
        every: int = 1,
        lambda_nuc: float = 3e-4,
        scheme: str = "channel",
        layers: Any = "paper",
        exclude: Any = (),
    ) -> None:
        budgeted = macs is not None or params is not None
        if sum(x is not None for x in (energy, value)) + budgeted > 1:
            raise LrfxError("TRP: give one rank rule: energy=, value= or a budget (macs= or "
                            "params=)")
        if energy is None:
            energy = 0.9
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (
                0.0 < energy <= 1.0):
            raise LrfxError(f"TRP: energy must be in (0, 1], got {energy!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise LrfxError(f"TRP: value must be a positive singular-value threshold, got "
                            f"{value!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise LrfxError(f"TRP: every must be a positive number of steps, got {every!r}")
        if (isinstance(lambda_nuc, bool) or not isinstance(lambda_nuc, (int, float))
                or not math.isfinite(lambda_nuc) or lambda_nuc < 0):
            raise LrfxError(f"TRP: lambda_nuc must be a non-negative number, got {lambda_nuc!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.energy = float(energy)
        self.value = None if value is None else float(value)
        self.every = every
        self.lambda_nuc = float(lambda_nuc)
        self.scheme = scheme
        self.targets, self.skipped, analysis = find_targets(
            model, example_inputs, scheme=scheme, layers=layers,
            exclude=exclude,
            method="TRP")
        self._records = {t.name: analysis[t.name] for t in self.targets}
        self.budget_setting = {"macs": macs, "params": params}
        self.budget = None
        if budgeted:
            self.budget = make_budget(macs, params, analysis.total_macs, analysis.total_params)
            self._fixed = self.budget.total - sum(
                getattr(r, self.budget.metric) for r in self._records.values())
        self.step = 0
        self.ranks: dict[str, int] = {}
        # name -> (weight version right after its projection, U_k V_k^T in the weight's shape):
        # the subgradient at the next after_backward, if the weight has not changed since
        self._cache: dict[str, tuple[int, torch.Tensor]] = {}

    # --- the rank rule ----------------------------------------------------------------------------

    def rank_of(self, singular_values: torch.Tensor) -> int:
        """The rank the rule keeps for ``(groups, k)`` singular values (largest over groups)."""
        s = singular_values.detach()
        if self.value is not None:
            return max(1, int((s >= self.value).sum(dim=-1).max()))
        return Spectrum(s.reshape(-1, s.shape[-1]).double()).rank_at_energy(self.energy)

    def _rule(self, values: dict[str, torch.Tensor]) -> dict[str, int]:
        """Every target's rank from its singular values ``(groups, k)``: the per-layer rule, or
        the energy the budget allows (a layer the allocator leaves dense keeps every value)."""
        if self.budget is None:
            return {n: self.rank_of(s) for n, s in values.items()}
        options = candidate_options(self.targets, self._records, self.budget.metric, values)
        choice, _ = allocate_energy(options, self.budget, self._fixed)
        choice = fill_budget(choice, options, self._fixed, self.budget)  # as lrfx.allocate does
        return {t.name: (int(values[t.name].shape[-1]) if choice[t.name].scheme == "dense"
                         else int(choice[t.name].rank))  # type: ignore[arg-type]
                for t in self.targets}

    # --- hooks ------------------------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self, model: nn.Module | None = None) -> None:
        """Add ``lambda_nuc * U_k V_k^T`` to each target weight's gradient (``k``: its rank at
        the last projection, or by the rule before the first)."""
        if self.lambda_nuc == 0.0:
            return
        weights = weights_of(self._model(model), self.targets)
        if len(self.ranks) < len(self.targets):  # before the first projection: the rule's ranks
            svals = {t.name: t.svd(w)[1] for t, w in zip(self.targets, weights, strict=True)}
            initial = self._rule(svals)
        for t, w in zip(self.targets, weights, strict=True):
            if w.grad is None:
                continue
            cached = self._cache.get(t.name)
            if cached is not None and cached[0] == w._version:
                direction = cached[1]
            else:
                u, _, vh = t.svd(w)
                k = self.ranks[t.name] if t.name in self.ranks else initial[t.name]
                direction = t.fold(u[..., :k] @ vh[..., :k, :], w.shape)
            w.grad.add_(direction.to(w.grad.dtype), alpha=self.lambda_nuc)

    def after_step(self, model: nn.Module | None = None) -> None:
        """Count the step; every ``every`` steps, :meth:`project`."""
        self.step += 1
        if self.step % self.every == 0:
            self.project(model)

    @torch.no_grad()
    def project(self, model: nn.Module | None = None) -> dict[str, int]:
        """Replace every target weight by its truncation at the rule's rank, now.

        Returns:
            The rank of each target.
        """
        weights = weights_of(self._model(model), self.targets)
        svds = {t.name: t.svd(w) for t, w in zip(self.targets, weights, strict=True)}
        ranks = self._rule({n: s for n, (_, s, _) in svds.items()})
        for t, w in zip(self.targets, weights, strict=True):
            u, _, vh = svds[t.name]
            k = ranks[t.name]
            w.copy_(t.truncation(svds[t.name], k, w.shape).to(w.dtype))
            self.ranks[t.name] = k
            self._cache[t.name] = (w._version, t.fold(u[..., :k] @ vh[..., :k, :], w.shape))
        return dict(self.ranks)

    # --- the result -------------------------------------------------------------------------------

    def _final(self, model: nn.Module | None) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """Ranks of the final plan, and the projected weights of the targets that moved since
        their last projection (with a budget: all of them, if any moved)."""
        weights = weights_of(self._model(model), self.targets)
        fresh = {t.name for t, w in zip(self.targets, weights, strict=True)
                 if (c := self._cache.get(t.name)) is not None and c[0] == w._version}
        redo = [t for t in self.targets if t.name not in fresh]
        if self.budget is not None and redo:
            redo = list(self.targets)
        ranks = {t.name: self.ranks[t.name] for t in self.targets if t.name in fresh}
        if not redo:
            return ranks, {}
        by_name = dict(zip([t.name for t in self.targets], weights, strict=True))
        svds = {t.name: t.svd(by_name[t.name]) for t in redo}
        ranks.update(self._rule({n: s for n, (_, s, _) in svds.items()}))
        moved = {}
        for t in redo:
            w = by_name[t.name]
            moved[t.name] = t.truncation(svds[t.name], ranks[t.name], w.shape).to(w.dtype)
        return ranks, moved

    def plan(self, model: nn.Module | None = None) -> RankPlan:
        """The plan :meth:`finalize` applies: each target at its rank (``dense`` past
        break-even), from the model as it is now (not modified)."""
        ranks, _ = self._final(model)
        return plan_of(self.targets, ranks, "trp", self.settings())

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """The factored model: targets projected (where they moved since their last projection)
        and factored at their ranks by :func:`lrfx.apply`. The model being trained is not
        modified; the result is in its train/eval mode."""
        inner = unwrap(self._model(model))
        ranks, moved = self._final(inner)
        result = copy.deepcopy(inner)
        with torch.no_grad():
            for t, w in zip(self.targets, weights_of(result, self.targets), strict=True):
                if t.name in moved:
                    w.copy_(moved[t.name])
        return apply(result, plan_of(self.targets, ranks, "trp", self.settings()),
                     self.example_inputs)

    # --- state ------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"energy": self.energy, "value": self.value, **self.budget_setting,
                "every": self.every,
                "lambda_nuc": self.lambda_nuc, "scheme": self.scheme,
                "layers": [t.name for t in self.targets]}

    def state_dict(self) -> dict[str, Any]:
        """The step counter, the ranks so far and the settings (checkpoint it with the model
        and the optimizer)."""
        return {"method": self.name, "step": self.step, "ranks": dict(self.ranks),
                "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            LrfxError: The state is of another method or of other settings.
        """
        self._check_state(state)
        self.step = int(state["step"])
        self.ranks = {str(k): int(v) for k, v in state["ranks"].items()}
        self._cache.clear()

    def __repr__(self) -> str:
        rule = (f"value={self.value}" if self.value is not None else
                f"{self.budget.metric}={self.budget.fraction:.3g}" if self.budget is not None
                else f"energy={self.energy}")
        return (f"TRP({rule}, every={self.every}, lambda_nuc={self.lambda_nuc}, "
                f"scheme={self.scheme!r}, {len(self.targets)} layers, step {self.step})")
