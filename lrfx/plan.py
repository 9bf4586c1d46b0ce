"""Rank plans: which layer gets which decomposition at which rank.

A :class:`RankPlan` is data. It maps a layer's fully qualified name to a :class:`LayerPlan`
(scheme and ranks, or ``"dense"``), and records the weight shapes it was made for, the allocator
and its settings, predicted MACs/params and a format version. It round-trips through JSON
exactly, and can be written by hand:

Example:
    >>> plan = RankPlan({
    ...     "layer1.0.conv1": LayerPlan("channel", 16),
    ...     "fc": LayerPlan("svd", 64),
    ...     "layer2.0.conv2": LayerPlan("tucker2", (24, 32)),
    ... })
    >>> RankPlan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lrfx.cost import SCHEMES, Cost, applicable_schemes, factored_cost, max_rank
from lrfx.errors import LrfxError, PlanMismatchError, UnsupportedLayerError
from lrfx.facts import FrozenMap

__all__ = ["FORMAT_VERSION", "LayerPlan", "RankPlan"]

#: Version of the JSON format written by :meth:`RankPlan.to_json`.
FORMAT_VERSION = 1

_TWO_RANKS = {"tucker2"}

Rank = int | tuple[int, ...]


def _as_int(x: Any) -> Any:
    """Integers of any kind (numpy, 0-d torch tensors) as Python ints; anything else unchanged."""
    if isinstance(x, bool):
        return x
    try:
        return operator.index(x)
    except TypeError:
        return x


def _as_rank(scheme: str, rank: Any, where: str) -> Rank | None:
    if scheme == "dense":
        if rank is not None:
            raise LrfxError(f"{where}: a dense layer takes no rank, got {rank!r}")
        return None
    if isinstance(rank, bool) or rank is None:
        raise LrfxError(f"{where}: scheme {scheme!r} needs a rank, got {rank!r}")
    rank = _as_int(rank) if not isinstance(rank, (list, tuple)) else tuple(
        _as_int(r) for r in rank)
    if isinstance(rank, (list, tuple)):
        ranks = tuple(rank)
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise LrfxError(f"{where}: ranks must be integers, got {rank!r}")
        if scheme in _TWO_RANKS and len(ranks) != 2:
            raise LrfxError(f"{where}: {scheme} takes two ranks (r_in, r_out), got {rank!r}")
        if scheme not in _TWO_RANKS and len(ranks) != 1:
            raise LrfxError(f"{where}: {scheme} takes one rank, got {rank!r}")
        if any(r < 1 for r in ranks):
            raise LrfxError(f"{where}: ranks must be >= 1, got {rank!r}")
        return ranks if scheme in _TWO_RANKS else ranks[0]
    if not isinstance(rank, int):
        raise LrfxError(f"{where}: rank must be an int or a tuple of ints, got {rank!r}")
    if rank < 1:
        raise LrfxError(f"{where}: rank must be >= 1, got {rank}")
    return (rank, rank) if scheme in _TWO_RANKS else rank


@dataclass(frozen=True)
class LayerPlan:
    """The plan for one layer.

    Attributes:
        scheme: ``svd``, ``channel``, ``spatial``, ``tucker2``, ``cp``, or ``dense``.
        rank: An int, or ``(r_in, r_out)`` for tucker2 (an int means both); ``None`` for dense.
        weight_shape: The weight shape the plan was made for (filled in when resolved).
        macs: Predicted MACs of the layer under this plan (filled in when resolved).
        params: Predicted parameters of the layer under this plan (filled in when resolved).

    Example:
        >>> LayerPlan("tucker2", 8).rank
        (8, 8)
    """

    scheme: str
    rank: Rank | None = None
    weight_shape: tuple[int, ...] | None = None
    macs: int | None = None
    params: int | None = None

    def __post_init__(self) -> None:
        if self.scheme != "dense" and self.scheme not in SCHEMES:
            raise LrfxError(
                f"unknown scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)} or 'dense'"
            )
        object.__setattr__(self, "rank", _as_rank(self.scheme, self.rank, "LayerPlan"))
        if self.weight_shape is not None:
            object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))

    @property
    def dense(self) -> bool:
        return self.scheme == "dense"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scheme": self.scheme}
        if self.rank is not None:
            d["rank"] = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        for key in ("weight_shape", "macs", "params"):
            v = getattr(self, key)
            if v is not None:
                d[key] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "LayerPlan") -> LayerPlan:
        unknown = set(d) - {"scheme", "rank", "weight_shape", "macs", "params"}
        if unknown or "scheme" not in d:
            raise LrfxError(f"{where}: expected keys scheme, rank, weight_shape, macs, params; "
                            f"got {sorted(d)}")
        ws = d.get("weight_shape")
        return cls(
            scheme=d["scheme"],
            rank=tuple(d["rank"]) if isinstance(d.get("rank"), list) else d.get("rank"),
            weight_shape=tuple(ws) if ws is not None else None,
            macs=d.get("macs"),
            params=d.get("params"),
        )


def _check_json_value(v: Any, where: str) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise LrfxError(f"{where}: plan settings must be finite numbers, got {v!r}")
    if isinstance(v, (str, int, float, bool)) or v is None:
        return
    if isinstance(v, (list, tuple)):
        for x in v:
            _check_json_value(x, where)
        return
    if isinstance(v, Mapping):
        for k, x in v.items():
            if not isinstance(k, str):
                raise LrfxError(f"{where}: settings keys must be strings, got {k!r}")
            _check_json_value(x, where)
        return
    raise LrfxError(f"{where}: settings must be JSON values, got {type(v).__name__}")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_freeze(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _freeze(x) for k, x in v.items()}
    return v


@dataclass(frozen=True, eq=False)
class RankPlan(Mapping[str, LayerPlan]):
    """Per-layer decomposition schemes and ranks; layers not named stay dense.

    Args:
        layers: Layer name to :class:`LayerPlan` (or ``(scheme, rank)`` pairs, or dicts).
        allocator: Who made the plan (``manual`` for hand-written plans).
        settings: The allocator's settings (JSON values).
        macs: Predicted total MACs of the model under the plan.
        params: Predicted total parameters of the model under the plan.
        version: Format version.
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    allocator: str = "manual"
    settings: Mapping[str, Any] = field(default_factory=dict)
    macs: int | None = None
    params: int | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise LrfxError(
                f"plan format version {self.version} is not supported (this lrfx reads version "
                f"{FORMAT_VERSION}); re-create the plan with this version of lrfx"
            )
        if not isinstance(self.layers, Mapping):
            raise LrfxError(f"RankPlan layers must be a mapping of layer name to LayerPlan, "
                            f"got {type(self.layers).__name__}")
        layers: dict[str, LayerPlan] = {}
        for name, lp in self.layers.items():
            if not isinstance(name, str) or not name:
                raise LrfxError(f"RankPlan: layer names must be non-empty strings, got {name!r}")
            if isinstance(lp, tuple) and len(lp) == 2:
                lp = LayerPlan(*lp)
            elif isinstance(lp, Mapping):
                lp = LayerPlan.from_dict(lp, f"layer {name!r}")
            if not isinstance(lp, LayerPlan):
                raise LrfxError(f"RankPlan: layer {name!r} maps to {lp!r}, expected a LayerPlan")
            layers[name] = lp
        _check_json_value(dict(self.settings), "RankPlan")
        object.__setattr__(self, "layers", FrozenMap(layers))
        object.__setattr__(self, "settings", FrozenMap(_freeze(dict(self.settings))))

    # Mapping protocol: a plan reads like a dict of layer plans.
    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RankPlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    @property
    def factored(self) -> dict[str, LayerPlan]:
        """The layers the plan factors (dense entries left out)."""
        return {k: v for k, v in self.layers.items() if not v.dense}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "lrfx.RankPlan",
            "version": self.version,
            "allocator": self.allocator,
            "settings": _freeze(dict(self.settings)),
            "macs": self.macs,
            "params": self.params,
            "layers": {name: lp.to_dict() for name, lp in self.layers.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON; :meth:`from_json` reads it back to an equal plan."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankPlan:
        if d.get("format") != "lrfx.RankPlan":
            raise LrfxError("not an lrfx plan: the JSON has no \"format\": \"lrfx.RankPlan\" key")
        layers = d.get("layers", {})
        if not isinstance(layers, Mapping):
            raise LrfxError("plan JSON: 'layers' must be an object of layer name to layer plan")
        return cls(
            layers={k: LayerPlan.from_dict(v, f"layer {k!r}") for k, v in layers.items()},
            allocator=d.get("allocator", "manual"),
            settings=d.get("settings", {}),
            macs=d.get("macs"),
            params=d.get("params"),
            version=d.get("version", FORMAT_VERSION),
        )

    @classmethod
    def from_json(cls, text: str) -> RankPlan:
        """Read a plan written by :meth:`to_json` (or by hand in the same format)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LrfxError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(d, Mapping):
            raise LrfxError("plan JSON must be an object")
        return cls.from_dict(d)

    def resolve(self, analysis: Any) -> RankPlan:
        """Check the plan against an :class:`~lrfx.Analysis` and fill in shapes and predictions.

        Every named layer must exist, have the recorded weight shape (when one is recorded),
        accept its scheme, and have ranks within range. Predicted MACs/params per layer and for
        the whole model come from :mod:`lrfx.cost`.

        Raises:
            PlanMismatchError: A layer is missing or its weight shape differs.
            UnsupportedLayerError: A scheme does not apply to a layer, or a rank is out of range.
        """
        layers: dict[str, LayerPlan] = {}
        total = Cost(analysis.total_macs, analysis.total_params)
        for name, lp in self.layers.items():
            if name not in analysis:
                near = [n for n in analysis.names if n.endswith(name.split(".")[-1])][:5]
                hint = f"; similar names: {', '.join(near)}" if near else ""
                raise PlanMismatchError(name, f"the model has no such layer{hint}")
            rec = analysis[name]
            shape = rec.weight_shape
            if lp.weight_shape is not None and shape is not None and lp.weight_shape != shape:
                raise PlanMismatchError(
                    name, f"the plan was made for weight shape {lp.weight_shape}, the model's "
                    f"weight is {shape}; make a new plan for this model"
                )
            if not rec.calls:
                raise UnsupportedLayerError(name, f"a {rec.kind} has no weight to factor")
            dense = Cost(rec.macs, rec.params)
            if lp.dense:
                layers[name] = LayerPlan("dense", None, shape, dense.macs, dense.params)
                continue
            if lp.scheme not in applicable_schemes(rec.calls[0]) or not rec.schemes:
                why = rec.note or f"applicable schemes: {', '.join(rec.schemes) or 'none'}"
                raise UnsupportedLayerError(
                    name, f"scheme {lp.scheme!r} does not apply to this {rec.kind} layer ({why})"
                )
            _check_rank(name, lp, rec)
            assert lp.rank is not None
            cost = Cost(0, 0)
            for g in rec.calls:
                cost = cost + Cost(factored_cost(g, lp.scheme, lp.rank).macs, 0)
            params = factored_cost(rec.calls[0], lp.scheme, lp.rank).params
            cost = Cost(cost.macs, params)
            layers[name] = LayerPlan(lp.scheme, lp.rank, shape, cost.macs, cost.params)
            total = Cost(total.macs - dense.macs + cost.macs, total.params - dense.params + params)
        return RankPlan(
            layers,
            allocator=self.allocator,
            settings=self.settings,
            macs=total.macs,
            params=total.params,
            version=self.version,
        )

    def validate(self, model: Any, example_inputs: Any = None) -> RankPlan:
        """Check the plan against a model (weight shapes at least; everything with inputs).

        Without ``example_inputs`` only layer names and weight shapes are checked, from the
        model's parameters. With them, the model is analyzed and :meth:`resolve` runs.

        Returns:
            The plan, resolved when ``example_inputs`` are given.

        Raises:
            PlanMismatchError: Names the first layer that does not fit.
        """
        if example_inputs is not None:
            from lrfx.analysis import analyze

            return self.resolve(analyze(model, example_inputs, spectra=False))
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, lp in self.layers.items():
            w = params.get(f"{name}.weight", params.get(name))
            if w is None:
                w = _attention_projection(model, name)
            if w is None:
                raise PlanMismatchError(name, "the model has no such layer (no weight "
                                        f"{name}.weight); check the layer names with lrfx analyze")
            if lp.weight_shape is not None and tuple(w.shape) != lp.weight_shape:
                raise PlanMismatchError(
                    name, f"the plan was made for weight shape {lp.weight_shape}, the model's "
                    f"weight is {tuple(w.shape)}; make a new plan for this model"
                )
        return self


def _attention_projection(model: Any, name: str) -> Any:
    """The weight of ``mha.q_proj`` / ``k_proj`` / ``v_proj`` of an ``nn.MultiheadAttention``."""
    from torch import nn

    parent, _, part = name.rpartition(".")
    try:
        mha = model.get_submodule(parent)
    except AttributeError:
        return None
    if not isinstance(mha, nn.MultiheadAttention) or part not in ("q_proj", "k_proj", "v_proj"):
        return None
    from lrfx.modules import mha_projection

    return mha_projection(mha, part)[0]


def _check_rank(name: str, lp: LayerPlan, rec: Any) -> None:
    assert lp.rank is not None
    limit = max_rank(rec.calls[0], lp.scheme)
    ranks = lp.rank if isinstance(lp.rank, tuple) else (lp.rank,)
    for r, hi in zip(ranks, limit, strict=True):
        if not 1 <= r <= hi:
            valid = " and ".join(f"1..{h}" for h in limit)
            raise UnsupportedLayerError(
                name, f"rank {lp.rank} is out of range for scheme {lp.scheme!r} "
                f"(weight {rec.weight_shape}); valid ranks: {valid}"
            )
