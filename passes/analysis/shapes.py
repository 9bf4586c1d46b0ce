"""Shape propagation: torch's ``ShapeProp``, plus the layers hidden inside leaf modules.

Runs the example inputs through the graph once (eval mode, no grad; training flags restored
afterwards, so BN statistics are untouched). Shapes go where torch puts them,
``node.meta["tensor_meta"]``. For every leaf module the tracer could not enter, forward hooks on
the Conv/Linear/MultiheadAttention modules inside it record their call shapes, and a
``FlopCounterMode`` measures the leaf's total MACs; both are stored in ``gm.meta["lrfx"]``
(``leaf_calls`` and ``leaf_macs``, keyed by node name) for :func:`annotate_costs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from lrfx.errors import ShapeError
from lrfx.facts import FrozenMap, LeafCall, get_graph_facts, set_graph_facts
from lrfx.layers import linear_like
from lrfx.modules import LowRankMultiheadAttention
from lrfx.pipeline import PassContext, graph_pass
from lrfx.tracing import eval_mode

__all__ = ["InnerCall", "eval_mode", "propagate_shapes"]

#: Module types whose calls inside a leaf are recorded by hooks.
HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


#: Module types always instrumented like leaves, wherever they appear as a node.
INSTRUMENTED = (LowRankMultiheadAttention,)


#: The record of one call inside a leaf (kept under its former name).
InnerCall = LeafCall


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _cpu_flash_flop(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    # torch's counter has no formula for the fused CPU attention kernel; it is plain SDPA math
    return int(sdpa_flop(query_shape, key_shape, value_shape))


_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
}


class _Propagator(ShapeProp):
    """``ShapeProp`` that reports failures as :class:`ShapeError` and instruments leaf modules."""

    def __init__(self, gm: fx.GraphModule, leaves: set[str]) -> None:
        super().__init__(gm)
        self.leaves = leaves
        self.inner_calls: dict[str, list[InnerCall]] = {}
        self.leaf_macs: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            if n.op == "call_module" and n.target in self.leaves:
                result = self._run_leaf(n)
            else:
                result = fx.Interpreter.run_node(self, n)
        except ShapeError:
            raise
        except Exception as exc:
            got = [_arg_shape(a) for a in n.all_input_nodes]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeError(
                n.name, f"{n.op} {n.target}", f"{first} (input shapes: {got})"
            ) from exc

        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        m = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = m
        n.meta["type"] = type(result)
        return result

    def _run_leaf(self, n: fx.Node) -> Any:
        assert isinstance(n.target, str)
        leaf = self.module.get_submodule(n.target)
        calls: list[InnerCall] = []
        with _hooks(leaf, n.target, calls), FlopCounterMode(
            display=False, custom_mapping=_CUSTOM_FLOPS
        ) as counter, torch.enable_grad():
            # grad enabled: keeps torch.nn's fused inference fast paths (which the counter cannot
            # see) out of the way, so every matmul inside the leaf is counted
            result = fx.Interpreter.run_node(self, n)
        self.inner_calls[n.name] = calls
        self.leaf_macs[n.name] = int(counter.get_total_flops()) // 2
        return map_aggregate(result, lambda x: x.detach() if isinstance(x, torch.Tensor) else x)


def _arg_shape(a: fx.Node) -> Any:
    tm: Any = a.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else a.name


@contextlib.contextmanager
def _hooks(leaf: nn.Module, prefix: str, calls: list[InnerCall]) -> Iterator[None]:
    handles = []
    for sub_name, sub in leaf.named_modules():
        hooked = isinstance(sub, HOOKED) or linear_like(sub) is not None
        if sub_name and hooked and not _inside_hooked(leaf, sub_name):
            full = f"{prefix}.{sub_name}"

            def hook(
                mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                full: str = full,
            ) -> None:
                first = out[0] if isinstance(out, tuple) else out
                kw = tuple(
                    (k, _shape(v)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)
                )
                calls.append(InnerCall(full, tuple(_shape(a) for a in args), _shape(first), kw))

            handles.append(sub.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _inside_hooked(root: nn.Module, name: str) -> bool:
    """Whether a module sits inside a MultiheadAttention (whose projections it counts itself)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(root.get_submodule(".".join(parts[:i])), nn.MultiheadAttention):
            return True
    return False


@graph_pass(provides=["shapes"])
def propagate_shapes(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Run the example inputs through the graph and record every node's output shape.

    Reads: ``ctx.example_inputs``. Writes: ``node.meta["tensor_meta"]`` (torch's format) on every
    node; ``gm.meta["lrfx"].input_shapes`` and, for leaf modules, ``leaf_calls`` (the call
    shapes of the layers inside) and ``leaf_macs``. Does not change the graph or any module's
    state (eval mode, no grad).

    Raises:
        ShapeError: The inputs do not fit the model; names the node where propagation failed.
    """
    facts = get_graph_facts(gm)
    leaves = {leaf.name for leaf in facts.leaves}
    # modules lrfx substituted (low-rank attention) are measured like leaves: hooks + counter
    leaves |= {
        str(n.target) for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), INSTRUMENTED)
    }
    prop = _Propagator(gm, leaves)
    try:
        with eval_mode(gm), torch.no_grad():
            prop.propagate(*ctx.example_inputs)
    except ShapeError as exc:
        # torch's Interpreter appends its own trace text to the message; keep ours clean
        raise ShapeError(exc.node, exc.target, exc.reason) from exc.__cause__
    set_graph_facts(
        gm,
        facts.replace(
            input_shapes=tuple(_shape(x) for x in ctx.example_inputs),
            input_dtypes=tuple(str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor)
                               else type(x).__name__ for x in ctx.example_inputs),
            leaf_calls=FrozenMap({k: tuple(v) for k, v in prop.inner_calls.items()}),
            leaf_macs=FrozenMap(dict(prop.leaf_macs)),
        ),
    )
