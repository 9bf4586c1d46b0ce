"""What every training-time method shares: which layers it trains low-rank, and how to reach them.

A method is built once from the model and example inputs. :func:`find_targets` runs the analysis
(:func:`lrfx.analyze`, no spectra) and keeps the layers a method can train in place: conv and
linear **modules** whose ``weight`` is an ordinary parameter (functional layers and the packed
projections of attention modules have no weight of their own to project, and are skipped with a
reason). During training the method only keeps names, and finds the parameters again on the model
it is handed — the user's model, or the same model wrapped in ``DistributedDataParallel`` /
``DataParallel`` / ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrfx.analysis import Analysis, LayerRecord
from lrfx.api import analyze
from lrfx.config import LayerRules, _selector, _specificity
from lrfx.cost import ConvGeometry, Geometry, dense_cost
from lrfx.decompositions import Spectrum, Unfolding, get_unfolding
from lrfx.errors import LrfxError
from lrfx.passes.allocation import LayerOptions, build_options
from lrfx.plan import LayerPlan, RankPlan
from lrfx.schemes import get_scheme

__all__ = [
    "Method", "Target", "candidate_options", "find_targets", "plan_of", "unwrap", "weights_of",
]

#: Layer kinds a training-time method can keep low-rank.
_KINDS = ("linear", "conv1d", "conv2d", "conv3d")


@dataclass(frozen=True)
class Target:
    """One layer a method trains low-rank.

    Attributes:
        name: The module's qualified name (a plan key).
        scheme: How it is factored at the end (``svd`` for Linear, ``channel``/``spatial`` for
            convs).
        calls: Its geometries (for costs).
        groups: Conv groups (each group is truncated to the same rank).
    """

    name: str
    scheme: str
    calls: tuple[Geometry, ...]
    groups: int = 1

    @property
    def unfolding(self) -> Unfolding:
        return get_unfolding(get_scheme(self.scheme).unfoldings[0])

    def matrices(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as ``(groups, rows, cols)`` matrices of the scheme's unfolding."""
        return self.unfolding.matrix(weight, self.groups)

    def fold(self, mats: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return self.unfolding.fold(mats, shape, self.groups)

    def svd(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vh)`` of the weight's matrices, detached, in float32 at least (there is no
        half-precision SVD) and outside autocast, on the weight's device."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.autocast(weight.device.type, enabled=False):
            return torch.linalg.svd(self.matrices(weight.detach().to(dtype)),
                                    full_matrices=False)

    def truncation(self, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int,
                   shape: Sequence[int]) -> torch.Tensor:
        """The rank-``rank`` truncation from :meth:`svd`'s factors, in the weight's shape."""
        u, s, vh = svd
        return self.fold((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :], shape)

    def costs(self, rank: int) -> tuple[int, int]:
        """``(factored MACs, dense MACs)`` over every call."""
        s = get_scheme(self.scheme)
        return (sum(s.cost(g, rank).macs for g in self.calls),
                sum(dense_cost(g).macs for g in self.calls))

    def worth_factoring(self, rank: int) -> bool:
        """Whether ``rank`` is below break-even (factored strictly cheaper than dense)."""
        factored, dense = self.costs(rank)
        return factored < dense


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel``, ``DataParallel`` or
    ``torch.compile``."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def weights_of(model: nn.Module, targets: Iterable[Target]) -> list[nn.Parameter]:
    """Each target's weight parameter on ``model`` (unwrapped), checked.

    Raises:
        LrfxError: The model lacks a target layer or its weight is no longer a parameter (a
            different model than the one the method was built for).
    """
    inner = unwrap(model)
    out = []
    for t in targets:
        try:
            w = inner.get_submodule(t.name).weight
        except AttributeError:
            raise LrfxError(f"layer {t.name!r} is not in this {type(inner).__name__}: the "
                            "method was built for another model") from None
        if not isinstance(w, nn.Parameter):
            raise LrfxError(f"layer {t.name!r}: its weight is no longer a parameter (was the "
                            "model compressed already? a method works on the dense model)")
        out.append(w)
    return out


def _conv_scheme(scheme: str, g: Geometry) -> str | None:
    for s in (scheme, "channel"):
        if get_scheme(s).applies(g):
            return s
    return None


def _matches(selectors: Sequence[str], name: str, types: Sequence[str]) -> bool:
    return any(_specificity(s, name, types) is not None for s in selectors)


def find_targets(
    model: nn.Module,
    example_inputs: Any,
    *,
    scheme: str = "channel",
    layers: str | Sequence[Any] = "all",
    exclude: Any = (),
    method: str = "method",
) -> tuple[list[Target], dict[str, str], Analysis]:
    """The layers a method trains low-rank, in graph order, those it skips (with reasons), and
    the analysis they come from (no spectra).

    Args:
        model: The dense model (unwrapped; not modified).
        example_inputs: As for :func:`lrfx.analyze`.
        scheme: ``channel`` or ``spatial`` for convs (a conv the scheme does not fit, e.g. a
            grouped one for ``spatial``, uses ``channel``); Linear layers use ``svd``.
        layers: ``"all"`` (every conv and linear module), ``"paper"`` (TRP's choice: convs with
            a kernel larger than 1x1 except the first conv; no linear layer), or selectors
            (names, globs, module types).
        exclude: A selector, or selectors, of layers to leave alone.
        method: The method's name, for messages.

    Raises:
        LrfxError: An unknown ``layers`` value or scheme, an exclusion naming no layer, or no
            layer left to train.
    """
    if scheme not in ("channel", "spatial"):
        raise LrfxError(f"{method}: scheme must be 'channel' or 'spatial' (the conv schemes a "
                        f"weight can be projected on during training), got {scheme!r}")
    if isinstance(layers, str) and layers not in ("all", "paper"):
        selectors: tuple[str, ...] = (_selector(layers, "layers"),)
    elif isinstance(layers, str):
        selectors = ()
    else:
        selectors = tuple(_selector(s, "layers") for s in layers)
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    rules = LayerRules(tuple(_selector(s, "exclude") for s in exclude))
    analysis = analyze(unwrap(model), example_inputs, spectra=False)
    records = [r for r in analysis.layers if r.factorable]
    rules.check_against([r.name for r in records], lambda n: analysis[n].types)
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    first_conv = next((r.name for r in records if r.kind.startswith("conv")), None)
    inner = unwrap(model)
    for r in records:
        if rules.excluded_by(r.name, r.types):
            skipped[r.name] = "excluded"
            continue
        if selectors and not _matches(selectors, r.name, r.types):
            skipped[r.name] = "not selected by layers="
            continue
        if r.kind not in _KINDS or not r.types or r.folded:
            skipped[r.name] = (f"{r.kind} layer without a weight parameter of its own "
                               "(functional, attention projection or weight transform)")
            continue
        try:
            w = inner.get_submodule(r.name).weight
        except AttributeError:
            w = None
        if not isinstance(w, nn.Parameter) or tuple(w.shape) != r.weight_shape:
            skipped[r.name] = "its weight is not a parameter of the module"
            continue
        g = r.calls[0]
        if layers == "paper" and not selectors:
            if r.kind == "linear":
                skipped[r.name] = "linear (the paper factors convolutions only)"
                continue
            if r.name == first_conv:
                skipped[r.name] = "first convolution (kept dense, as in the paper)"
                continue
            if isinstance(g, ConvGeometry) and math.prod(g.kernel) == 1:
                skipped[r.name] = "1x1 convolution (kept dense, as in the paper)"
                continue
        if r.kind == "linear":
            chosen: str | None = "svd"
        else:
            chosen = _conv_scheme(scheme, g)
        if chosen is None:
            skipped[r.name] = f"no {scheme} or channel factorization applies"
            continue
        groups = g.groups if isinstance(g, ConvGeometry) else 1
        targets.append(Target(r.name, chosen, tuple(r.calls), groups))
    if not targets:
        raise LrfxError(f"{method}: no layer to train low-rank (layers={layers!r}); skipped: "
                        + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:6]))
    return targets, skipped, analysis


def candidate_options(targets: Sequence[Target], records: Mapping[str, LayerRecord], metric: str,
                      values: Mapping[str, torch.Tensor]) -> list[LayerOptions]:
    """Each target's allocation candidates (:func:`build_options`: its scheme, ranks below
    break-even, costs from the cost model) with errors from the singular values ``values[name]``
    (``(groups, k)``) of the weight the method holds now."""
    spectra = {t.name: {t.unfolding.name: Spectrum(values[t.name].detach().double().cpu())}
               for t in targets}
    out = []
    for t in targets:
        (o,) = build_options([records[t.name]], metric=metric, schemes=t.scheme, spectra=spectra)
        out.append(o)
    return out


class Method:
    """What every training-time method shares: the model it was built with (the default of
    every hook's ``model``) and the check of a checkpointed state."""

    name = "method"
    model: nn.Module

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _model(self, model: nn.Module | None) -> nn.Module:
        return self.model if model is None else model

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a state of another method or of other settings (naming the first)."""
        kind = type(self).__name__
        if state.get("method") != self.name:
            raise LrfxError(f"{kind}.load_state_dict: this state is of {state.get('method')!r}")
        mine = self.settings()
        for key, value in dict(state.get("settings", {})).items():
            if mine.get(key) != value:
                raise LrfxError(f"{kind}.load_state_dict: the state has {key}={value!r}, this "
                                f"{kind} {key}={mine.get(key)!r}; build it as it was built")


def plan_of(targets: Sequence[Target], ranks: dict[str, int], allocator: str,
            settings: dict[str, Any]) -> RankPlan:
    """A plan factoring each target at its rank, dense where that is past break-even."""
    entries = {t.name: (LayerPlan(t.scheme, int(ranks[t.name]))
                        if t.worth_factoring(int(ranks[t.name])) else LayerPlan("dense"))
               for t in targets}
    return RankPlan(entries, allocator=allocator, settings=settings)
