"""Rank plans: what happens to each layer — a decomposition at some rank, or nothing.

A :class:`RankPlan` is data. It maps a layer's fully qualified name to a plan *entry* and records
the weight shapes it was made for, the allocator and its settings, predicted MACs/params and a
format version. It round-trips through JSON exactly, and can be written by hand:

Example:
    >>> plan = RankPlan({
    ...     "layer1.0.conv1": LayerPlan("channel", 16),
    ...     "fc": LayerPlan("svd", 64),
    ...     "layer2.0.conv2": LayerPlan("tucker2", (24, 32)),
    ... })
    >>> RankPlan.from_json(plan.to_json()) == plan
    True

**Entries are a tagged union**, discriminated by the entry's ``scheme`` value: a registered
low-rank scheme or ``dense`` is a :class:`LayerPlan`; other entry types (channel pruning, say)
register their own tags with :func:`register_entry_type` and bring their own JSON form and
validation. A plan names only the layers it changes or pins; every other layer stays dense.

**Versions.** :data:`FORMAT_VERSION` is written into every plan. Older JSON is migrated on
reading, one version at a time (:data:`MIGRATIONS`); newer JSON is refused with a clear error.
Version 2 made entries a union: a version-1 reader would misread a plan holding other entry
types, so the version moved, and version-1 plans (low-rank and dense entries only) read as is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lrfx.cost import Cost
from lrfx.errors import LrfxError, PlanMismatchError, SchemeError, UnsupportedLayerError
from lrfx.facts import FrozenMap
from lrfx.modules import mha_projection
from lrfx.schemes import get_scheme, scheme_names

__all__ = [
    "FORMAT_VERSION",
    "ChannelPlan",
    "MIGRATIONS",
    "LayerPlan",
    "PlanEntry",
    "RankPlan",
    "register_entry_type",
]

#: Version of the JSON format written by :meth:`RankPlan.to_json`.
FORMAT_VERSION = 2

Rank = int | tuple[int, ...]


def _migrate_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 held low-rank and dense entries only, in the same form version 2 writes."""
    return {**d, "version": 2}


#: ``MIGRATIONS[v]`` turns a plan dict of version ``v`` into version ``v + 1``.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_v1}


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
    n_ranks = get_scheme(scheme).n_ranks
    if isinstance(rank, bool) or rank is None:
        raise LrfxError(f"{where}: scheme {scheme!r} needs a rank, got {rank!r}")
    if isinstance(rank, (list, tuple)):
        ranks = tuple(_as_int(r) for r in rank)
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise LrfxError(f"{where}: ranks must be integers, got {rank!r}")
        if len(ranks) != n_ranks:
            want = {1: "one rank", 2: "two ranks (r_in, r_out)"}.get(n_ranks, f"{n_ranks} ranks")
            raise LrfxError(f"{where}: {scheme} takes {want}, got {rank!r}")
        if any(r < 1 for r in ranks):
            raise LrfxError(f"{where}: ranks must be >= 1, got {rank!r}")
        return ranks if n_ranks > 1 else ranks[0]
    rank = _as_int(rank)
    if not isinstance(rank, int):
        raise LrfxError(f"{where}: rank must be an int or a tuple of ints, got {rank!r}")
    if rank < 1:
        raise LrfxError(f"{where}: rank must be >= 1, got {rank}")
    return (rank,) * n_ranks if n_ranks > 1 else rank


class PlanEntry:
    """Base class of plan entries (the members of the tagged union).

    Subclasses are frozen dataclasses with a ``scheme`` field (the tag), implement
    :meth:`to_dict` / :meth:`from_dict` and :meth:`resolve`, and are registered with
    :func:`register_entry_type` for the tags they own.
    """

    #: JSON keys an entry of this type may have.
    keys: ClassVar[tuple[str, ...]] = ()
    scheme: str

    @property
    def dense(self) -> bool:
        """Whether the entry leaves the layer as it is."""
        return False

    @property
    def lowrank(self) -> bool:
        """Whether the entry factors the layer (a :class:`LayerPlan` with a rank)."""
        return False

    @property
    def coupled(self) -> bool:
        """Whether the entry changes other layers too (so the plan's totals need the graph)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> PlanEntry:
        raise NotImplementedError

    def resolve(self, name: str, record: Any) -> tuple[PlanEntry, Cost]:
        """Check the entry against the layer's analysis record; returns the entry with shapes
        and predictions filled in, and the layer's cost under it."""
        raise NotImplementedError


_ENTRY_TYPES: dict[str, type[PlanEntry]] = {}


def register_entry_type(cls: type[PlanEntry], tags: tuple[str, ...]) -> type[PlanEntry]:
    """Make ``cls`` the entry type for plan entries whose ``scheme`` is one of ``tags``."""
    for tag in tags:
        if tag in _ENTRY_TYPES or tag in scheme_names():
            raise LrfxError(f"plan entry tag {tag!r} is already taken")
        _ENTRY_TYPES[tag] = cls
    return cls


def _entry_type(scheme: Any, where: str) -> type[PlanEntry]:
    if scheme == "dense" or scheme in scheme_names():
        return LayerPlan
    if isinstance(scheme, str) and scheme in _ENTRY_TYPES:
        return _ENTRY_TYPES[scheme]
    valid = [*scheme_names(), "dense", *_ENTRY_TYPES]
    raise LrfxError(f"{where}: unknown scheme {scheme!r}; expected one of {', '.join(valid)}")


@dataclass(frozen=True)
class LayerPlan(PlanEntry):
    """The plan for one layer: a low-rank scheme and its rank(s), or ``dense``.

    Attributes:
        scheme: A registered scheme (``svd``, ``channel``, ``spatial``, ``tucker2``, ``cp``) or
            ``dense``.
        rank: An int, or ``(r_in, r_out)`` for tucker2 (an int means both); ``None`` for dense.
        weight_shape: The weight shape the plan was made for (filled in when resolved).
        macs: Predicted MACs of the layer under this plan (filled in when resolved).
        params: Predicted parameters of the layer under this plan (filled in when resolved).

    Example:
        >>> LayerPlan("tucker2", 8).rank
        (8, 8)
    """

    keys: ClassVar[tuple[str, ...]] = ("scheme", "rank", "weight_shape", "macs", "params")

    scheme: str
    rank: Rank | None = None
    weight_shape: tuple[int, ...] | None = None
    macs: int | None = None
    params: int | None = None

    def __post_init__(self) -> None:
        if self.scheme != "dense" and self.scheme not in scheme_names():
            valid = ", ".join(scheme_names())
            raise LrfxError(f"unknown scheme {self.scheme!r}; expected one of {valid} or 'dense'")
        object.__setattr__(self, "rank", _as_rank(self.scheme, self.rank, "LayerPlan"))
        if self.weight_shape is not None:
            object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))

    @property
    def dense(self) -> bool:
        return self.scheme == "dense"

    @property
    def lowrank(self) -> bool:
        return self.scheme != "dense"

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
        if not isinstance(d, Mapping):
            raise LrfxError(f"{where}: a layer plan must be an object like "
                            f"{{\"scheme\": \"channel\", \"rank\": 16}}, got {d!r}")
        unknown = set(d) - set(cls.keys)
        if unknown or "scheme" not in d:
            raise LrfxError(f"{where}: expected keys {', '.join(cls.keys)}; got {sorted(d)}")
        ws = d.get("weight_shape")
        if ws is not None and not isinstance(ws, (list, tuple)):
            raise LrfxError(f"{where}: weight_shape must be a list of ints, got {ws!r}")
        for key in ("macs", "params"):
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise LrfxError(f"{where}: {key} must be an integer, got {v!r}")
        return cls(
            scheme=d["scheme"],
            rank=tuple(d["rank"]) if isinstance(d.get("rank"), list) else d.get("rank"),
            weight_shape=tuple(ws) if ws is not None else None,
            macs=d.get("macs"),
            params=d.get("params"),
        )

    def resolve(self, name: str, record: Any) -> tuple[LayerPlan, Cost]:
        shape = record.weight_shape
        dense = Cost(record.macs, record.params)
        if self.dense:
            return LayerPlan("dense", None, shape, dense.macs, dense.params), dense
        g0 = record.calls[0]
        scheme = get_scheme(self.scheme)
        if not scheme.applies(g0) or not record.schemes:
            why = record.note or scheme.why_not(g0) or (
                f"applicable schemes: {', '.join(record.schemes) or 'none'}")
            raise UnsupportedLayerError(
                name, f"scheme {self.scheme!r} does not apply to this {record.kind} layer ({why})"
            )
        assert self.rank is not None
        limit = scheme.max_rank(g0)
        ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,)
        for r, hi in zip(ranks, limit, strict=True):
            if not 1 <= r <= hi:
                valid = " and ".join(f"1..{h}" for h in limit)
                raise UnsupportedLayerError(
                    name, f"rank {self.rank} is out of range for scheme {self.scheme!r} "
                    f"(weight {record.weight_shape}); valid ranks: {valid}"
                )
        macs = sum(scheme.cost(g, self.rank).macs for g in record.calls)
        params = scheme.cost(g0, self.rank).params
        return LayerPlan(self.scheme, self.rank, shape, macs, params), Cost(macs, params)


@dataclass(frozen=True)
class ChannelPlan(PlanEntry):
    """Keep only some output channels of a conv/linear layer — and, with them, the matching
    channels of everything coupled to them (its norm, its consumers' inputs, the other producers
    of a residual sum: the layer's channel group, :func:`lrfx.channel_groups`).

    Attributes:
        scheme: Always ``prune`` (the entry's tag).
        keep: The output channels kept, increasing, at least one.
        channels: The layer's number of output channels (a mask's length); checked against the
            model when the plan is resolved.
        weight_shape: The weight shape the plan was made for (filled in when resolved).

    Example:
        >>> entry = ChannelPlan.from_mask([1, 0, 1, 1])
        >>> entry.keep, entry.channels, entry.pruned
        ((0, 2, 3), 4, 1)
        >>> RankPlan({"conv1": entry}).to_dict()["layers"]["conv1"]
        {'scheme': 'prune', 'keep': [0, 2, 3], 'channels': 4}
    """

    keys: ClassVar[tuple[str, ...]] = ("scheme", "keep", "channels", "weight_shape")

    scheme: str = "prune"
    keep: tuple[int, ...] = ()
    channels: int | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme != "prune":
            raise LrfxError(f"ChannelPlan: scheme must be 'prune', got {self.scheme!r}")
        if isinstance(self.keep, (str, bytes)) or not isinstance(self.keep, (list, tuple)):
            raise LrfxError(f"ChannelPlan: keep must be a list of channel indices, got "
                            f"{self.keep!r}")
        keep = tuple(_as_int(k) for k in self.keep)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keep):
            raise LrfxError(f"ChannelPlan: keep must hold integers, got {self.keep!r}")
        if not keep:
            raise LrfxError("ChannelPlan: keep is empty — the plan would remove every channel "
                            "of the layer; keep at least one")
        if any(b <= a for a, b in itertools.pairwise(keep)) or keep[0] < 0:
            raise LrfxError(f"ChannelPlan: keep must be increasing channel indices >= 0 "
                            f"without repeats, got {list(keep)}")
        channels = _as_int(self.channels)
        if channels is not None:
            if isinstance(channels, bool) or not isinstance(channels, int):
                raise LrfxError(f"ChannelPlan: channels must be an integer, got {channels!r}")
            if keep[-1] >= channels:
                raise LrfxError(f"ChannelPlan: keep names channel {keep[-1]}, but the layer has "
                                f"{channels} channels (0..{channels - 1})")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "channels", channels)
        if self.weight_shape is not None:
            object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))

    @classmethod
    def from_mask(cls, mask: Any) -> ChannelPlan:
        """The entry keeping the channels where ``mask`` (bools, 0/1, a tensor) is true."""
        values = [bool(v) for v in (mask.tolist() if hasattr(mask, "tolist") else mask)]
        if not any(values):
            raise LrfxError("ChannelPlan.from_mask: the mask keeps no channel — the plan would "
                            "remove every channel of the layer; keep at least one")
        return cls("prune", tuple(i for i, v in enumerate(values) if v), len(values))

    @property
    def pruned(self) -> int | None:
        """How many channels go (None while the layer's width is not known)."""
        return None if self.channels is None else self.channels - len(self.keep)

    @property
    def coupled(self) -> bool:
        return True

    @property
    def dense(self) -> bool:
        return self.channels is not None and len(self.keep) == self.channels

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scheme": "prune", "keep": list(self.keep)}
        if self.channels is not None:
            d["channels"] = self.channels
        if self.weight_shape is not None:
            d["weight_shape"] = list(self.weight_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "ChannelPlan") -> ChannelPlan:
        unknown = set(d) - set(cls.keys) - {"mask"}
        if unknown:
            raise LrfxError(f"{where}: unknown keys {sorted(unknown)}; a channel entry has "
                            f"{', '.join(cls.keys)} (or a \"mask\" of 0/1 instead of keep)")
        if "mask" in d:
            if "keep" in d:
                raise LrfxError(f"{where}: give keep or mask, not both")
            mask = d["mask"]
            if not isinstance(mask, list):
                raise LrfxError(f"{where}: mask must be a list of 0/1, got {mask!r}")
            entry = cls.from_mask(mask)
            if d.get("channels") not in (None, entry.channels):
                raise LrfxError(f"{where}: the mask has {entry.channels} entries but channels "
                                f"is {d['channels']}")
            return dataclasses.replace(entry, weight_shape=_shape_of(d, where))
        if "keep" not in d:
            raise LrfxError(f"{where}: a channel entry needs \"keep\": [indices] or "
                            "\"mask\": [0/1...]")
        keep = d["keep"]
        if not isinstance(keep, list):
            raise LrfxError(f"{where}: keep must be a list of channel indices, got {keep!r}")
        return cls("prune", tuple(keep), d.get("channels"), _shape_of(d, where))

    def resolve(self, name: str, record: Any) -> tuple[ChannelPlan, Cost]:
        shape = record.weight_shape
        if record.kind not in ("linear", "conv1d", "conv2d", "conv3d") or not shape:
            raise UnsupportedLayerError(
                name, f"channel pruning names a conv or linear layer whose output channels go; "
                f"this is a {record.kind}")
        out = int(shape[0])
        if self.channels is not None and self.channels != out:
            raise PlanMismatchError(
                name, f"the channel entry is for {self.channels} channels (a mask of that "
                f"length), the layer has {out}; make the mask for this model")
        if self.keep[-1] >= out:
            raise PlanMismatchError(name, f"keep names channel {self.keep[-1]}, the layer has "
                                    f"{out} (0..{out - 1})")
        return ChannelPlan("prune", self.keep, out, shape), Cost(record.macs, record.params)


def _shape_of(d: Mapping[str, Any], where: str) -> tuple[int, ...] | None:
    ws = d.get("weight_shape")
    if ws is not None and not isinstance(ws, (list, tuple)):
        raise LrfxError(f"{where}: weight_shape must be a list of ints, got {ws!r}")
    return tuple(ws) if ws is not None else None


register_entry_type(ChannelPlan, ("prune",))


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


def _entry_from_dict(d: Any, where: str) -> PlanEntry:
    if not isinstance(d, Mapping):
        raise LrfxError(f"{where}: a layer's entry must be an object with a \"scheme\" key "
                        f"(e.g. {{\"scheme\": \"channel\", \"rank\": 16}}), got {d!r}")
    try:
        return _entry_type(d.get("scheme"), where).from_dict(d, where)
    except LrfxError as exc:  # checks inside the entry's constructor do not know its name
        if str(exc).startswith(where):
            raise
        raise LrfxError(f"{where}: {str(exc).removeprefix('LayerPlan: ')}") from None


@dataclass(frozen=True, eq=False)
class RankPlan(Mapping[str, PlanEntry]):
    """Per-layer plan entries; layers not named stay dense.

    Args:
        layers: Layer name to entry (:class:`LayerPlan`, or ``(scheme, rank)`` pairs, or dicts).
        allocator: Who made the plan (``manual`` for hand-written plans).
        settings: The allocator's settings (JSON values).
        macs: Predicted total MACs of the model under the plan.
        params: Predicted total parameters of the model under the plan.
        version: Format version.
    """

    layers: Mapping[str, PlanEntry] = field(default_factory=dict)
    allocator: str = "manual"
    settings: Mapping[str, Any] = field(default_factory=dict)
    macs: int | None = None
    params: int | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise LrfxError(f"plan 'version' must be an integer, got {self.version!r}")
        if self.version != FORMAT_VERSION:
            raise LrfxError(
                f"plan format version {self.version} is not supported (this lrfx writes version "
                f"{FORMAT_VERSION} and reads versions 1..{FORMAT_VERSION}); re-create the plan "
                "with this version of lrfx"
            )
        if not isinstance(self.layers, Mapping):
            raise LrfxError(f"RankPlan layers must be a mapping of layer name to LayerPlan, "
                            f"got {type(self.layers).__name__}")
        layers: dict[str, PlanEntry] = {}
        for name, lp in self.layers.items():
            if not isinstance(name, str) or not name:
                raise LrfxError(f"RankPlan: layer names must be non-empty strings, got {name!r}")
            if isinstance(lp, tuple) and len(lp) == 2:
                lp = LayerPlan(*lp)
            elif isinstance(lp, Mapping):
                lp = _entry_from_dict(lp, f"layer {name!r}")
            if not isinstance(lp, PlanEntry):
                raise LrfxError(f"RankPlan: layer {name!r} maps to {lp!r}, expected a LayerPlan")
            layers[name] = lp
        for key in ("macs", "params"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise LrfxError(f"RankPlan: {key} must be an integer or None, got {v!r}")
        if not isinstance(self.settings, Mapping):
            raise LrfxError(f"RankPlan: settings must be an object, got {self.settings!r}")
        _check_json_value(dict(self.settings), "RankPlan")
        object.__setattr__(self, "layers", FrozenMap(layers))
        object.__setattr__(self, "settings", FrozenMap(_freeze(dict(self.settings))))

    # Mapping protocol: a plan reads like a dict of layer plans.
    def __getitem__(self, name: str) -> PlanEntry:
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
        """The layers the plan factors (low-rank entries; dense entries left out)."""
        return {k: v for k, v in self.layers.items() if isinstance(v, LayerPlan) and v.lowrank}

    @property
    def channels(self) -> dict[str, ChannelPlan]:
        """The channel-pruning entries (keyed by a producer of each pruned channel group)."""
        return {k: v for k, v in self.layers.items() if isinstance(v, ChannelPlan)}

    @property
    def changed(self) -> dict[str, PlanEntry]:
        """Every entry that changes its layer (of any entry type)."""
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
        """Read a plan dict of any supported version (older ones are migrated)."""
        if d.get("format") != "lrfx.RankPlan":
            raise LrfxError("not an lrfx plan: the JSON has no \"format\": \"lrfx.RankPlan\" key")
        data = dict(d)
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise LrfxError(f"plan JSON: 'version' must be an integer such as {FORMAT_VERSION}, "
                            f"got {version!r}")
        if version < 1 or version > FORMAT_VERSION:
            raise LrfxError(
                f"plan format version {version} is not supported (this lrfx reads versions "
                f"1..{FORMAT_VERSION}); re-create the plan with this version of lrfx"
            )
        while version < FORMAT_VERSION:
            data = MIGRATIONS[version](data)
            version = data["version"]
        unknown = set(data) - {"format", "version", "allocator", "settings", "macs", "params",
                               "layers"}
        if unknown:
            raise LrfxError(f"plan JSON: unknown keys {sorted(unknown)}; expected format, "
                            "version, allocator, settings, macs, params, layers")
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise LrfxError("plan JSON: 'layers' must be an object of layer name to layer plan")
        allocator = data.get("allocator", "manual")
        if not isinstance(allocator, str):
            raise LrfxError(f"plan JSON: 'allocator' must be a string, got {allocator!r}")
        settings = data.get("settings", {})
        if settings is None:
            settings = {}
        return cls(
            layers={k: _entry_from_dict(v, f"layer {k!r}") for k, v in layers.items()},
            allocator=allocator,
            settings=settings,
            macs=data.get("macs"),
            params=data.get("params"),
            version=version,
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
        accept its entry, and have ranks within range. Predicted MACs/params per layer and for
        the whole model come from the cost model.

        Raises:
            PlanMismatchError: A layer is missing or its weight shape differs.
            UnsupportedLayerError: A scheme does not apply to a layer, or a rank is out of range.
        """
        layers: dict[str, PlanEntry] = {}
        total = Cost(analysis.total_macs, analysis.total_params)
        for name, lp in self.layers.items():
            if name not in analysis:
                near = [n for n in analysis.names if n.endswith(name.split(".")[-1])][:5]
                hint = f"; similar names: {', '.join(near)}" if near else ""
                raise PlanMismatchError(name, f"the model has no such layer{hint}")
            rec = analysis[name]
            shape = rec.weight_shape
            want = getattr(lp, "weight_shape", None)
            if want is not None and shape is not None and want != shape:
                raise PlanMismatchError(
                    name, f"the plan was made for weight shape {want}, the model's "
                    f"weight is {shape}; make a new plan for this model"
                )
            if not rec.calls:
                raise UnsupportedLayerError(name, f"a {rec.kind} has no weight to factor")
            try:
                entry, cost = lp.resolve(name, rec)
            except SchemeError as exc:
                raise UnsupportedLayerError(name, str(exc)) from None
            layers[name] = entry
            total = Cost(total.macs - rec.macs + cost.macs, total.params - rec.params + cost.params)
        # a channel entry changes its consumers too: the totals come from the pruned graph
        coupled = any(e.coupled for e in layers.values())
        return RankPlan(
            layers,
            allocator=self.allocator,
            settings=self.settings,
            macs=None if coupled else total.macs,
            params=None if coupled else total.params,
            version=self.version,
        )

    def validate(self, model: Any, example_inputs: Any = None) -> RankPlan:
        """Check the plan against a model (weight shapes at least; everything with inputs).

        Without ``example_inputs`` only layer names and weight shapes are checked, from the
        model's parameters. With them the model is analyzed and :meth:`resolve` runs; that is
        :func:`lrfx.validate_plan`, which new code should call directly.

        Returns:
            The plan, resolved when ``example_inputs`` are given.

        Raises:
            PlanMismatchError: Names the first layer that does not fit.
        """
        if example_inputs is not None:
            # The one call from the core up into the public API, kept so that plans written
            # for lrfx 0.1 keep working; the analysis it needs lives above the core.
            from lrfx.api import validate_plan

            return validate_plan(self, model, example_inputs)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, lp in self.layers.items():
            w = params.get(f"{name}.weight", params.get(name))
            if w is None:
                w = _attention_projection(model, name)
            if w is None:
                raise PlanMismatchError(name, "the model has no such layer (no weight "
                                        f"{name}.weight); check the layer names with lrfx analyze")
            want = getattr(lp, "weight_shape", None)
            if want is not None and tuple(w.shape) != want:
                raise PlanMismatchError(
                    name, f"the plan was made for weight shape {want}, the model's "
                    f"weight is {tuple(w.shape)}; make a new plan for this model"
                )
        return self


def _attention_projection(model: Any, name: str) -> Any:
    """The weight of ``mha.q_proj`` / ``k_proj`` / ``v_proj`` of an ``nn.MultiheadAttention``."""
    parent, _, part = name.rpartition(".")
    try:
        mha = model.get_submodule(parent)
    except AttributeError:
        return None
    if not isinstance(mha, nn.MultiheadAttention) or part not in ("q_proj", "k_proj", "v_proj"):
        return None
    return mha_projection(mha, part)[0]
