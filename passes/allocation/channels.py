"""Channel masks as a plan: network slimming's allocation (Liu et al. 2017; Bui et al. 2020).

Reads per-channel importance scores of the prunable channel groups (:func:`scale_scores`: the
absolute BatchNorm scale or rank gate, averaged over the group's scales) and the analysis
(per-layer MACs and parameters); writes a :class:`~lrfx.RankPlan` of :class:`~lrfx.ChannelPlan`
entries, one per group that loses channels. A pure function of its inputs; changes no model.

All scored channels are ranked globally, lowest score first (equal scores — an untrained model's
BatchNorms are all 1 — by relative position in their group, so ties prune every group alike):

* ``percent``: prune the ``percent`` lowest-scoring channels over every scored group: one
  global threshold, the slimming paper's rule.
* ``metric`` + ``target``: prune the fewest lowest-scoring channels that make the model fit the
  budget, by bisection on their number; MACs and parameters of a candidate come from
  :func:`channel_cost`, exact for every member kind the groups have.

A group that grouped convs split into blocks (:attr:`ChannelGroup.blocks`) is pruned in units of
one channel from every block (scored by the mean over the blocks), so its convs keep equal
groups. Every group keeps at least ``min_channels`` channels (its highest-scoring ones), so no
layer is ever left with none. Groups without a score (no BatchNorm after the producer) are kept
whole and listed in the plan's settings under ``unscored``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lrfx.analysis import Analysis
from lrfx.cost import Cost
from lrfx.errors import BudgetInfeasibleError, LrfxError
from lrfx.modules import Gate
from lrfx.passes.analysis.channels import ChannelGroups
from lrfx.plan import ChannelPlan, RankPlan

__all__ = ["allocate_channels", "channel_cost", "per_channel_params", "scale_scores"]

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def scale_scores(model: nn.Module, groups: ChannelGroups, scales: str = "all"
                 ) -> dict[int, torch.Tensor]:
    """Per prunable group with learned scales: ``|scale|`` per channel, averaged over the
    group's scales (a residual group has a BatchNorm per block). ``scales``: ``all`` (BatchNorm
    ``gamma`` and rank gates), ``bn`` or ``gates``. Groups without one are left out."""
    kinds: tuple[type[nn.Module], ...] = {"all": (*_BNS, Gate), "bn": _BNS, "gates": (Gate,)}[
        scales]
    scores: dict[int, torch.Tensor] = {}
    for g in groups.prunable:
        parts = []
        for m in g.members:
            if m.role != "norm":
                continue
            weight = getattr(model.get_submodule(m.target), "weight", None)
            if isinstance(model.get_submodule(m.target), kinds) and isinstance(
                    weight, torch.Tensor):
                w = weight.detach().abs().float().cpu()
                parts.append(w[m.offset:m.offset + g.channels])
        if parts:
            scores[g.index] = torch.stack(parts).mean(0)
    return scores


def channel_cost(analysis: Analysis, groups: ChannelGroups, keep: Mapping[int, int],
                 per_channel: Mapping[str, int] | None = None) -> Cost:
    """The model's MACs and parameters when each group ``i`` keeps ``keep[i]`` channels (groups
    not named keep all). Exact: every member's cost is linear in each of its channel counts.

    ``per_channel`` gives the parameters per channel of norm and attribute members
    (:func:`per_channel_params`); a norm not named counts 2 (weight and bias), an attribute 1.
    """
    per = dict(per_channel or {})
    width = {g.index: g.channels for g in groups}
    kept = {i: keep.get(i, n) for i, n in width.items()}
    layers: dict[str, dict[str, list[tuple[int, int]]]] = {}
    other = 0
    for g in groups:
        for m in g.members:
            if m.role in ("out", "in", "depthwise"):
                layers.setdefault(m.target, {}).setdefault(m.role, []).append((g.index, m.inner))
            elif m.role in ("norm", "param") and kept[g.index] != g.channels:
                other += per.get(m.target, 2 if m.role == "norm" else 1) * (
                    kept[g.index] - g.channels)
    macs, params = analysis.total_macs, analysis.total_params + other
    for name, roles in layers.items():
        if name not in analysis:
            continue
        rec = analysis[name]
        shape = rec.weight_shape or ()
        if len(shape) < 2:
            continue
        out, k = shape[0], math.prod(shape[2:])
        conv_groups = getattr(rec.calls[0], "groups", 1) if rec.calls else 1
        cin = shape[1] * conv_groups  # all input channels (a grouped conv sees a share)
        bias = rec.params - math.prod(shape)
        new_groups = conv_groups
        if "depthwise" in roles:
            (i, _), = roles["depthwise"][:1]
            new_out, new_in, new_groups = kept[i], kept[i], kept[i]
        else:
            new_out = sum(kept[i] for i, _ in roles.get("out", [])) or out
            new_in = cin
            if "in" in roles:
                new_in = cin - sum((width[i] - kept[i]) * inner for i, inner in roles["in"])
        # MACs and weights are proportional to out * in / groups
        new_params = new_out * (new_in // new_groups) * k + (new_out if bias else 0)
        macs += rec.macs * new_out * (new_in // new_groups) // (out * shape[1]) - rec.macs
        params += new_params - rec.params
    return Cost(int(macs), int(params))


def per_channel_params(model: nn.Module, groups: ChannelGroups) -> dict[str, int]:
    """Parameters per channel of every norm and per-channel attribute member of ``groups``."""
    out: dict[str, int] = {}
    for g in groups:
        for m in g.members:
            if m.role == "norm":
                mod = model.get_submodule(m.target)
                n = sum(p.numel() for p in mod.parameters(recurse=False))
                width = next((int(p.shape[0]) for p in mod.parameters(recurse=False)), 0)
                out[m.target] = n // width if width else 0
            elif m.role == "param":
                owner, _, attr = m.target.rpartition(".")
                t = getattr(model.get_submodule(owner) if owner else model, attr)
                out[m.target] = t.numel() // t.shape[m.dim] if isinstance(t, nn.Parameter) else 0
    return out


def allocate_channels(
    groups: ChannelGroups,
    scores: Mapping[int, torch.Tensor],
    analysis: Analysis,
    *,
    percent: float | None = None,
    metric: str | None = None,
    target: float | None = None,
    min_channels: int = 1,
    per_channel: Mapping[str, int] | None = None,
    normalize: str = "none",
) -> RankPlan:
    """Channel masks from scores (see the module docstring).

    Args:
        groups: The model's channel groups.
        scores: Per group index, one score per channel (higher is kept first).
        analysis: The dense model's analysis (for costs).
        percent: Prune this fraction of all scored channels (0 <= percent < 1).
        metric: ``macs`` or ``params``: prune until the model's total is at most ``target``.
        target: The budget in absolute MACs or parameters.
        min_channels: Channels every group keeps at least.
        per_channel: Parameters per channel of each norm / attribute member
            (:func:`per_channel_params`; default 2 for a norm, 1 for an attribute).
        normalize: ``none`` ranks the raw scores globally (the slimming paper's rule);
            ``mean`` divides each group's scores by their mean first, so channels compete by
            how they compare within their own layer (Torch-Pruning's default normalizer): less
            pruning of layers whose scales are small across the board.

    Returns:
        A plan of channel entries with predicted ``macs`` / ``params``.

    Raises:
        BudgetInfeasibleError: Even pruning every scored group to ``min_channels`` misses the
            budget.
    """
    if (percent is None) == (metric is None):
        raise LrfxError("allocate_channels: give percent= or a budget (metric= and target=)")
    if percent is not None and not 0.0 <= percent < 1.0:
        raise LrfxError(f"allocate_channels: percent must be in [0, 1), got {percent!r}")
    if metric is not None and (metric not in ("macs", "params") or target is None):
        raise LrfxError(f"allocate_channels: metric must be 'macs' or 'params' with a target, "
                        f"got metric={metric!r}, target={target!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise LrfxError(f"allocate_channels: min_channels must be an int >= 1, got "
                        f"{min_channels!r}")
    by_index = {g.index: g for g in groups}
    for i, s in scores.items():
        if i not in by_index or not by_index[i].prunable:
            raise LrfxError(f"allocate_channels: group {i} has a score but is not prunable")
        if s.shape != (by_index[i].channels,):
            raise LrfxError(f"allocate_channels: group {by_index[i].name!r} has "
                            f"{by_index[i].channels} channels but {tuple(s.shape)} scores")
    # pruning units: a channel, or for a group split by grouped convs into B blocks the same
    # channel of every block (B channels); its score is the mean over the blocks
    blocks = {i: by_index[i].blocks for i in scores}
    if normalize not in ("none", "mean"):
        raise LrfxError(f"allocate_channels: normalize must be 'none' or 'mean', got "
                        f"{normalize!r}")
    units = {i: s.view(blocks[i], -1).mean(0) for i, s in scores.items()}
    if normalize == "mean":
        units = {i: u / u.mean().clamp(min=1e-12) for i, u in units.items()}
    unit_group = torch.cat([torch.full((len(v),), i) for i, v in units.items()]
                           ) if units else torch.zeros(0, dtype=torch.long)
    unit_index = torch.cat([torch.arange(len(v)) for v in units.values()]
                           ) if units else torch.zeros(0, dtype=torch.long)
    unit_scores = torch.cat(list(units.values())).double() if units else torch.zeros(0)
    unit_sizes = torch.tensor([blocks[int(i)] for i in unit_group], dtype=torch.long)
    # lowest score first; equal scores (an untrained model's BatchNorms are all 1) spread over the
    # groups by relative position, so a tie prunes every group alike instead of the first ones
    position = torch.cat([torch.arange(len(v), dtype=torch.float64) / len(v)
                          for v in units.values()]) if units else torch.zeros(0)
    by_position = torch.argsort(position, stable=True)
    order = by_position[torch.argsort(unit_scores[by_position], stable=True)]
    floor = {}  # each group's best units, min_channels channels at least, kept whatever goes
    for i, v in units.items():
        n_best = min(max(1, math.ceil(min_channels / blocks[i])), len(v))
        floor[i] = torch.zeros(len(v), dtype=torch.bool)
        # the last in pruning order (ties broken as the order breaks them)
        floor[i][torch.argsort(v, stable=True)[len(v) - n_best:]] = True

    def masks(k: int) -> dict[int, torch.Tensor]:
        """Prune the ``k`` lowest-scoring units (a group's floor stays)."""
        keep = {i: torch.ones(len(v), dtype=torch.bool) for i, v in units.items()}
        for j in order[:k].tolist():
            keep[int(unit_group[j])][int(unit_index[j])] = False
        return {i: (m | floor[i]).repeat(blocks[i]) for i, m in keep.items()}

    def cost(m: Mapping[int, torch.Tensor]) -> Cost:
        return channel_cost(analysis, groups, {i: int(k.sum()) for i, k in m.items()},
                            per_channel)

    settings: dict[str, Any] = {"min_channels": min_channels, "normalize": normalize,
                                "unscored": [g.name for g in groups.prunable
                                             if g.index not in scores]}
    n = len(unit_scores)
    if percent is not None:
        settings["percent"] = percent
        # the most units whose channels are at most percent of all scored channels
        removed = torch.cumsum(unit_sizes[order], 0)
        limit = math.floor(percent * int(unit_sizes.sum()))
        chosen = masks(int((removed <= limit).sum()))
    else:
        assert metric is not None and target is not None
        settings.update(metric=metric, target=int(target),
                        fraction=float(target) / (analysis.total_macs if metric == "macs"
                                                  else analysis.total_params))

        def fits(k: int) -> bool:
            c = cost(masks(k))
            return (c.macs if metric == "macs" else c.params) <= target

        if not fits(n):
            c = cost(masks(n))
            got = c.macs if metric == "macs" else c.params
            raise BudgetInfeasibleError(
                f"channel pruning cannot reach {metric} <= {int(target):,}: with every scored "
                f"group at {min_channels} channel(s) the model has {got:,} (unscored or "
                "unprunable groups and other layers stay); raise the budget")
        lo, hi = 0, n
        while lo < hi:  # the fewest pruned channels that fit (cost falls as k grows)
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        chosen = masks(lo)
        settings["pruned"] = lo
    if n:
        kept = torch.cat([chosen[i] for i in scores])
        pruned_scores = torch.cat(list(scores.values())).double()[~kept]
        settings["threshold"] = float(pruned_scores.max()) if len(pruned_scores) else None
    total = cost(chosen)
    entries = {}
    for i, keep in chosen.items():
        g = by_index[i]
        if bool(keep.all()):
            continue
        entries[g.name] = ChannelPlan.from_mask(keep)
    return RankPlan(entries, allocator="slimming", settings=settings, macs=total.macs,
                    params=total.params)
