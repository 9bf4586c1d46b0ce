"""Which modules are layers lrfx factors, beyond ``nn.Linear`` and ``nn.Conv*``.

Some libraries compute ``y = x W^T + b`` in modules of their own. A :class:`LinearLike` entry says
how to read one as a linear layer: its ``(out, in)`` weight (a view, possibly transposed), its
bias and its widths. Such modules are kept whole while tracing (one graph node), analyzed as
linear layers, and replaced by the same :class:`~lrfx.modules.Factored` layers as ``nn.Linear``.
Entries are keyed by the class's qualified name, so lrfx needs none of these libraries installed.

Built in: ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its relatives), whose weight is stored
``(in, out)`` and whose forward is ``addmm(bias, x.view(-1, in), weight)``.

Conv/Linear subclasses whose ``forward`` transforms the weight before use (weight
standardization in BiT/NFNet-style convs, say) are *weight-transform layers*
(:func:`transforms_weight`): lrfx factors their **effective** weight — the one the forward passes
to the conv or linear op, recorded by running the layer (:func:`effective_call`) — which folds the
transform in for inference. A forward that does anything else to its input or output (or makes
more than one conv/linear call) leaves the layer dense, with the reason.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "EffectiveCall",
    "LinearLike",
    "effective_call",
    "is_linear",
    "linear_like",
    "register_linear_like",
    "transforms_weight",
]


@dataclass(frozen=True)
class LinearLike:
    """How to read a module as ``y = x W^T + b`` on its last dimension.

    Attributes:
        qualname: ``module.Class`` of the modules this entry describes.
        weight_attr: The attribute holding the weight parameter.
        transposed: Whether that parameter is stored ``(in, out)`` rather than ``(out, in)``.
        bias_attr: The attribute holding the bias (``None`` when it has none).
    """

    qualname: str
    weight_attr: str = "weight"
    transposed: bool = False
    bias_attr: str | None = "bias"

    def weight(self, m: nn.Module) -> torch.Tensor:
        """The ``(out, in)`` weight (a view of the parameter)."""
        w: torch.Tensor = getattr(m, self.weight_attr)
        return w.t() if self.transposed else w

    def bias(self, m: nn.Module) -> torch.Tensor | None:
        return None if self.bias_attr is None else getattr(m, self.bias_attr, None)

    def features(self, m: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)``."""
        out, inp = self.weight(m).shape
        return int(inp), int(out)


_REGISTRY: dict[str, LinearLike] = {}


def register_linear_like(entry: LinearLike) -> LinearLike:
    """Teach lrfx another linear-like module class (see :class:`LinearLike`)."""
    _REGISTRY[entry.qualname] = entry
    return entry


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def linear_like(m: nn.Module) -> LinearLike | None:
    """The entry describing ``m``'s class (or a base class of it), if any."""
    for cls in type(m).__mro__:
        entry = _REGISTRY.get(_qualname(cls))
        if entry is not None:
            return entry
    return None


def is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` or a registered linear-like module."""
    return isinstance(m, nn.Linear) or linear_like(m) is not None


register_linear_like(LinearLike("transformers.pytorch_utils.Conv1D", transposed=True))


# --- weight-transform layers ----------------------------------------------------------------------

_FACTORABLE_BASES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_OPS: dict[Any, str] = {
    F.linear: "linear", torch._C._nn.linear: "linear",
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _torch_base(cls: type) -> type[nn.Module] | None:
    return next((c for c in cls.__mro__ if c in _FACTORABLE_BASES), None)


def transforms_weight(m: nn.Module) -> bool:
    """A Conv/Linear subclass with a ``forward`` (or ``_conv_forward``) of its own: what it
    computes with its weight is known only by running it."""
    base = _torch_base(type(m))
    if base is None or type(m) is base or linear_like(m) is not None:
        return False
    cls = type(m)
    return cls.forward is not base.forward or \
        getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None)


@dataclass(frozen=True)
class EffectiveCall:
    """The one conv/linear op a weight-transform layer's forward makes.

    Attributes:
        op: ``linear``, ``conv1d``, ``conv2d`` or ``conv3d``.
        weight: The effective ``(out, in, ...)`` weight (detached).
        bias: The bias passed to the op (detached), if any.
        stride, padding, dilation, groups: The conv arguments passed (defaults for linear).
    """

    op: str
    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor | None = field(repr=False)
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any], Any]] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        op = _OPS.get(func)
        if op is not None:
            names = ("input", "weight", "bias") if op == "linear" else _CONV_ARGS
            bound = dict(zip(names, args, strict=False))
            bound.update(kwargs or {})
            self.calls.append((op, bound, out))
        return out


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], EffectiveCall | str]] = \
    weakref.WeakKeyDictionary()


def _state_key(m: nn.Module, shape: tuple[int, ...]) -> tuple[Any, ...]:
    tensors = [*m.parameters(), *m.buffers()]
    return (shape, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


def effective_call(m: nn.Module, input_shape: tuple[int, ...]) -> EffectiveCall | str:
    """Run ``m`` once on zeros of ``input_shape`` (batch 1) and record the conv/linear op its
    forward makes; returns it, or why the layer cannot be read as one op (a string).

    The result is cached until a parameter or buffer of ``m`` changes.
    """
    shape = (1, *input_shape[1:]) if len(input_shape) > 1 else tuple(input_shape)
    key = _state_key(m, shape)
    hit = _CACHE.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _record(m, shape)
    _CACHE[m] = (key, result)
    return result


def _record(m: nn.Module, shape: tuple[int, ...]) -> EffectiveCall | str:
    name = type(m).__qualname__
    p = next(m.parameters(), None)
    x = torch.zeros(shape, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else None)
    recorder = _Recorder()
    flags = [(mod, mod.training) for mod in m.modules()]
    m.train(False)
    try:
        with torch.no_grad(), recorder:
            y = m(x)
    except Exception as exc:
        return f"{name}.forward fails on its own input shape ({type(exc).__name__}: {exc})"
    finally:
        for mod, flag in flags:
            mod.training = flag
    if len(recorder.calls) != 1:
        return (f"{name}.forward makes {len(recorder.calls)} conv/linear calls (lrfx folds a "
                "weight transform before exactly one)")
    op, a, out = recorder.calls[0]
    if a.get("input") is not x or out is not y:
        return (f"{name}.forward changes its input or output around the {op} call (lrfx "
                "folds only a transform of the weight)")
    w, b = a.get("weight"), a.get("bias")
    if not isinstance(w, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
        return f"{name}.forward passes no weight tensor to {op}"
    trainable = any(t.requires_grad for t in m.parameters())
    weight = w.detach().clone().requires_grad_(trainable)
    bias = None if b is None else b.detach().clone().requires_grad_(b.requires_grad)
    if op == "linear":
        return EffectiveCall(op, weight, bias)
    return EffectiveCall(op, weight, bias, a.get("stride", 1), a.get("padding", 0),
                         a.get("dilation", 1), int(a.get("groups", 1)))
