"""Symbolic tracing that keeps going where a model is not fully traceable.

:func:`trace` runs ``torch.fx`` symbolic tracing with :class:`FallbackTracer`: when a submodule's
``forward`` cannot be traced (data-dependent control flow, iteration over a Proxy, ...), the
partial trace of that submodule is rolled back, the submodule becomes a leaf (one
``call_module`` node) and tracing goes on. Which submodules became leaves, and why, is recorded
in ``gm.meta["lrfx"].leaves``. Only a failure in the top-level ``forward`` is fatal.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from lrfx.errors import LrfxError, TraceError
from lrfx.facts import GraphFacts, LeafInfo, set_graph_facts

__all__ = ["FallbackTracer", "as_input_tuple", "check_module", "trace"]

log = logging.getLogger(__name__)

#: Modules kept as leaves because lrfx models them whole (their internals are counted by formula).
KNOWN_LEAVES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


class FallbackTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that turns untraceable submodules into leaves.

    Leaves are: modules of the ``torch.nn`` namespace without children (Conv, Linear, BN, ...),
    :data:`KNOWN_LEAVES`, the user's ``leaf_modules`` (types or qualified names), and every
    submodule whose ``forward`` raised while being traced. ``torch.nn`` containers with children
    (``nn.TransformerEncoderLayer``...) are traced into when possible, so their layers become nodes.

    Attributes:
        auto_leaves: Submodules that became leaves because tracing them failed, by qualified name.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = frozenset(x for x in leaves if isinstance(x, str))
        self.auto_leaves: dict[str, LeafInfo] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.auto_leaves or module_qualified_name in self._leaf_names:
            return True
        if isinstance(m, KNOWN_LEAVES + self._leaf_types):
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


def _requested_leaves(gm: fx.GraphModule, tracer: FallbackTracer) -> tuple[LeafInfo, ...]:
    """Leaves the user asked for that hide layers of their own (so analysis looks inside)."""
    found: dict[str, LeafInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in tracer.auto_leaves or node.target in found:
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, KNOWN_LEAVES) or next(m.children(), None) is None:
            continue
        kind = f"{type(m).__module__}.{type(m).__qualname__}"
        found[node.target] = LeafInfo(node.target, kind, "kept as a leaf (leaf_modules)")
    return tuple(found.values())


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
    """Normalize example inputs: a tensor becomes a 1-tuple, a list a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise LrfxError(
        f"{argument} must be a tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    copy_model: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``torch.fx.GraphModule``.

    Submodules that cannot be traced become leaves (recorded with the reason in
    ``gm.meta["lrfx"].leaves``). The model is deep-copied first, so the returned graph module
    never shares parameters with the caller's model.

    Args:
        model: The model to trace.
        example_inputs: Accepted for symmetry with the other entry points; tracing itself is
            symbolic. Shapes are filled in by the analysis passes.
        leaf_modules: Module types or qualified names to keep as leaves.
        concrete_args: Arguments of the top-level ``forward`` to fix to constants.
        copy_model: Deep-copy the model before tracing (default). Set False only when the caller
            already holds a private copy.

    Returns:
        The traced graph module, with ``gm.meta["lrfx"]`` holding a :class:`~lrfx.facts.GraphFacts`.

    Raises:
        TraceError: The top-level ``forward`` itself cannot be traced.

    Example:
        >>> import torchvision
        >>> gm = trace(torchvision.models.resnet18())
        >>> sum(n.op == "call_module" for n in gm.graph.nodes) > 20
        True
    """
    check_module(model)
    root = copy.deepcopy(model) if copy_model else model
    tracer = FallbackTracer(leaf_modules)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:
        raise TraceError("", _reason(exc), type(root).__qualname__) from exc
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    leaves = tuple(tracer.auto_leaves.values()) + _requested_leaves(gm, tracer)
    total_params = sum(p.numel() for p in {id(p): p for p in root.parameters()}.values())
    set_graph_facts(
        gm,
        GraphFacts(leaves=leaves, total_params=total_params, provided=frozenset({"graph"})),
    )
    if leaves:
        log.warning(
            "%d submodule(s) of %s could not be traced and are kept as leaves: %s",
            len(leaves),
            name,
            ", ".join(f"{leaf.name} ({leaf.reason})" for leaf in leaves),
        )
    return gm
