"""Passes and pipelines.

A pass is a plain function ``fn(gm, ctx) -> result`` wrapped by :func:`graph_pass`, which
declares its name, the facts it requires and provides, whether it mutates the graph, which facts
a mutation invalidates, and the typed options it reads. A :class:`Pipeline` is an ordered list
of passes, checked when it is built: whatever a pass requires must be provided by an earlier pass
(or be present from the start, like ``graph``).

Options are frozen dataclasses, one type per pass that has any; a :class:`PassContext` carries
them and a pass reads its own with ``ctx.option(MyOptions)``.

Facts know when they are stale. When a pass that invalidates facts has run, they are dropped from
the graph (and from ``provided``) together with every fact derived from them, so a later pass that
needs them must recompute them. A training loop that changed weights says so with
:func:`mark_weights_changed`.

Example:
    >>> from lrfx.passes.analysis import propagate_shapes, annotate_costs
    >>> pipe = Pipeline([propagate_shapes, annotate_costs])
    >>> pipe.names
    ('propagate_shapes', 'annotate_costs')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import fx

from lrfx.errors import LrfxError, PassError, PipelineError
from lrfx.facts import (
    META_KEY,
    FrozenMap,
    NodeFacts,
    get_graph_facts,
    get_node_facts,
    set_graph_facts,
    set_node_facts,
)
from lrfx.progress import step

__all__ = [
    "FACT_DEPENDENCIES",
    "GraphPass",
    "PassContext",
    "Pipeline",
    "graph_pass",
    "invalidate",
    "mark_weights_changed",
    "register_fact",
]

R = TypeVar("R")
T = TypeVar("T")

#: Facts present on every graph produced by :func:`lrfx.trace`.
INITIAL_FACTS = frozenset({"graph"})


@dataclass(frozen=True)
class PassContext:
    """What every pass may read besides the graph.

    Attributes:
        example_inputs: Positional inputs of the model (for passes that run it).
        progress: Show progress bars for long work.
        options: Typed pass options (frozen dataclass instances, at most one per type). A
            mapping of option names to values is also accepted: each pass then takes the names
            its options type declares.
    """

    example_inputs: tuple[Any, ...] = ()
    progress: bool = False
    options: Sequence[Any] | Mapping[str, Any] = ()

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", FrozenMap(self.options))
            return
        opts = tuple(self.options)
        seen: set[type] = set()
        for o in opts:
            if not dataclasses.is_dataclass(o) or isinstance(o, type):
                raise PipelineError(f"pass options must be dataclass instances, got {o!r}")
            if type(o) in seen:
                raise PipelineError(f"two {type(o).__name__} options given to one PassContext")
            seen.add(type(o))
        object.__setattr__(self, "options", opts)

    def option(self, cls: type[T]) -> T:
        """The options of type ``cls`` given to this context (``cls()`` if none were).

        Raises:
            PipelineError: None were given and ``cls`` has required fields.
        """
        if isinstance(self.options, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            given = {k: v for k, v in self.options.items() if k in names}
            return self._make(cls, given)
        for o in self.options:
            if isinstance(o, cls):
                return o
        return self._make(cls, {})

    @staticmethod
    def _make(cls: type[T], kwargs: dict[str, Any]) -> T:
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise PipelineError(f"{cls.__name__} options are required here ({exc}); pass "
                                f"PassContext(options=[{cls.__name__}(...)])") from None

    def with_options(self, *options: Any) -> PassContext:
        """A copy with ``options`` added (replacing any of the same type)."""
        if isinstance(self.options, Mapping):
            raise PipelineError("with_options needs typed options, not a mapping")
        keep = [o for o in self.options if not any(isinstance(o, type(n)) for n in options)]
        return dataclasses.replace(self, options=(*keep, *options))


# --- facts and their invalidation -----------------------------------------------------------------

#: Which facts are derived from which: invalidating a fact also invalidates those built on it.
FACT_DEPENDENCIES: dict[str, frozenset[str]] = {
    "layers": frozenset({"shapes"}),
    "spectra": frozenset({"layers", "weights"}),
    "input_stats": frozenset({"layers", "weights"}),
}

_DROPPERS: dict[str, Callable[[fx.GraphModule], None]] = {}


def register_fact(name: str, drop: Callable[[fx.GraphModule], None],
                  depends_on: Iterable[str] = ()) -> None:
    """Declare a fact, how to remove it from a graph, and the facts it is derived from."""
    _DROPPERS[name] = drop
    if depends_on:
        FACT_DEPENDENCIES[name] = frozenset(depends_on)


def _closure(facts: Iterable[str]) -> set[str]:
    out = set(facts)
    changed = True
    while changed:
        changed = False
        for fact, deps in FACT_DEPENDENCIES.items():
            if fact not in out and deps & out:
                out.add(fact)
                changed = True
    return out


def invalidate(gm: fx.GraphModule, facts: Iterable[str]) -> frozenset[str]:
    """Drop ``facts`` (and every fact derived from them) from ``gm``; returns what was dropped.

    Example:
        >>> import torch, lrfx
        >>> gm = lrfx.trace(torch.nn.Linear(3, 2))
        >>> sorted(invalidate(gm, ["shapes"]))
        ['input_stats', 'layers', 'shapes', 'spectra']
    """
    dropped = _closure(facts)
    for fact in dropped:
        drop = _DROPPERS.get(fact)
        if drop is not None:
            drop(gm)
    g = get_graph_facts(gm)
    set_graph_facts(gm, g.replace(provided=g.provided - dropped))
    return frozenset(dropped)


def mark_weights_changed(gm: fx.GraphModule) -> None:
    """Tell lrfx that ``gm``'s weights changed: spectra and input statistics become stale.

    In-place updates through autograd-tracked tensors (optimizer steps) are noticed by the
    spectra pass on its own (each spectrum records its weight's version); call this after writes
    it cannot see (``param.data.copy_(...)``, ``load_state_dict`` into ``.data``) or whenever in
    doubt. The next analysis recomputes what it needs.

    Example:
        >>> import torch, lrfx
        >>> gm = lrfx.trace(torch.nn.Linear(3, 2))
        >>> mark_weights_changed(gm); gm.meta["lrfx"].weights_version
        1
    """
    g = get_graph_facts(gm)
    set_graph_facts(gm, g.replace(weights_version=g.weights_version + 1))
    invalidate(gm, ["weights"])


def _drop_shapes(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    g = get_graph_facts(gm)
    set_graph_facts(gm, g.replace(leaf_calls=FrozenMap(), leaf_macs=FrozenMap()))


def _drop_layers(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)


def _drop_spectra(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        if facts is not None and any(layer.spectra for layer in facts.layers):
            set_node_facts(node, NodeFacts(tuple(
                layer.with_spectra({}) if layer.spectra else layer for layer in facts.layers)))


def _drop_input_stats(gm: fx.GraphModule) -> None:
    g = get_graph_facts(gm)
    set_graph_facts(gm, g.replace(input_stats=None))


register_fact("shapes", _drop_shapes)
register_fact("layers", _drop_layers)
register_fact("spectra", _drop_spectra)
register_fact("input_stats", _drop_input_stats)


# --- passes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphPass(Generic[R]):
    """A named pass with declared requirements; call it as ``p(gm, ctx)``.

    Calling a pass directly checks its requirements against ``gm.meta["lrfx"].provided``, drops
    what it invalidates and records what it provides once it succeeds. ``p(gm, opts)`` with an
    instance of the pass's options type is short for ``p(gm, PassContext(options=[opts]))``.
    """

    name: str
    fn: Callable[[fx.GraphModule, PassContext], R]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    mutates: bool = False
    invalidates: frozenset[str] = frozenset()
    options: type | None = None

    def __call__(self, gm: fx.GraphModule, ctx: Any = None) -> R:
        if ctx is None:
            ctx = PassContext()
        elif self.options is not None and isinstance(ctx, self.options):
            ctx = PassContext(options=[ctx])
        elif not isinstance(ctx, PassContext):
            raise PipelineError(f"pass {self.name!r} takes a PassContext"
                                + (f" or {self.options.__name__}" if self.options else "")
                                + f", got {type(ctx).__name__}")
        facts = get_graph_facts(gm)
        have = facts.provided | INITIAL_FACTS
        missing = self.requires - have
        if missing:
            raise PipelineError(
                f"pass {self.name!r} requires {sorted(missing)}, which no pass has provided on "
                f"this graph yet (provided: {sorted(have)}); run the passes that provide them first"
            )
        result = self.fn(gm, ctx)
        if self.invalidates:
            invalidate(gm, self.invalidates)
        facts = get_graph_facts(gm)  # the pass may have replaced the record
        set_graph_facts(gm, facts.replace(provided=facts.provided | self.provides))
        return result


def graph_pass(
    *,
    name: str | None = None,
    requires: Iterable[str] = (),
    provides: Iterable[str] = (),
    mutates: bool = False,
    invalidates: Iterable[str] = (),
    options: type | None = None,
) -> Callable[[Callable[[fx.GraphModule, PassContext], R]], GraphPass[R]]:
    """Declare a function ``fn(gm, ctx)`` as a pass.

    Args:
        name: The pass's name (defaults to the function's name).
        requires: Facts that must be provided before this pass runs.
        provides: Facts this pass provides.
        mutates: Whether the pass changes the graph.
        invalidates: Facts a run of this pass makes stale (dropped after it runs).
        options: The frozen dataclass of options the pass reads with ``ctx.option(...)``.

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
            invalidates=frozenset(invalidates),
            options=options,
        )
        # help(pass) shows the function's docstring (what it reads, writes, and whether it mutates)
        object.__setattr__(p, "__doc__", fn.__doc__)
        return p

    return wrap


class Pipeline:
    """An ordered list of passes, validated when built.

    A fact invalidated by a pass no longer counts as provided for the passes after it.

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
            have -= _closure(p.invalidates)
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
                with step(p.name.replace("_", " "), ctx.progress):
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
