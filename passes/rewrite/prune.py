"""The structural pruning pass: apply a plan's channel entries to the graph's modules.

Each :class:`~lrfx.ChannelPlan` entry names a producer of a channel group
(:func:`~lrfx.passes.analysis.find_channel_groups`) and the channels it keeps. For every member of
the group the matching slice goes: a conv/linear's weight rows and bias (``out``), a consumer's
weight columns (``in``, ``inner`` features per channel after a flatten), a depthwise conv's
filters and its ``groups``, a BatchNorm's affine parameters and running statistics, a LayerNorm's
entries, a per-channel graph attribute (ConvNeXt's layer scale). A member seen by several groups
(a conv after a concatenation) keeps the union of what each group keeps, at each group's offset.

The graph's nodes are unchanged; the modules get smaller. Kept channels keep their values, so with
every channel kept the model is unchanged, and with some removed it equals the model whose removed
channels were zeroed where they start — up to what a removed channel contributed downstream
through a bias or a norm shift, which is exactly what structural pruning drops.

Mutates the graph module's modules; invalidates shapes and every fact derived from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lrfx.errors import LrfxError, UnsupportedLayerError
from lrfx.facts import update_graph_facts
from lrfx.passes.analysis.channels import ChannelGroups, Member
from lrfx.pipeline import PassContext, graph_pass
from lrfx.plan import ChannelPlan

__all__ = ["PruneOptions", "PruneRecord", "group_masks", "prune_channels"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PruneOptions:
    """Options of :func:`prune_channels`.

    Attributes:
        channels: The plan's channel entries (layer name to :class:`~lrfx.ChannelPlan`).
        groups: The graph's channel groups (from :func:`find_channel_groups` on this graph).
    """

    channels: Mapping[str, ChannelPlan]
    groups: ChannelGroups


@dataclass(frozen=True)
class PruneRecord:
    """What the pass did to one group: its name, channels before and after, and the members
    it changed (``role:target``)."""

    name: str
    before: int
    after: int
    members: tuple[str, ...] = field(default=())


def group_masks(channels: Mapping[str, ChannelPlan], groups: ChannelGroups
                ) -> dict[int, torch.Tensor]:
    """Per group index, the boolean keep-mask of its channels. Checks every entry against its
    group (prunable, right width, one entry per group, the same channels in every group of a
    grouped conv).

    Raises:
        UnsupportedLayerError: An entry names a layer in no group, or in a group that cannot be
            pruned (the reason is given).
        PlanMismatchError: The entry's width differs from the group's.
    """
    masks: dict[int, torch.Tensor] = {}
    owner: dict[int, str] = {}
    for name, entry in channels.items():
        if name not in groups:
            raise UnsupportedLayerError(
                name, "no channel group has this layer as a producer (only conv/linear layers "
                "whose output channels can be followed are pruned); see lrfx.channel_groups")
        g = groups[name]
        if not g.prunable:
            raise UnsupportedLayerError(name, f"its channels cannot be pruned: {g.reason}")
        if entry.keep[-1] >= g.channels or (entry.channels not in (None, g.channels)):
            raise LrfxError(f"layer {name!r}: the channel entry is for "
                            f"{entry.channels or entry.keep[-1] + 1} channels, the layer has "
                            f"{g.channels}; make the mask for this model")
        mask = torch.zeros(g.channels, dtype=torch.bool)
        mask[list(entry.keep)] = True
        if g.blocks > 1 and not bool((mask.view(g.blocks, -1) == mask[:g.channels // g.blocks]
                                      ).all()):
            raise LrfxError(
                f"layer {name!r}: its {g.channels} channels feed or leave a grouped conv, in "
                f"{g.blocks} groups of {g.channels // g.blocks}: keep the same channels in every "
                f"group (a mask that repeats every {g.channels // g.blocks} channels)")
        if g.index in masks:
            if not torch.equal(masks[g.index], mask):
                raise LrfxError(
                    f"layers {owner[g.index]!r} and {name!r} are in one channel group (they "
                    "must keep the same channels) but their entries keep different channels; "
                    "give one entry per group")
            continue
        masks[g.index] = mask
        owner[g.index] = name
    return masks


def _member_keeps(groups: ChannelGroups, masks: Mapping[int, torch.Tensor]
                  ) -> dict[tuple[str, str, int], list[tuple[Member, torch.Tensor]]]:
    """Per (role, target, dim), the members and their groups' keep-masks."""
    out: dict[tuple[str, str, int], list[tuple[Member, torch.Tensor]]] = {}
    for g in groups:
        mask = masks.get(g.index, torch.ones(g.channels, dtype=torch.bool))
        for m in g.members:
            out.setdefault((m.role, m.target, m.dim), []).append((m, mask))
    return out


def _index(size: int, parts: list[tuple[Member, torch.Tensor]]) -> torch.Tensor | None:
    """The kept indices along a dimension of ``size`` entries, or None when nothing goes."""
    keep = torch.ones(size, dtype=torch.bool)
    for m, mask in parts:
        if bool(mask.all()):
            continue
        gone = (~mask).nonzero().flatten()
        for j in range(m.inner):
            keep[(m.offset + gone) * m.inner + j] = False
    return None if bool(keep.all()) else keep.nonzero().flatten()


def _take(p: torch.Tensor | None, dim: int, idx: torch.Tensor) -> Any:
    if p is None:
        return None
    t = p.detach().index_select(dim, idx.to(p.device)).clone()
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def _set(m: nn.Module, attr: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, nn.Parameter) or attr in m._parameters:
        m._parameters[attr] = value
    else:
        m._buffers[attr] = value


def _prune_member(gm: fx.GraphModule, role: str, target: str, dim: int,
                  idx: torch.Tensor) -> None:
    if role == "param":
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        value = getattr(mod, attr)
        _set(mod, attr, _take(value, dim, idx))
        return
    if role == "shape":
        node = next(n for n in gm.graph.nodes if n.name == target)
        node.update_arg(1, (int(idx.numel()),))
        return
    m: Any = gm.get_submodule(target)
    n = int(idx.numel())
    if role == "out":
        _set(m, "weight", _take(m.weight, 0, idx))
        _set(m, "bias", _take(m.bias, 0, idx) if m.bias is not None else None)
        if isinstance(m, _CONVS):
            m.out_channels = n
        else:
            m.out_features = n
    elif role == "in":
        if isinstance(m, _CONVS) and m.groups > 1:
            # idx is over all input channels and keeps the same ones in every group
            idx = idx[idx < m.in_channels // m.groups]
        _set(m, "weight", _take(m.weight, 1, idx))
        if isinstance(m, _CONVS):
            m.in_channels = n
        else:
            m.in_features = n
    elif role == "depthwise":
        _set(m, "weight", _take(m.weight, 0, idx))
        _set(m, "bias", _take(m.bias, 0, idx) if m.bias is not None else None)
        m.in_channels = m.out_channels = m.groups = n
    elif role == "norm":
        for attr in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(m, attr, None)
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                _set(m, attr, _take(v, 0, idx))
        if hasattr(m, "num_features"):
            m.num_features = n
        if isinstance(m, nn.LayerNorm):
            m.normalized_shape = (n,)
        if isinstance(m, nn.PReLU):
            m.num_parameters = n
    else:  # pragma: no cover - the analysis writes no other role
        raise LrfxError(f"unknown member role {role!r} of {target!r}")


@graph_pass(mutates=True, invalidates=["shapes", "layers", "spectra", "input_stats"],
            options=PruneOptions)
def prune_channels(gm: fx.GraphModule, ctx: PassContext) -> tuple[PruneRecord, ...]:
    """Remove the channels the plan's channel entries drop (see the module docstring).

    Reads :class:`PruneOptions` (the entries and this graph's channel groups). Mutates the
    modules (never the graph's nodes); invalidates every shape-derived fact. Everything is
    checked before the first module changes.

    Returns:
        One :class:`PruneRecord` per pruned group.
    """
    opts: PruneOptions = ctx.option(PruneOptions)
    masks = group_masks(opts.channels, opts.groups)
    by_member = _member_keeps(opts.groups, masks)
    todo: list[tuple[str, str, int, torch.Tensor]] = []
    for (role, target, dim), parts in by_member.items():
        if not any(g_mask is not None and not bool(g_mask.all()) for _, g_mask in parts):
            continue
        size = _member_size(gm, role, target, dim)
        idx = _index(size, parts)
        if idx is not None:
            todo.append((role, target, dim, idx))
    for role, target, dim, idx in todo:
        _prune_member(gm, role, target, dim, idx)
    if any(role == "shape" for role, *_ in todo):
        gm.recompile()
    if todo:
        unique = {id(p): p for p in gm.parameters()}
        update_graph_facts(gm, total_params=sum(p.numel() for p in unique.values()))
    records = []
    for g in opts.groups:
        if g.index in masks and not bool(masks[g.index].all()):
            records.append(PruneRecord(g.name, g.channels, int(masks[g.index].sum()),
                                       tuple(f"{m.role}:{m.target}" for m in g.members)))
    return tuple(records)


def _member_size(gm: fx.GraphModule, role: str, target: str, dim: int) -> int:
    if role == "shape":
        node = next(n for n in gm.graph.nodes if n.name == target)
        return int(next(iter(node.args[1])))
    if role == "param":
        owner, _, attr = target.rpartition(".")
        return int(getattr(gm.get_submodule(owner) if owner else gm, attr).shape[dim])
    m: Any = gm.get_submodule(target)
    w = getattr(m, "weight", None)
    if role == "in":
        return int(m.in_channels if isinstance(m, _CONVS) else m.in_features)
    if role == "norm":
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[0])
        return int(getattr(m, "num_features", 0) or getattr(m, "num_parameters", 0)
                   or (w.shape[0] if w is not None else 0))
    return int(w.shape[0]) if w is not None else 0
