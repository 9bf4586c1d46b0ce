"""Passes and pipelines.

A pass is a plain function ``fn(gm, ctx) -> result`` wrapped by :func:`graph_pass`, which
declares its name, the facts it requires, the facts it provides and whether it mutates the graph.
A :class:`Pipeline` is an ordered list of passes, checked when it is built: whatever a pass
requires must be provided by an earlier pass (or be present from the start, like ``graph``).

Example:
    >>> from lrfx.passes.analysis import propagate_shapes, annotate_costs
    >>> pipe = Pipeline([propagate_shapes, annotate_costs])
    >>> pipe.names
    ('propagate_shapes', 'annotate_costs')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import fx

from lrfx.errors import LrfxError, PassError, PipelineError
from lrfx.facts import FrozenMap, get_graph_facts, set_graph_facts

__all__ = ["GraphPass", "PassContext", "Pipeline", "graph_pass"]

R = TypeVar("R")

#: Facts present on every graph produced by :func:`lrfx.trace`.
INITIAL_FACTS = frozenset({"graph"})


@dataclass(frozen=True)
class PassContext:
    """What every pass may read besides the graph.

    Attributes:
        example_inputs: Positional inputs of the model (for passes that run it).
        progress: Show progress bars for long work.
        options: Pass-specific settings, keyed by option name.
    """

    example_inputs: tuple[Any, ...] = ()
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=lambda: FrozenMap({}))


@dataclass(frozen=True)
class GraphPass(Generic[R]):
    """A named pass with declared requirements; call it as ``p(gm, ctx)``.

    Calling a pass directly checks its requirements against ``gm.meta["lrfx"].provided`` and
    records what it provides once it succeeds.
    """

    name: str
    fn: Callable[[fx.GraphModule, PassContext], R]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    mutates: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> R:
        facts = get_graph_facts(gm)
        have = facts.provided | INITIAL_FACTS
        missing = self.requires - have
        if missing:
            raise PipelineError(
                f"pass {self.name!r} requires {sorted(missing)}, which no pass has provided on "
                f"this graph yet (provided: {sorted(have)}); run the passes that provide them first"
            )
        result = self.fn(gm, ctx if ctx is not None else PassContext())
        facts = get_graph_facts(gm)  # the pass may have replaced the record
        set_graph_facts(gm, facts.replace(provided=facts.provided | self.provides))
        return result


def graph_pass(
    *,
    name: str | None = None,
    requires: Iterable[str] = (),
    provides: Iterable[str] = (),
    mutates: bool = False,
) -> Callable[[Callable[[fx.GraphModule, PassContext], R]], GraphPass[R]]:
    """Declare a function ``fn(gm, ctx)`` as a pass.

    Args:
        name: The pass's name (defaults to the function's name).
        requires: Facts that must be provided before this pass runs.
        provides: Facts this pass provides.
        mutates: Whether the pass changes the graph.

    Example:
        >>> @graph_pass(requires=["layers"], provides=["report"])
        ... def report_macs(gm, ctx):
        ...     return 0
        >>> report_macs.name, sorted(report_macs.requires)
        ('report_macs', ['layers'])
    """

    def wrap(fn: Callable[[fx.GraphModule, PassContext], R]) -> GraphPass[R]:
        p = GraphPass(
            name=name or fn.__name__,
            fn=fn,
            requires=frozenset(requires),
            provides=frozenset(provides),
            mutates=mutates,
        )
        # help(pass) shows the function's docstring (what it reads, writes, and whether it mutates)
        object.__setattr__(p, "__doc__", fn.__doc__)
        return p

    return wrap


class Pipeline:
    """An ordered list of passes, validated when built.

    Args:
        passes: The passes, in the order they run.
        initial: Facts present before the first pass (``graph`` for anything :func:`lrfx.trace`
            produced).

    Raises:
        PipelineError: A pass requires a fact that no earlier pass provides.
    """

    def __init__(self, passes: Iterable[GraphPass[Any]], initial: Iterable[str] = INITIAL_FACTS):
        self.passes: tuple[GraphPass[Any], ...] = tuple(passes)
        have = set(initial)
        for i, p in enumerate(self.passes):
            if not isinstance(p, GraphPass):
                raise PipelineError(
                    f"pipeline entry {i} is {p!r}, not a pass; declare it with @lrfx.graph_pass"
                )
            missing = p.requires - have
            if missing:
                earlier = ", ".join(q.name for q in self.passes[:i]) or "none"
                raise PipelineError(
                    f"pass {p.name!r} (position {i}) requires {sorted(missing)}, which no earlier "
                    f"pass provides (earlier passes: {earlier}); add the pass that provides it "
                    "before this one"
                )
            have |= p.provides

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> dict[str, Any]:
        """Run every pass in order; returns each pass's result by name.

        Raises:
            PassError: A pass failed; names it and the passes before it, original exception
                chained. lrfx errors about the user's input (a shape mismatch, a bad plan) keep
                their type and get a note naming the pass.
        """
        ctx = ctx or PassContext()
        results: dict[str, Any] = {}
        for i, p in enumerate(self.passes):
            try:
                results[p.name] = p(gm, ctx)
            except LrfxError as exc:
                # already names the layer or argument at fault; keep its type, say where it arose
                before = ", ".join(q.name for q in self.passes[:i]) or "none"
                if hasattr(exc, "add_note"):
                    exc.add_note(f"raised in pass {p.name!r} (passes run before it: {before})")
                raise
            except Exception as exc:
                before_list = [q.name for q in self.passes[:i]]
                raise PassError(p.name, before_list, f"{type(exc).__name__}: {exc}") from exc
        return results

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(self.names)}])"
