"""Capture: from a model to a graph lrfx can analyze — and never giving up.

:func:`trace` runs ``torch.fx`` symbolic tracing with :class:`FallbackTracer`: when a submodule's
``forward`` cannot be traced (data-dependent control flow, iteration over a Proxy, ...), the
partial trace of that submodule is rolled back, the submodule becomes a leaf (one
``call_module`` node, analyzed with hooks) and tracing goes on. With example inputs, every
non-tensor argument of ``forward`` (flags, ``None`` masks) is fixed automatically.

:func:`capture` is what the entry points call. It tries, in order:

1. **FX mode** — :func:`trace`: the result of a rewrite is the ``GraphModule``, which runs any
   input shape the model ran.
2. **Module mode** — when the top-level ``forward`` itself cannot be traced (transformers 5.x
   models: decorated forwards, Python checks on shapes and dtypes, star-unpacked shapes), a
   :class:`ConcreteTracer` traces the *undecorated* forward with proxies that carry the example's
   real values, so shape checks and branches are resolved by the example. That graph is used for
   analysis only (it is specialized to the example's shapes); the rewrite substitutes the
   factored layers *into a copy of the model*, which keeps its own class, methods and config
   (a compressed ``BertModel`` is still a ``BertModel``). Submodules that cannot be traced even
   so become leaves, analyzed with hooks on the real forward.

Why not ``torch.export`` for module-mode analysis: it captures the same 12 transformers models
(``bench/coverage.py --suite hf``), but at the aten level (every layer an ``aten.linear`` to map
back through ``nn_module_stack``, attention decomposed, no ``call_module`` structure to rewrite),
and it refuses data-dependent control flow that the value-carrying trace simply follows for the
example. It is also slower: 2.1-3.6x (median 3.0x) the capture time of the value-carrying trace
on those models (2 threads, tiny configs, medians of interleaved repeats in that bench). lrfx
uses it for what it is best at, the exported artifact (:func:`lrfx.export`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import operator
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate

from lrfx.errors import LrfxError, TraceError
from lrfx.facts import CaptureInfo, GraphFacts, LeafInfo, set_graph_facts
from lrfx.inputs import Inputs, InputSpec, bind, forward_signature
from lrfx.layers import linear_like, transforms_weight
from lrfx.modules import Factored, Gate

__all__ = [
    "ConcreteTracer",
    "FallbackTracer",
    "as_input_tuple",
    "call_inputs",
    "capture",
    "check_module",
    "copy_model",
    "eval_mode",
    "trace",
]

log = logging.getLogger(__name__)

#: Modules kept as leaves because lrfx models them whole (their internals are counted by formula).
KNOWN_LEAVES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, Gate)

#: Arguments fixed while capturing in module mode when the caller does not pass them: a cache
#: is an output lrfx has no use for (and ``torch.export`` cannot return).
MODULE_MODE_FIXED: Mapping[str, Any] = {"use_cache": False}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


def _is_parametrized_layer(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
        parametrize.is_parametrized(m, "weight")


class FallbackTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that turns untraceable submodules into leaves.

    Leaves are: modules of the ``torch.nn`` namespace without children (Conv, Linear, BN, ...),
    :data:`KNOWN_LEAVES`, linear-like modules of other libraries (:mod:`lrfx.layers`), Conv/Linear
    layers whose weight is parametrized (their weight is read whole), the user's ``leaf_modules``
    (types or qualified names), and every submodule whose ``forward`` raised while being traced.
    ``torch.nn`` containers with children (``nn.TransformerEncoderLayer``...) are traced into when
    possible, so their layers become nodes.

    Attributes:
        auto_leaves: Submodules that became leaves because tracing them failed, by qualified name.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = (),
                 spec: InputSpec | None = None, unwrap: bool = False) -> None:
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = frozenset(x for x in leaves if isinstance(x, str))
        self._spec = spec
        self._unwrap = unwrap
        self._root_params: list[str] = []
        self.auto_leaves: dict[str, LeafInfo] = {}

    def create_args_for_root(self, root_fn: Any, is_module: bool,
                             concrete_args: Any = None) -> Any:
        """Trace a function of the graph inputs only, the fixed arguments bound inside it (FX's
        own ``concrete_args`` cannot fix containers: its generated code does not compile)."""
        fn = inspect.unwrap(root_fn) if self._unwrap else root_fn
        if self._spec is not None and is_module:
            fn = _with_fixed(fn, self._spec)
        params = list(inspect.signature(fn).parameters)
        self._root_params = params[1:] if is_module else params  # the instance goes first
        return super().create_args_for_root(fn, is_module, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.auto_leaves or module_qualified_name in self._leaf_names:
            return True
        if isinstance(m, KNOWN_LEAVES + self._leaf_types):
            return True
        if linear_like(m) is not None or _is_parametrized_layer(m) or transforms_weight(m):
            return True
        if isinstance(m, nn.Sequential):
            return False
        if m.__module__.startswith(("torch.nn", "torch.ao.nn")):
            return next(m.children(), None) is None
        return False

    def call_module(
        self,
        m: nn.Module,
        forward: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        anchor = self._last_node()  # the last node before this module's code
        module_stack = copy.copy(self.module_stack)
        num_calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # any failure inside the submodule's forward
            self._roll_back(anchor)
            self.module_stack = module_stack
            self.num_calls = num_calls
            kind = f"{type(m).__module__}.{type(m).__qualname__}"
            info = LeafInfo(qualname, kind, _reason(exc))
            self.auto_leaves[qualname] = info
            log.info("cannot trace submodule %r (%s); keeping it as a leaf", qualname, info.reason)
            return super().call_module(m, forward, args, kwargs)

    def _last_node(self) -> fx.Node | None:
        return next(iter(reversed(self.graph.nodes)), None)

    def _roll_back(self, anchor: fx.Node | None) -> None:
        """Erase every node created after ``anchor``, newest first (users follow their inputs)."""
        while (node := self._last_node()) is not anchor and node is not None:
            self.graph.erase_node(node)


def _literal(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(_literal(x) for x in v)


def check_fixed(value: Any, name: str, expected: Any) -> None:
    """Refuse a call that passes another value than the one an argument was fixed to (a node
    of traced graphs; see :func:`trace`)."""
    if value is not expected and value != expected:
        raise LrfxError(f"argument {name!r} was fixed to {expected!r} when the model was traced; "
                        f"this call passes {value!r}. Trace again with the value you call with")


fx.wrap("check_fixed")


def _with_fixed(fn: Any, spec: InputSpec) -> Any:
    """``forward(self, <graph inputs>, <fixed literals>=<value>)`` calling ``fn`` with the fixed
    arguments bound. A fixed argument whose value is a literal stays a parameter of the traced
    forward, with that default and a check (calling with another value fails), as FX's own
    ``concrete_args`` do."""
    names = list(spec.names)
    literal = [k for k, v in spec.fixed.items() if _literal(v)]
    head = ", ".join(["self", *names, *(f"{k}={spec.fixed[k]!r}" for k in literal)])
    checks = "".join(f"    __lrfx_tracing.check_fixed({k}, {k!r}, {spec.fixed[k]!r})\n"
                     for k in literal)
    call = ", ".join(["self", *(f"{n}={n}" for n in names), "**__lrfx_fixed"])
    namespace: dict[str, Any] = {"__lrfx_fn": fn, "__lrfx_fixed": dict(spec.fixed),
                                 "__lrfx_tracing": sys.modules[__name__]}
    exec(f"def forward({head}):\n{checks}    return __lrfx_fn({call})\n", namespace)
    return namespace["forward"]


# --- the value-carrying tracer --------------------------------------------------------------------

_MISSING = object()
_TENSOR_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout",
                           "requires_grad", "is_sparse", "is_quantized", "is_meta"})


def _value(x: Any) -> Any:
    return map_aggregate(x, lambda v: v.value if isinstance(v, ConcreteProxy) else v)


class ConcreteProxy(fx.Proxy):
    """A proxy that also carries the value the example inputs compute at its node.

    Metadata (``shape``, ``dtype``, ``size()``, ``len()``...) and Python conversions
    (``bool()``, ``int()``, iteration) answer from that value, so code that branches on shapes,
    unpacks them, or checks dtypes traces; the branch taken is the example's.
    """

    value: Any = _MISSING

    def __getattr__(self, k: str) -> Any:
        v = self.__dict__.get("value", _MISSING)
        if k in _TENSOR_ATTRS and isinstance(v, torch.Tensor):
            return getattr(v, k)
        return super().__getattr__(k)

    def size(self, dim: int | None = None) -> Any:
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self) -> int:
        return int(self.value.dim())

    def numel(self) -> int:
        return int(self.value.numel())

    def is_floating_point(self) -> bool:
        return bool(self.value.is_floating_point())

    def is_complex(self) -> bool:
        return bool(self.value.is_complex())

    def item(self) -> Any:
        self.tracer.note(f"{self.node.name}.item() was fixed to the example's value")  # type: ignore[attr-defined]
        return self.value.item()

    def tolist(self) -> Any:
        self.tracer.note(f"{self.node.name}.tolist() was fixed to the example's value")  # type: ignore[attr-defined]
        return self.value.tolist()

    def __len__(self) -> int:
        return len(self.value)

    def __bool__(self) -> bool:
        self.tracer.note(f"a branch on {self.node.name} took the example's way")  # type: ignore[attr-defined]
        return bool(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __index__(self) -> int:
        return operator.index(self.value)

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self.value))])  # type: ignore[index]

    def keys(self) -> Any:
        return self.value.keys()


class ConcreteTracer(FallbackTracer):
    """A :class:`FallbackTracer` whose proxies carry the example inputs' values.

    Each node is also evaluated on the example (one forward pass in all), in eval mode and
    without gradients. The root's *undecorated* forward is traced (``functools.wraps``
    decorators that take ``*args, **kwargs`` defeat FX's argument binding). The graph is
    specialized to the example: use it for analysis, not as the model.

    Args:
        example: The value of each traced parameter, by name.
        leaf_modules: As for :class:`FallbackTracer`.
    """

    def __init__(self, example: Mapping[str, Any], spec: InputSpec,
                 leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__(leaf_modules, spec, unwrap=True)
        self._example = dict(example)
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> fx.Proxy:
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(rv, ConcreteProxy):
            rv.value = self._evaluate(kind, target, args, kwargs, rv.node)
        return rv

    def _evaluate(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  node: fx.Node) -> Any:
        if kind == "placeholder":
            # placeholders follow the traced function's parameters (FX may rename them)
            index = sum(n.op == "placeholder" for n in self.graph.nodes) - 1
            name = self._root_params[index] if index < len(self._root_params) else str(target)
            fixed = self._spec.fixed if self._spec is not None else {}
            return self._example[name] if name in self._example else fixed.get(name, _MISSING)
        if kind == "output":
            return _MISSING
        a, k = _value(args), _value(kwargs)
        with torch.no_grad(), _fx_unpatched():
            if kind == "get_attr":
                obj: Any = self.root
                for atom in str(target).split("."):
                    obj = getattr(obj, atom)
                return obj
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **k)
        return _MISSING


@contextlib.contextmanager
def _fx_unpatched() -> Iterator[None]:
    """Run real module code in the middle of a trace: FX patches ``nn.Module.__call__`` (and
    ``__getattr__``) while tracing, which would record the leaf's inner calls as graph nodes."""
    from torch.fx import _symbolic_trace as st

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = st._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = st._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = getattr_  # type: ignore[method-assign]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block; restore each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# --- copying and checking -------------------------------------------------------------------------


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it.

    Tensors a module keeps as plain attributes that are not autograd leaves (caches filled during
    ``forward``, the weight legacy ``weight_norm`` recomputes) cannot be deep-copied; they are
    copied detached. ``memo`` pre-seeds ``copy.deepcopy``'s memo (to replace tensors).
    """
    memo = dict(memo or {})
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and \
                    v.grad_fn is not None:
                memo.setdefault(id(v), v.detach().clone())
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise LrfxError(
            f"cannot copy the model ({type(model).__name__}) to work on: {_reason(exc)}. lrfx "
            "never modifies the model you pass; make it deep-copyable (copy.deepcopy)"
        ) from exc


def check_module(model: object, argument: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise a clear :class:`LrfxError`."""
    if not isinstance(model, nn.Module):
        raise LrfxError(
            f"{argument} must be a torch.nn.Module, got {type(model).__module__}."
            f"{type(model).__qualname__}; pass the model object itself "
            "(not its state_dict or its class)"
        )
    return model


def as_input_tuple(example_inputs: Any, argument: str = "example_inputs") -> tuple[Any, ...]:
    """Normalize positional example inputs: a tensor becomes a 1-tuple, a list a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise LrfxError(
        f"{argument} must be a tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def call_inputs(model: nn.Module, inputs: Inputs) -> Inputs:
    """``inputs`` plus the :data:`MODULE_MODE_FIXED` arguments the model's forward takes and
    the caller left out (how module-mode results are run for export and calibration)."""
    if isinstance(model, fx.GraphModule):
        return inputs
    try:
        params = forward_signature(model, unwrap=True).parameters
    except (TypeError, ValueError):
        return inputs
    given = set(inputs.kwargs) | set(list(params)[: len(inputs.args)])
    extra = {k: v for k, v in MODULE_MODE_FIXED.items() if k in params and k not in given}
    return Inputs(inputs.args, {**inputs.kwargs, **extra}) if extra else inputs


def _requested_leaves(gm: fx.GraphModule, tracer: FallbackTracer) -> tuple[LeafInfo, ...]:
    """Leaves the user asked for that hide layers of their own (so analysis looks inside)."""
    found: dict[str, LeafInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in tracer.auto_leaves or node.target in found:
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, KNOWN_LEAVES) or next(m.children(), None) is None:
            continue
        if linear_like(m) is not None or _is_parametrized_layer(m) or transforms_weight(m):
            continue
        kind = f"{type(m).__module__}.{type(m).__qualname__}"
        found[node.target] = LeafInfo(node.target, kind, "kept as a leaf (leaf_modules)")
    return tuple(found.values())


_MISSING_ARG = object()
_CONV_DEFAULTS = (("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_CONV_T_DEFAULTS = (("bias", None), ("stride", 1), ("padding", 0), ("output_padding", 0),
                    ("groups", 1), ("dilation", 1))
#: Functional layers whose keyword arguments are made positional: ``F.linear(input=x,
#: weight=w)`` is the same layer as ``F.linear(x, w)``, and the passes read arguments by position.
_POSITIONAL: dict[Any, tuple[tuple[str, Any], ...]] = {
    F.linear: (("input", _MISSING_ARG), ("weight", _MISSING_ARG), ("bias", None)),
    **{fn: (("input", _MISSING_ARG), ("weight", _MISSING_ARG), *_CONV_DEFAULTS)
       for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{fn: (("input", _MISSING_ARG), ("weight", _MISSING_ARG), *_CONV_T_DEFAULTS)
       for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
}
_POSITIONAL[torch._C._nn.linear] = _POSITIONAL[F.linear]


def _positional_calls(graph: fx.Graph) -> None:
    """Rewrite keyword arguments of functional linear/conv calls as positional ones."""
    for node in graph.nodes:
        params = _POSITIONAL.get(node.target) if node.op == "call_function" else None
        if params is None or not node.kwargs:
            continue
        names = [n for n, _ in params]
        if any(k not in names for k in node.kwargs):
            continue  # not a call these names describe: leave it as it is
        given = dict(zip(names, node.args, strict=False))
        given.update(node.kwargs)
        last = max(names.index(k) for k in given)
        if any(given.get(n, d) is _MISSING_ARG for n, d in params[: last + 1]):
            continue
        node.args = tuple(given.get(n, d) for n, d in params[: last + 1])
        node.kwargs = {}


def _keep_factored(gm: fx.GraphModule, root: nn.Module) -> None:
    """``fx.GraphModule`` copies only the called submodules, under plain ``nn.Module`` parents:
    a factored layer (traced through, its factors called one by one) would lose its container,
    scheme and rank. Put the containers back, around the graph module's own factors."""
    for path, m in root.named_modules():
        if not isinstance(m, Factored) or not path:
            continue
        try:
            here = gm.get_submodule(path)
        except AttributeError:
            continue
        if type(here) is not nn.Module or len(here._modules) != len(m):
            continue
        found = [here._modules.get(str(i)) for i in range(len(m))]
        pieces = [p for p in found if p is not None]
        if len(pieces) != len(m):
            continue
        owner, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf,
                Factored(*pieces, scheme=m.scheme, rank=m.rank, like=m._like))


def _finish(root: nn.Module, tracer: FallbackTracer, graph: fx.Graph, spec: InputSpec,
            info: CaptureInfo) -> fx.GraphModule:
    name = type(root).__name__
    _positional_calls(graph)
    gm = fx.GraphModule(tracer.root, graph, name)
    _keep_factored(gm, tracer.root)
    leaves = tuple(tracer.auto_leaves.values()) + _requested_leaves(gm, tracer)
    total_params = sum(p.numel() for p in {id(p): p for p in root.parameters()}.values())
    set_graph_facts(gm, GraphFacts(leaves=leaves, total_params=total_params,
                                   provided=frozenset({"graph"}), input_spec=spec, capture=info))
    if leaves:
        log.warning(
            "%d submodule(s) of %s could not be traced and are kept as leaves: %s",
            len(leaves), name,
            ", ".join(f"{leaf.name} ({leaf.reason})" for leaf in leaves),
        )
    return gm


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    copy_model: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``torch.fx.GraphModule`` (FX mode).

    Submodules that cannot be traced become leaves (recorded with the reason in
    ``gm.meta["lrfx"].leaves``). Arguments of ``forward`` that are not tensors are fixed: to the
    value ``example_inputs`` give, or else to their default (so a ``forward(x, embed=False)``
    that branches on the flag traces). The model is deep-copied first, so the returned graph
    module never shares parameters with the caller's model.

    Args:
        model: The model to trace.
        example_inputs: Inputs in any form :class:`~lrfx.inputs.Inputs` accepts (optional: they
            only decide which arguments are tensors; shapes come from the analysis passes).
        leaf_modules: Module types or qualified names to keep as leaves.
        concrete_args: Arguments of the top-level ``forward`` to fix, overriding the automatic
            choice.
        copy_model: Deep-copy the model before tracing (default). Set False only when the caller
            already holds a private copy.

    Returns:
        The traced graph module, with ``gm.meta["lrfx"]`` holding a :class:`~lrfx.facts.GraphFacts`.

    Raises:
        TraceError: The top-level ``forward`` itself cannot be traced (:func:`capture` then
            switches to module mode).

    Example:
        >>> import torchvision
        >>> gm = trace(torchvision.models.resnet18())
        >>> sum(n.op == "call_module" for n in gm.graph.nodes) > 20
        True
    """
    check_module(model)
    root = _copy(model) if copy_model else model
    spec = _binding(root, example_inputs, concrete_args)
    tracer = FallbackTracer(leaf_modules, spec)
    try:
        graph = tracer.trace(root)
    except Exception as exc:
        raise TraceError("", _reason(exc), type(root).__qualname__) from exc
    return _finish(root, tracer, graph, spec, CaptureInfo("fx"))


def _copy(model: nn.Module) -> nn.Module:
    return copy_model(model)


def _binding(root: nn.Module, example_inputs: Any, concrete_args: dict[str, Any] | None,
             extra_fixed: Mapping[str, Any] | None = None, unwrap: bool = False) -> InputSpec:
    sig = forward_signature(root, unwrap=unwrap)
    inputs = None if example_inputs is None else Inputs.of(example_inputs)
    spec = bind(sig, inputs, extra_fixed=extra_fixed)
    if concrete_args:
        fixed = {**spec.fixed, **concrete_args}
        spec = InputSpec(tuple(n for n in spec.names if n not in concrete_args), fixed,
                         spec.var_keyword, spec.order)
    return spec


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    mode: str = "auto",
    copy: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` for analysis in FX mode, or else in module mode (see the module docstring).

    Args:
        model: The model (copied: never modified).
        example_inputs: Inputs in any form :class:`~lrfx.inputs.Inputs` accepts.
        leaf_modules: Module types or qualified names to keep as leaves.
        mode: ``auto``: FX mode when the top-level forward traces, module mode otherwise — and
            module mode for a decorated ``forward`` (a ``functools.wraps`` wrapper, as
            transformers models have: FX would bake the wrapper's output formatting and defaults
            into the graph); ``fx`` or ``module`` to insist.
        copy: Work on a copy of ``model`` (default). ``False`` only for a private copy.

    Returns:
        The graph module. In module mode, ``gm.meta["lrfx"].capture`` says so and why, and its
        ``root`` is the copy of the model the rewrite substitutes layers into.

    Raises:
        LrfxError: The model's own forward fails on the example inputs (names the module and the
            exception), or the inputs do not fit its signature.
        TraceError: ``mode="fx"`` and the top-level forward cannot be traced.
    """
    check_module(model)
    if mode not in ("auto", "fx", "module"):
        raise LrfxError(f"mode must be 'auto', 'fx' or 'module', got {mode!r}")
    inputs = Inputs.of(example_inputs)
    root = _copy(model) if copy else model
    if isinstance(root, KNOWN_LEAVES + tuple(t for t in leaf_modules if isinstance(t, type))) \
            or linear_like(root) is not None:
        root = _whole(root)  # a leaf as the whole model: it becomes the graph's one call
    decorated = hasattr(type(root).forward, "__wrapped__")
    top_level = "module mode was asked for"
    if mode == "fx" or (mode == "auto" and not decorated):
        try:
            return trace(root, inputs, leaf_modules=leaf_modules, copy_model=False)
        except TraceError as exc:
            if mode == "fx":
                raise
            top_level = exc.reason
        except LrfxError:
            raise
        except Exception as exc:  # FX produced a graph it cannot compile, say
            if mode == "fx":
                raise TraceError("", _reason(exc), type(root).__qualname__) from exc
            top_level = _reason(exc)
    elif mode == "auto":
        top_level = (f"{type(root).__name__}.forward is wrapped by a decorator; tracing the "
                     "wrapper would bake its output formatting and defaults into a graph")
    spec = _binding(root, inputs, None, MODULE_MODE_FIXED, unwrap=True)
    example = dict(zip(spec.names, spec.feed(inputs), strict=True))
    example = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    tracer = ConcreteTracer(example, spec, leaf_modules)
    try:
        with eval_mode(root):
            graph = tracer.trace(root)
    except Exception as exc:
        raise _forward_error(model, root, inputs, spec, exc) from exc
    info = CaptureInfo("module", top_level, tuple(tracer.notes), root)
    log.info("%s: module mode (%s): layers are substituted into a copy of the model",
             type(model).__name__, top_level)
    return _finish(root, tracer, graph, spec, info)


class _Whole(nn.Module):
    """Holds a model that is itself a leaf (``nn.MultiheadAttention``, say) as ``module``, so
    that the graph calls it like any leaf (its layers are named ``module.*``, as in
    ``DataParallel``). Its ``forward`` comes from :func:`_whole`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _whole(model: nn.Module) -> nn.Module:
    """``model`` inside a :class:`_Whole` whose ``forward`` has the model's own signature (so
    that inputs bind by name and flags take their defaults)."""

    def forward(self: _Whole, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    inner = inspect.signature(type(model).forward)
    forward.__signature__ = inner  # type: ignore[attr-defined]
    cls = type(f"Whole{type(model).__name__}", (_Whole,), {"forward": forward})
    return cls(model)


def _forward_error(model: nn.Module, root: nn.Module, inputs: Inputs, spec: InputSpec,
                   exc: BaseException) -> LrfxError:
    """Run the real forward to find the module where the example inputs fail."""
    stack: list[str] = []
    names = {m: n for n, m in root.named_modules()}
    where: list[str] = []

    def pre(m: nn.Module, _a: Any) -> None:
        stack.append(names.get(m, "?"))

    def post(m: nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in root.modules()]
    handles += [m.register_forward_hook(post) for m in root.modules()]
    try:
        with eval_mode(root), torch.no_grad():
            inputs.call(root)
    except Exception as real:
        where = [s for s in stack if s]
        exc = real
    finally:
        for h in handles:
            h.remove()
    at = f"module {where[-1]!r} ({type(root.get_submodule(where[-1])).__name__})" if where \
        else f"the top-level forward of {type(model).__name__}"
    return LrfxError(f"the model's forward fails on the example inputs ({inputs.describe()}) "
                     f"in {at}: {_reason(exc)}; check the inputs' shapes, dtypes and names")
