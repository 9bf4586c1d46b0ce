"""Plan entries as a tagged union, the format version and the migration of older JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import lrfx
from lrfx.cost import Cost
from lrfx.plan import (
    _ENTRY_TYPES,
    FORMAT_VERSION,
    MIGRATIONS,
    LayerPlan,
    PlanEntry,
    RankPlan,
    register_entry_type,
)


def test_current_version_and_a_migration_for_every_older_one() -> None:
    assert FORMAT_VERSION == 2
    assert set(MIGRATIONS) == set(range(1, FORMAT_VERSION))


def test_version_1_json_is_migrated() -> None:
    v1 = {"format": "lrfx.RankPlan", "version": 1, "allocator": "lc",
          "settings": {"metric": "macs"}, "macs": 10, "params": 5,
          "layers": {"fc": {"scheme": "svd", "rank": 4, "weight_shape": [6, 8]},
                     "conv": {"scheme": "dense"}}}
    plan = RankPlan.from_json(json.dumps(v1))
    assert plan.version == FORMAT_VERSION
    assert plan["fc"] == LayerPlan("svd", 4, weight_shape=(6, 8))
    assert plan["conv"].dense and set(plan.factored) == {"fc"}
    assert json.loads(plan.to_json())["version"] == FORMAT_VERSION


@pytest.mark.parametrize(("doc", "match"), [
    ({"version": "1"}, r"'version' must be an integer"),
    ({"version": True}, r"'version' must be an integer"),
    ({"version": 0}, r"version 0 is not supported"),
    ({"version": 3}, r"version 3 is not supported .*versions 1\.\.2"),
    ({"layers": {"fc": None}}, r"layer 'fc': a layer's entry must be an object"),
    ({"layers": {"fc": {"scheme": "svd", "rank": 2, "macs": "9"}}},
     r"macs must be an integer"),
    ({"layers": {"fc": {"rank": 2}}}, r"layer 'fc': unknown scheme None"),
    ({"allocator": 3}, r"'allocator' must be a string"),
    ({"extra": 1}, r"unknown keys \['extra'\]"),
])
def test_bad_plan_json_says_which_key_is_wrong(doc: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {"format": "lrfx.RankPlan", "version": FORMAT_VERSION, "layers": {}}
    with pytest.raises(lrfx.LrfxError, match=match):
        RankPlan.from_dict({**base, **doc})


# --- another entry type joins the union -------------------------------------------------------


@dataclass(frozen=True)
class KeepChannels(PlanEntry):
    """A toy non-low-rank entry: which output channels of a layer to keep."""

    keys: ClassVar[tuple[str, ...]] = ("scheme", "keep")

    scheme: str
    keep: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> KeepChannels:
        if set(d) - set(cls.keys):
            raise lrfx.LrfxError(f"{where}: unknown keys {sorted(set(d) - set(cls.keys))}")
        return cls(d["scheme"], tuple(int(i) for i in d.get("keep", ())))

    def resolve(self, name: str, record: Any) -> tuple[PlanEntry, Cost]:
        n = record.weight_shape[0]
        if any(not 0 <= i < n for i in self.keep):
            raise lrfx.UnsupportedLayerError(name, f"channels out of range 0..{n - 1}")
        frac = len(self.keep) / n
        return self, Cost(int(record.macs * frac), int(record.params * frac))


@pytest.fixture
def keep_channels() -> Iterator[None]:
    register_entry_type(KeepChannels, ("keep",))
    try:
        yield
    finally:
        del _ENTRY_TYPES["keep"]


def test_a_new_entry_type_round_trips_and_resolves(keep_channels: None) -> None:
    plan = RankPlan({"0": {"scheme": "keep", "keep": [0, 2, 3]}, "2": LayerPlan("svd", 2)})
    assert isinstance(plan["0"], KeepChannels)
    back = RankPlan.from_json(plan.to_json())
    assert back == plan and back["0"] == KeepChannels("keep", (0, 2, 3))
    assert set(plan.factored) == {"2"} and set(plan.changed) == {"0", "2"}
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6))
    a = lrfx.analyze(model, torch.randn(5, 8), spectra=False)
    resolved = plan.resolve(a)
    assert resolved.macs == a.total_macs - a["0"].macs + int(a["0"].macs * 3 / 4) \
        - a["2"].macs + resolved["2"].macs  # type: ignore[attr-defined]
    with pytest.raises(lrfx.UnsupportedLayerError, match="out of range"):
        RankPlan({"0": {"scheme": "keep", "keep": [9]}}).resolve(a)
    with pytest.raises(lrfx.LrfxError, match="already taken"):
        register_entry_type(KeepChannels, ("svd",))


def test_unknown_tags_name_every_valid_one() -> None:
    with pytest.raises(lrfx.LrfxError, match=r"unknown scheme 'slim'; expected one of svd, .*"
                       r"dense, prune"):
        RankPlan({"fc": {"scheme": "slim"}})
