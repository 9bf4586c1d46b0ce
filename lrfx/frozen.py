"""A read-only mapping that pickles and deep-copies (for facts kept on graph modules)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FrozenMap"]


class FrozenMap(Mapping[Any, Any]):
    """A read-only mapping that, unlike ``types.MappingProxyType``, can be pickled and
    deep-copied (so graph modules carrying lrfx facts can be copied, saved and traced again)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[Any, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))
