"""Exception types raised by lrfx.

Every error lrfx raises on bad input derives from :class:`LrfxError`, names the layer, pass or
argument at fault, and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BudgetInfeasibleError",
    "LrfxError",
    "PassError",
    "PipelineError",
    "PlanMismatchError",
    "SchemeError",
    "ShapeError",
    "TraceError",
    "UnsupportedLayerError",
]


class LrfxError(Exception):
    """Base class of every error lrfx raises on purpose."""


class TraceError(LrfxError):
    """The model could not be traced at the top level.

    Attributes:
        module_path: Qualified name of the module whose ``forward`` failed (``""`` for the root).
        reason: Why tracing failed, in one line.
    """

    def __init__(self, module_path: str, reason: str, module_type: str = "") -> None:
        self.module_path = module_path
        self.reason = reason
        where = f"module {module_path!r}" if module_path else "the top-level module"
        if module_type:
            where += f" ({module_type})"
        super().__init__(
            f"cannot trace {where}: {reason}. lrfx turns untraceable *submodules* into leaves "
            "automatically, but the top-level forward must be traceable; move the data-dependent "
            "code into a submodule or pass concrete_args for the arguments that drive it."
        )


class ShapeError(LrfxError):
    """Running the example inputs through the traced graph failed at a node."""

    def __init__(self, node: str, target: str, reason: str,
                 inputs: str = "example_inputs") -> None:
        self.node = node
        self.target = target
        self.reason = reason
        self.inputs = inputs
        what = "shape propagation" if inputs == "example_inputs" else inputs
        super().__init__(
            f"{what} failed at node {node!r} ({target}): {reason}. "
            f"Check that {inputs} {'have' if inputs == 'example_inputs' else 'has'} the shape "
            "and dtype the model expects."
        )


class PassError(LrfxError):
    """A pass raised while running inside a :class:`~lrfx.Pipeline`."""

    def __init__(self, pass_name: str, before: list[str], reason: str) -> None:
        self.pass_name = pass_name
        self.before = list(before)
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass {pass_name!r} failed (passes run before it: {ran}): {reason}")


class PipelineError(LrfxError):
    """A pipeline was built with passes whose requirements are not met."""


class PlanMismatchError(LrfxError):
    """A :class:`~lrfx.RankPlan` does not fit the model it is applied to."""

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(f"plan does not fit layer {layer!r}: {reason}")


class UnsupportedLayerError(LrfxError):
    """A decomposition scheme was asked of a layer it does not apply to."""

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(f"layer {layer!r}: {reason}")


class BudgetInfeasibleError(LrfxError):
    """No plan can meet the requested budget."""


class SchemeError(LrfxError, ValueError):
    """An unknown decomposition scheme, or one asked of a layer it does not apply to."""
