"""Model inputs as data: positional, keyword, or both — and how they feed a traced graph.

Every entry point takes ``example_inputs`` (and calibration batches) in any of these forms:

* a tensor: ``model(x)``;
* a tuple or list: positional inputs, ``model(*inputs)``;
* a mapping (a dict, a transformers ``BatchEncoding``): keyword inputs, ``model(**inputs)``;
* ``(args, kwargs)``: a tuple or list followed by a mapping, ``model(*args, **kwargs)``.

:func:`bind` matches them to the model's ``forward`` signature. Tensors (and containers of them)
become the graph's inputs; every other argument — passed by the caller, or a default the caller
left alone, such as ``forward(x, embed=False)`` — is fixed while tracing (FX ``concrete_args``),
so Python branches on flags trace. An :class:`InputSpec` records the result, so that passes can
feed later calls (calibration batches) to the graph the same way.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from lrfx.errors import LrfxError
from lrfx.frozen import FrozenMap

__all__ = ["InputSpec", "Inputs", "bind"]


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return FrozenMap(dict(d or {}))


@dataclass(frozen=True)
class Inputs:
    """One call's inputs: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example: Any, argument: str = "example_inputs") -> Inputs:
        """Normalize any accepted form (see the module docstring).

        Raises:
            LrfxError: Anything else (names ``argument`` and the accepted forms).
        """
        if isinstance(example, Inputs):
            return example
        if isinstance(example, torch.Tensor):
            return cls((example,), {})
        if isinstance(example, Mapping):
            keys = [k for k in example if not isinstance(k, str)]
            if keys:
                raise LrfxError(f"{argument}: keyword inputs need string keys, got {keys[:3]}")
            return cls((), dict(example))
        if isinstance(example, (tuple, list)):
            if (len(example) == 2 and isinstance(example[0], (tuple, list))
                    and isinstance(example[1], Mapping)):
                return cls(tuple(example[0]), dict(example[1]))
            return cls(tuple(example), {})
        raise LrfxError(
            f"{argument} must be a tensor, a tuple of positional inputs, a mapping of keyword "
            f"inputs, or (args, kwargs); got {type(example).__module__}.{type(example).__name__}"
        )

    def tensors(self) -> list[torch.Tensor]:
        leaves, _ = tree_flatten((self.args, dict(self.kwargs)))
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def map_tensors(self, fn: Callable[[torch.Tensor], Any]) -> Inputs:
        """The same inputs with ``fn`` applied to every tensor (nested ones too)."""
        def f(x: Any) -> Any:
            return fn(x) if isinstance(x, torch.Tensor) else x

        return Inputs(tree_map(f, self.args), tree_map(f, dict(self.kwargs)))

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        """Shapes, for messages: ``(1, 3, 224, 224), input_ids=(2, 8)``."""
        def one(x: Any) -> str:
            return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__

        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.tensors())


def _is_tensorlike(x: Any) -> bool:
    """A tensor, or a (nested) container holding at least one."""
    leaves, _ = tree_flatten(x)
    return any(isinstance(v, torch.Tensor) for v in leaves)


@dataclass(frozen=True)
class InputSpec:
    """How a traced graph's placeholders are fed from a model call.

    Attributes:
        names: The parameters that are graph inputs (placeholders), in order.
        fixed: The other parameters, fixed while tracing, and their values.
        var_keyword: The name of the ``**kwargs`` parameter, if any (traced empty).
        order: Every named parameter of ``forward`` in order (to place positional inputs).
    """

    names: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    var_keyword: str | None = None
    order: tuple[str, ...] = ()

    def feed(self, inputs: Inputs) -> tuple[Any, ...]:
        """The positional arguments of the graph for ``inputs``.

        Raises:
            LrfxError: An input the graph has no place for, a graph input missing, or a fixed
                argument given another value than the one traced with.
        """
        if not self.names and not self.fixed:  # traced without a signature
            if inputs.kwargs:
                raise LrfxError(f"this graph takes positional inputs only; got keywords "
                                f"{sorted(inputs.kwargs)}")
            return tuple(inputs.args)
        order = self.order or (*self.names, *self.fixed)
        given: dict[str, Any] = dict(zip(order, inputs.args, strict=False))
        if len(inputs.args) > len(order):
            raise LrfxError(f"{len(inputs.args)} positional inputs given; the model takes "
                            f"{len(order)}: {', '.join(order)}")
        for k, v in inputs.kwargs.items():
            if k not in order:
                raise LrfxError(_unknown_keys([k], order))
            given[k] = v
        for name, value in given.items():
            if name in self.fixed and not _same(value, self.fixed[name]):
                raise LrfxError(
                    f"argument {name!r} was traced with the value {self.fixed[name]!r}; this "
                    f"call passes {value!r}. Trace with the value you call with")
        missing = [n for n in self.names if n not in given]
        if missing:
            raise LrfxError(f"input(s) {', '.join(map(repr, missing))} missing: the graph was "
                            "traced with them")
        return tuple(given[n] for n in self.names)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else a is b
    except Exception:
        return a is b


def _unknown_keys(keys: Sequence[str], accepted: Sequence[str]) -> str:
    hints = []
    for k in keys:
        close = difflib.get_close_matches(k, accepted, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"keyword input(s) {', '.join(hints)} are not parameters of the model's forward; "
            f"it accepts: {', '.join(accepted)}")


def forward_signature(model: torch.nn.Module, unwrap: bool = False) -> inspect.Signature:
    """The signature of ``type(model).forward`` without ``self`` (optionally undecorated)."""
    fn = type(model).forward
    if unwrap:
        fn = inspect.unwrap(fn)
    sig = inspect.signature(fn)
    if isinstance(inspect.getattr_static(type(model), "forward", None), staticmethod):
        return sig
    params = list(sig.parameters.values())
    # The first parameter is the instance, whatever it is called (``self``, ``s``, ``mod``...);
    # ``def forward(*args)`` receives it inside ``args`` and keeps its signature.
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return sig.replace(parameters=params[1:])
    return sig


def bind(
    signature: inspect.Signature,
    inputs: Inputs | None,
    *,
    extra_fixed: Mapping[str, Any] | None = None,
    argument: str = "example_inputs",
) -> InputSpec:
    """Match ``inputs`` to ``signature``: which parameters are graph inputs, which are fixed.

    Tensors (and containers of tensors) become placeholders; every other argument is fixed:
    the value passed, or the parameter's default. ``extra_fixed`` fixes parameters the caller
    left out to other values than their defaults (``use_cache=False``, say). Without inputs
    (``None``), required parameters are placeholders and defaults that are not tensors are fixed.

    Raises:
        LrfxError: Unknown keyword inputs (the valid names listed), too many positional inputs,
            or a required parameter left out.
    """
    if inputs is None:
        params = list(signature.parameters.values())
        var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        fixed = {p.name: p.default for p in params
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 and p.default is not inspect.Parameter.empty and not _is_tensorlike(p.default)}
        names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 and p.name not in fixed]
        order = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        return InputSpec(tuple(names), _frozen(fixed), var_kw, order)
    params = list(signature.parameters.values())
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs.args) > len(positional):
        raise LrfxError(f"{argument}: {len(inputs.args)} positional inputs given; forward takes "
                        f"{len(positional)} ({', '.join(p.name for p in positional)})")
    given = {p.name: v for p, v in zip(positional, inputs.args, strict=False)}
    unknown = [k for k in inputs.kwargs if k not in names]
    if unknown:
        raise LrfxError(f"{argument}: {_unknown_keys(unknown, names)}")
    for k, v in inputs.kwargs.items():
        if k in given:
            raise LrfxError(f"{argument}: input {k!r} is given both positionally and as a "
                            "keyword")
        given[k] = v
    fixed = {}
    traced: list[str] = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in given:
            if _is_tensorlike(given[p.name]):
                traced.append(p.name)
            else:
                fixed[p.name] = given[p.name]
            continue
        if extra_fixed and p.name in extra_fixed:
            fixed[p.name] = extra_fixed[p.name]
        elif p.default is not inspect.Parameter.empty:
            if _is_tensorlike(p.default):
                traced.append(p.name)  # a tensor default stays a graph input
                continue
            fixed[p.name] = p.default
        else:
            raise LrfxError(f"{argument}: the model's forward needs {p.name!r}, which they do "
                            f"not give (they give {', '.join(given) or 'nothing'})")
    return InputSpec(tuple(traced), _frozen(fixed), var_kw, tuple(names))
