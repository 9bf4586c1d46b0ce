"""How to compress, as data: one frozen, validated, JSON-serializable configuration.

:class:`CompressConfig` gathers everything :func:`lrfx.compress` decides by: the budget, the
allocator and scheme, which layers to leave alone, per-layer rank bounds and error caps, rank
rounding, and the calibration options. It is stored in the plan (``plan.settings["config"]``) and
in the report, so a plan says how it was made; the CLI reads the same object from a JSON file
(``lrfx compress MODEL --config cfg.json``) and its flags override single fields.

Layer selection — ``exclude`` and the keys of per-layer mappings — takes:

* a layer name, ``"fc"`` or ``"layer1.0.conv2"``; a name also covers the layers under it
  (``"layer4"`` excludes every layer of ``layer4``);
* a glob, ``"*.downsample.*"`` or ``"encoder.layer.*.attention.*"`` (:mod:`fnmatch` rules);
* a module type, ``torch.nn.Linear`` (stored as ``"type:Linear"``), which matches layers whose
  module is of that class or a subclass.

A per-layer setting (``min_rank``, ``max_rank``, ``max_error``) is a number for every layer or a
mapping ``{selector: number}``; a layer takes the value of its most specific match (an exact
name, then the longest name prefix, then the longest glob, then a type).

Example:
    >>> import torch, lrfx
    >>> cfg = lrfx.CompressConfig(macs=0.5, exclude=("fc", torch.nn.Linear), min_rank=8)
    >>> cfg.exclude
    ('fc', 'type:Linear')
    >>> lrfx.CompressConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lrfx.errors import LrfxError
from lrfx.frozen import FrozenMap

__all__ = ["CompressConfig", "LayerRules"]

_ALLOCATORS = ("lc", "energy", "global_sigma", "uniform")
_PRECISIONS = ("auto", "float64", "float32")
_MODES = ("auto", "fx", "module")

#: A factored layer whose predicted error reaches this, or whose rank is 1, is warned about.
WARN_ERROR = 0.9

#: Sequential calibration holds every calibration batch's live activations twice at once; in
#: automatic mode (``sequential=None``) it is used only when its estimate stays below this many
#: bytes (else the one-shot whitened factors are used and the report says why).
SEQUENTIAL_MEMORY = 4 << 30


def _selector(s: Any, argument: str) -> str:
    if isinstance(s, type) and issubclass(s, nn.Module):
        return f"type:{s.__name__}"
    if isinstance(s, str) and s.strip():
        return s.strip()
    raise LrfxError(f"{argument}: a layer selector is a name, a glob or an nn.Module type; got "
                    f"{s!r}")


def _per_layer(value: Any, argument: str, kind: type) -> Any:
    """A number, or a frozen ``{selector: number}`` mapping; checked."""
    if value is None:
        return None

    def one(v: Any, where: str) -> Any:
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LrfxError(f"{where} must be a positive integer rank, got {v!r}")
        elif (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
              or not 0 <= v <= 1):
            raise LrfxError(f"{where} must be a relative error in [0, 1], got {v!r}")
        return v

    if isinstance(value, Mapping):
        return FrozenMap({_selector(k, argument): one(v, f"{argument}[{k!r}]")
                          for k, v in value.items()})
    return one(value, argument)


def _budget(value: Any, argument: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LrfxError(f"{argument} must be a fraction in (0, 1] or an absolute count, "
                        f"got {value!r}")
    if value <= 0:
        raise LrfxError(f"the {argument} budget must be positive: a fraction in (0, 1] or an "
                        f"absolute count, got {value!r}")
    return value


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`lrfx.compress` decides by (all fields optional but the budget).

    Attributes:
        macs, params: The budget (exactly one of these and ``latency``): a fraction of the
            model's total in (0, 1] or an absolute count.
        latency: A latency budget: a fraction in (0, 1] of the dense model's latency measured on
            this machine at the example inputs' shapes; ranks are allocated on measured per-layer
            times (:mod:`lrfx.latency`) and a layer is never factored into a slower form.
            Needs ``allocator="lc"``.
        latency_batch_sizes: With a latency budget, also time at these batch sizes (the example
            inputs cycled or cut along their first dimension): a layer is factored only into
            forms measured faster than dense at *every* batch size, and the budget is met by the
            mean of the latency ratios over them. Empty: the example inputs' batch size only.
        allocator: ``lc`` (default), ``energy``, ``global_sigma`` or ``uniform``.
        scheme: ``auto`` or one of the allocatable schemes (``channel``, ``spatial``,
            ``tucker2``); Linear layers always use ``svd``.
        round_to: Ranks are multiples of this (8 for SIMD-friendly shapes).
        exclude: Layers left dense (names, globs, module types; see the module docstring).
        min_rank, max_rank: Rank bounds, for every layer or per selector. A layer whose
            bounds leave no rank cheaper than dense stays dense (the report says so).
        max_error: Largest predicted relative error a layer may be given (a hard cap; a layer
            with no rank within it stays dense).
        warn_error: A factored layer whose predicted error reaches this, or whose rank is 1,
            is listed in the report's warnings and logged (default 0.9; ``None``: never).
        calibration_batches: Use at most this many calibration batches (``None``: all).
        calibration_inputs: Which part of a calibration batch feeds the model: ``"auto"``
            (``(inputs, targets)`` pairs are recognized), an item index, dict keys, or a
            callable (not stored in JSON; see :mod:`lrfx.batches`).
        recalibrate: Re-estimate BatchNorm statistics on the calibration data.
        sequential: With calibration data, fit each layer's factors to the inputs the
            *compressed* layers before it produce, so later layers correct earlier truncation
            (:mod:`lrfx.passes.rewrite.refit`). ``None`` (default): on for traced models when
            the activations it holds fit in :data:`SEQUENTIAL_MEMORY`; ``True``: always (an
            error in module mode); ``False``: every layer whitened by the original model's
            statistics only.
        sensitivity: Loss-aware allocation with calibration data: weigh each layer's error by
            how much it moves the model's output (:mod:`lrfx.passes.analysis.sensitivity`):
            ``measured`` (each layer's measured error-to-output slope at a first plan's rank),
            ``fisher`` (the output read as logits), ``output`` (any output), or ``None`` (every
            layer alike). For the ``lc`` and ``global_sigma`` allocators.
        precision: Of the spectra: ``auto``, ``float64`` or ``float32``.
        mode: Capture: ``auto``, ``fx`` or ``module``.
        verify: Check the plan's schemes at full rank against the model.
        settings: Allocator settings (``rank_min`` for ``global_sigma``, ``energy``...).
    """

    macs: float | int | None = None
    params: float | int | None = None
    latency: float | None = None
    latency_batch_sizes: tuple[int, ...] = ()
    allocator: str = "lc"
    scheme: str = "auto"
    round_to: int | None = None
    exclude: tuple[str, ...] = ()
    min_rank: int | Mapping[str, int] | None = None
    max_rank: int | Mapping[str, int] | None = None
    max_error: float | Mapping[str, float] | None = None
    warn_error: float | None = WARN_ERROR
    calibration_batches: int | None = None
    calibration_inputs: Any = "auto"
    recalibrate: bool = True
    sequential: bool | None = None
    sensitivity: str | None = None
    precision: str = "auto"
    mode: str = "auto"
    verify: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lrfx.batches import check_selector

        set_ = object.__setattr__
        set_(self, "macs", _budget(self.macs, "macs"))
        set_(self, "params", _budget(self.params, "params"))
        lat = self.latency
        if lat is not None:
            if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not (
                    0 < lat <= 1):
                raise LrfxError(f"latency must be a fraction in (0, 1] of the dense model's "
                                f"measured latency, got {lat!r}")
            set_(self, "latency", float(lat))
        if sum(b is not None for b in (self.macs, self.params, self.latency)) > 1:
            raise LrfxError("give one budget, macs=, params= or latency=, not several")
        for name, valid in (("allocator", _ALLOCATORS), ("precision", _PRECISIONS),
                            ("mode", _MODES)):
            v = getattr(self, name)
            if v not in valid:
                close = difflib.get_close_matches(str(v), valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LrfxError(f"unknown {name} {v!r}{hint}; choose one of {', '.join(valid)}")
        sizes = self.latency_batch_sizes
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = (sizes,)
        if not isinstance(sizes, (tuple, list)) or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise LrfxError(f"latency_batch_sizes must be positive integers, got {sizes!r}")
        set_(self, "latency_batch_sizes", tuple(sorted(set(sizes))))
        if self.latency_batch_sizes and self.latency is None and (
                self.macs is not None or self.params is not None):
            raise LrfxError("latency_batch_sizes applies to a latency budget (latency=...), not "
                            "to a macs= or params= budget")
        if self.latency is not None and self.allocator != "lc":
            raise LrfxError(f"a latency budget is allocated by the lc knapsack on measured "
                            f"per-layer times; allocator {self.allocator!r} ranks layers by its "
                            "own rule: use allocator='lc' (the default) or a macs= budget")
        if not isinstance(self.scheme, str):
            raise LrfxError(f"scheme must be a string ('auto' or a scheme name), got "
                            f"{self.scheme!r}")
        r = self.round_to
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise LrfxError(f"round_to must be a positive integer, got {r!r}")
        exclude = self.exclude
        if isinstance(exclude, (str, type)):
            exclude = (exclude,)
        if not isinstance(exclude, Iterable):
            raise LrfxError(f"exclude must be a list of layer names, globs or module types, "
                            f"got {exclude!r}")
        set_(self, "exclude", tuple(_selector(s, "exclude") for s in exclude))
        set_(self, "min_rank", _per_layer(self.min_rank, "min_rank", int))
        set_(self, "max_rank", _per_layer(self.max_rank, "max_rank", int))
        set_(self, "max_error", _per_layer(self.max_error, "max_error", float))
        if self.warn_error is not None:
            _per_layer(self.warn_error, "warn_error", float)
        b = self.calibration_batches
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise LrfxError(f"calibration_batches must be a positive integer, got {b!r}")
        check_selector(self.calibration_inputs)
        if isinstance(self.calibration_inputs, list):
            set_(self, "calibration_inputs", tuple(self.calibration_inputs))
        if self.sensitivity is not None:
            if self.sensitivity not in ("fisher", "measured", "output"):
                raise LrfxError(f"unknown sensitivity {self.sensitivity!r}; choose 'measured', "
                                "'fisher', 'output' or None")
            if self.allocator not in ("lc", "global_sigma"):
                raise LrfxError(f"sensitivity={self.sensitivity!r} weighs the errors the lc and "
                                f"global_sigma allocators minimize; allocator "
                                f"{self.allocator!r} ranks layers on their own: drop "
                                "sensitivity= or use allocator='lc'")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise LrfxError(f"sequential must be True, False or None (automatic), got "
                            f"{self.sequential!r}")
        for name in ("recalibrate", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise LrfxError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.settings, Mapping) or any(
                not isinstance(k, str) for k in self.settings):
            raise LrfxError(f"settings must map setting names to values, got {self.settings!r}")
        set_(self, "settings", FrozenMap(dict(self.settings)))

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def of(cls, config: CompressConfig | Mapping[str, Any] | str | Path | None = None,
           **overrides: Any) -> CompressConfig:
        """A config from a config, a dict, or a JSON file, with ``overrides`` (``None`` values
        are ignored: they mean "as configured")."""
        if config is None:
            base = cls()
        elif isinstance(config, CompressConfig):
            base = config
        elif isinstance(config, Mapping):
            base = cls.from_dict(config)
        elif isinstance(config, (str, Path)):
            path = Path(config)
            if not path.is_file():
                raise LrfxError(f"config file {str(path)!r} does not exist")
            try:
                base = cls.from_json(path.read_text())
            except LrfxError as exc:
                raise LrfxError(f"{str(path)!r}: {exc}") from None
        else:
            raise LrfxError(f"config must be a lrfx.CompressConfig, a dict or the path of a JSON "
                            f"file; got {type(config).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return base
        if given.keys() & {"macs", "params", "latency"}:  # a budget replaces the configured one
            for k in ("macs", "params", "latency"):
                given.setdefault(k, None)
        return base.replace(**given)

    def replace(self, **changes: Any) -> CompressConfig:
        """A copy with ``changes`` (validated); unknown fields are named."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = [k for k in changes if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LrfxError(f"CompressConfig has no field {unknown[0]!r}{hint}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressConfig:
        if not isinstance(data, Mapping):
            raise LrfxError(f"a config is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LrfxError(f"unknown config field {unknown[0]!r}{hint}; fields: "
                            f"{', '.join(sorted(names))}")
        kw = dict(data)
        if isinstance(kw.get("latency_batch_sizes"), list):
            kw["latency_batch_sizes"] = tuple(kw["latency_batch_sizes"])
        if isinstance(kw.get("exclude"), list):
            kw["exclude"] = tuple(kw["exclude"])
        if isinstance(kw.get("calibration_inputs"), list):
            kw["calibration_inputs"] = tuple(kw["calibration_inputs"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> CompressConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LrfxError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON values only; a callable ``calibration_inputs`` is recorded as ``"callable"``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            elif callable(v):
                v = "callable"
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def rules(self) -> LayerRules:
        """The per-layer part (exclusions, bounds, caps) as a matcher."""
        return LayerRules(self.exclude, self.min_rank, self.max_rank, self.max_error)


def _specificity(selector: str, name: str, types: Sequence[str]) -> tuple[int, int] | None:
    """How well ``selector`` matches layer ``name`` (higher is more specific), or ``None``."""
    if selector.startswith("type:"):
        return (0, 0) if selector[5:] in types else None
    if selector == name:
        return (3, len(selector))
    if name.startswith(selector + "."):
        return (2, len(selector))
    if any(c in selector for c in "*?[") and (
            fnmatch.fnmatchcase(name, selector)
            or fnmatch.fnmatchcase(name, selector + ".*")):
        return (1, len(selector))
    return None


@dataclass(frozen=True)
class LayerRules:
    """Per-layer decisions of a config: excluded or not, rank bounds, error cap."""

    exclude: tuple[str, ...] = ()
    min_rank: Any = None
    max_rank: Any = None
    max_error: Any = None

    @staticmethod
    def _pick(value: Any, name: str, types: Sequence[str]) -> Any:
        if value is None or not isinstance(value, Mapping):
            return value
        best, hit = None, None
        for sel, v in value.items():
            s = _specificity(sel, name, types)
            if s is not None and (best is None or s > best):
                best, hit = s, v
        return hit

    def excluded_by(self, name: str, types: Sequence[str] = ()) -> str | None:
        """The selector that excludes ``name`` (or ``None``)."""
        return next((s for s in self.exclude if _specificity(s, name, types) is not None), None)

    def bounds(self, name: str, types: Sequence[str] = ()) -> tuple[int | None, int | None,
                                                                   float | None]:
        """``(min_rank, max_rank, max_error)`` of one layer."""
        return (self._pick(self.min_rank, name, types), self._pick(self.max_rank, name, types),
                self._pick(self.max_error, name, types))

    @property
    def active(self) -> bool:
        return bool(self.exclude) or any(
            v is not None for v in (self.min_rank, self.max_rank, self.max_error))

    def selectors(self) -> list[tuple[str, str]]:
        """``(argument, selector)`` of every selector the rules use."""
        out = [("exclude", s) for s in self.exclude]
        for arg in ("min_rank", "max_rank", "max_error"):
            v = getattr(self, arg)
            if isinstance(v, Mapping):
                out += [(arg, s) for s in v]
        return out

    def check_against(self, names: Sequence[str], types_of: Callable[[str], Sequence[str]]
                      ) -> list[str]:
        """Selectors that match no layer: an exact name raises (a typo would silently compress
        the layer), a glob or type is returned for a warning.

        Raises:
            LrfxError: A plain name that is no layer (with the closest names).
        """
        unmatched = []
        for arg, sel in self.selectors():
            if any(_specificity(sel, n, types_of(n)) is not None for n in names):
                continue
            if sel.startswith("type:") or any(c in sel for c in "*?["):
                unmatched.append(f"{arg} {sel!r} matches no factorable layer")
                continue
            close = difflib.get_close_matches(sel, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise LrfxError(f"{arg}: {sel!r} is not a factorable layer of this model{hint} "
                            "(names are those of lrfx.analyze(...).table(); globs such as "
                            "'layer1.*' and module types are accepted)")
        return unmatched
