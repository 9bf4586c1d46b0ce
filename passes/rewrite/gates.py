"""Rank gates: a learnable scale per rank component between the factors of a factored layer.

:func:`insert_gates` puts a :class:`~lrfx.modules.Gate` (all ones: the model is unchanged) after
each factor of every :class:`~lrfx.modules.Factored` layer whose next factor mixes channels (a
conv with one group, or a linear) — one gate per rank dimension: the rank of ``svd``,
``channel``, ``spatial`` and ``cp``, both ranks of ``tucker2``. Slimming then penalizes the gates
like BatchNorm scales; the channel analysis sees each gate as the norm of its rank dimension, so
a plan that drops gated channels lowers the layer's rank structurally.

:func:`fold_gates` multiplies every gate into the factor that feeds it (its output rows and
bias), removes the gate, and sets each factored layer's ``rank`` to what its factors now have.

Both mutate the graph (nodes and modules); :func:`insert_gates` invalidates shapes-derived facts
only through the modules it adds, which the caller re-analyzes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from lrfx.modules import Factored, Gate
from lrfx.pipeline import PassContext, graph_pass
from lrfx.schemes import get_scheme

__all__ = ["fold_gates", "gate_path", "insert_gates", "sync_ranks"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def gate_path(factored: str, index: int) -> str:
    """Where the gate after factor ``index`` of the factored layer at ``factored`` lives (a
    sibling of the layer: a gate inside the container would be taken for a factor)."""
    return f"{factored}_gate{index}" if index else f"{factored}_gate"


def _mixes(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1)


def _not(g: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not g


@graph_pass(mutates=True, invalidates=["shapes", "layers", "spectra", "input_stats"])
def insert_gates(gm: fx.GraphModule, ctx: PassContext) -> dict[str, tuple[str, ...]]:
    """Insert rank gates into every factored layer (see the module docstring).

    Reads the graph's :class:`Factored` modules and the nodes calling their factors; adds a
    ``Gate`` module and a node per rank dimension. Mutates.

    Returns:
        Per factored layer, the paths of its gates.
    """
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    added: dict[str, tuple[str, ...]] = {}
    for path, f in modules.items():
        if not isinstance(f, Factored):
            continue
        gates = []
        for j in range(len(f) - 1):
            here, after = f[j], f[j + 1]
            if not _mixes(after) or not isinstance(here, (nn.Linear, *_CONVS)):
                continue
            nodes = calls.get(f"{path}.{j}", [])
            if len(nodes) != 1:
                continue
            node = nodes[0]
            width = here.out_features if isinstance(here, nn.Linear) else here.out_channels
            gate = Gate(width, dim=-1 if isinstance(here, nn.Linear) else 1).to(
                device=here.weight.device, dtype=here.weight.dtype)
            target = gate_path(path, j)
            gm.add_submodule(target, gate)
            with gm.graph.inserting_after(node):
                g = gm.graph.call_module(target, (node,))
            node.replace_all_uses_with(g, delete_user_cb=_not(g))
            gates.append(target)
        if gates:
            added[path] = tuple(gates)
    gm.graph.lint()
    gm.recompile()
    return added


@graph_pass(mutates=True, invalidates=["shapes", "layers", "spectra", "input_stats"])
def fold_gates(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Multiply every gate into the conv/linear before it and remove it; then
    :func:`sync_ranks`. A gate whose input is not a conv/linear called once is left in place.

    Reads and mutates the graph. Returns the number of gates folded.
    """
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        gate = gm.get_submodule(str(node.target))
        if not isinstance(gate, Gate):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        m: Any = gm.get_submodule(str(src.target))
        if not isinstance(m, (nn.Linear, *_CONVS)):
            continue
        with torch.no_grad():
            scale = gate.weight.detach().to(m.weight.dtype)
            m.weight.mul_(scale.view(-1, *([1] * (m.weight.dim() - 1))))
            if m.bias is not None:
                m.bias.mul_(scale)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        owner, _, name = str(node.target).rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    sync_ranks(gm)
    return folded


def sync_ranks(gm: nn.Module) -> dict[str, int | tuple[int, ...]]:
    """Set each :class:`Factored` layer's ``rank`` to its factors' (after channel pruning of a
    rank dimension); returns the ranks that changed."""
    changed: dict[str, int | tuple[int, ...]] = {}
    for path, f in gm.named_modules():
        if not isinstance(f, Factored):
            continue
        n = get_scheme(f.scheme).n_ranks
        pieces: list[Any] = list(f)[:n]
        widths = [int(p.out_features if isinstance(p, nn.Linear) else p.out_channels)
                  for p in pieces]
        rank: int | tuple[int, ...] = widths[0] if n == 1 else tuple(widths)
        if rank != f.rank:
            f.rank = rank
            changed[path] = rank
    return changed
