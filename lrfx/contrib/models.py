"""Resolve the model specs the CLI accepts, and parse input-shape specs.

A model spec is one of:

* ``torchvision:NAME`` — a torchvision classification model with random weights (never
  downloaded), e.g. ``torchvision:resnet18``;
* ``package.module:factory`` — a callable (called with no arguments) or an ``nn.Module`` object;
  a factory may return ``(model, example_inputs)`` (inputs in any form lrfx accepts: a tensor,
  a tuple, a mapping of keyword inputs), which then are the default inputs;
* a path to a file holding a whole ``nn.Module`` saved with ``torch.save(model, path)``.

Example:
    >>> model, x = load_model("torchvision:resnet18")
    >>> x.shape
    torch.Size([1, 3, 224, 224])
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrfx.errors import LrfxError

__all__ = [
    "SPEC_HELP",
    "load_model",
    "parse_input_spec",
    "parse_inputs",
    "torchvision_input_size",
]

SPEC_HELP = (
    "name a model as torchvision:NAME (e.g. torchvision:resnet18; list them with "
    "`python -c \"import torchvision; print(torchvision.models.list_models())\"`), as "
    "package.module:factory (a function returning an nn.Module or (model, example_inputs), or "
    "a module object), or as the "
    "path of a file written by torch.save(model, path)"
)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
}


def torchvision_input_size(name: str) -> int:
    """The crop size documented by the model's default weights (224 if none is documented)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        crop = weights.transforms.keywords.get("crop_size", 224)
    except (ValueError, AttributeError, KeyError):
        return 224
    return int(crop[0] if isinstance(crop, (tuple, list)) else crop)


def _import(mod_name: str) -> Any:
    """Import a factory's module; the current directory is searched too (as ``python -m``
    does), so ``lrfx compress mynets:build`` finds ``./mynets.py``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(mod_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        where = (f"; it is looked up on sys.path and in the current directory {cwd!r} (set "
                 "PYTHONPATH to the directory holding it, or pip install its package)"
                 if missing and mod_name.startswith(missing) else "")
        raise LrfxError(f"cannot import {mod_name!r} ({exc}){where}; {SPEC_HELP}") from exc


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Build the model a spec names; returns it with its default example inputs (or ``None``
    when the spec does not say: a saved module, a factory that returns only the model).

    Raises:
        LrfxError: The spec names nothing lrfx can load; the message says how to name one.
    """
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            near = [k for k in known if name.lower() in k][:8]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise LrfxError(f"unknown torchvision classification model {name!r}{hint}; {SPEC_HELP}")
        size = torchvision_input_size(name)
        model = torchvision.models.get_model(name, weights=None)
        return model, parse_input_spec(f"1x3x{size}x{size}")
    if os.path.exists(spec):
        try:
            obj = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LrfxError(f"cannot load {spec!r} with torch.load: {exc}; {SPEC_HELP}") from exc
        if not isinstance(obj, nn.Module):
            raise LrfxError(
                f"{spec!r} holds a {type(obj).__name__}, not an nn.Module (a state_dict needs the "
                f"model's code: use package.module:factory); {SPEC_HELP}"
            )
        return obj, None
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        mod = _import(mod_name)
        found: Any = getattr(mod, attr, None)
        if found is None:
            raise LrfxError(f"module {mod_name!r} has no attribute {attr!r}; {SPEC_HELP}")
        if not isinstance(found, nn.Module) and callable(found):
            found = found()
        example = None
        if isinstance(found, tuple) and len(found) == 2 and isinstance(found[0], nn.Module):
            found, example = found
        if not isinstance(found, nn.Module):
            raise LrfxError(
                f"{spec!r} gave a {type(found).__name__}, not an nn.Module (nor a tuple "
                f"(model, example_inputs)); {SPEC_HELP}"
            )
        return found, example
    raise LrfxError(f"cannot find a model named {spec!r}; {SPEC_HELP}")


def parse_input_spec(spec: str) -> torch.Tensor:
    """Make an example input from ``"1x3x224x224"`` or ``"1x128:int64"``.

    Floating-point inputs are standard normal (seeded); integer inputs are ones, which every
    embedding takes as a token id and every attention mask as "attend".

    Example:
        >>> parse_input_spec("2x3x8x8").shape
        torch.Size([2, 3, 8, 8])
    """
    shape_text, _, dtype_text = spec.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x"))
    except ValueError:
        raise LrfxError(
            f"cannot read input shape {spec!r}: write it as dims joined by 'x', e.g. 1x3x224x224, "
            "optionally followed by :dtype (e.g. 1x128:int64)"
        ) from None
    if any(d <= 0 for d in shape):
        raise LrfxError(f"input shape {spec!r} has a dimension <= 0")
    dtype = _DTYPES.get(dtype_text or "float32")
    if dtype is None:
        names = ", ".join(_DTYPES)
        raise LrfxError(f"unknown dtype {dtype_text!r} in {spec!r}; use one of {names}")
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.ones(shape, dtype=dtype)


def parse_inputs(specs: Sequence[str]) -> Any:
    """Example inputs from CLI specs: ``SHAPE[:dtype]`` is positional, ``NAME=SHAPE[:dtype]`` a
    keyword input (``input_ids=1x16:int64``). Returns a tuple, a dict, or ``(args, kwargs)``.

    Example:
        >>> parse_inputs(["input_ids=2x8:int64"])["input_ids"].shape
        torch.Size([2, 8])
    """
    args: list[torch.Tensor] = []
    kwargs: dict[str, torch.Tensor] = {}
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if eq:
            if not name.isidentifier():
                raise LrfxError(f"input {spec!r}: {name!r} is not a parameter name; write "
                                "NAME=SHAPE, e.g. input_ids=1x128:int64")
            kwargs[name] = parse_input_spec(rest)
        elif kwargs:
            raise LrfxError(f"input {spec!r} is positional but follows keyword inputs; give "
                            "positional inputs first")
        else:
            args.append(parse_input_spec(spec))
    if kwargs and args:
        return (tuple(args), kwargs)
    return kwargs if kwargs else tuple(args)
