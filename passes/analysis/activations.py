"""Activation statistics for data-aware (whitened) low-rank factorization.

For every factorable Linear/Conv1d/Conv2d module (graph nodes and layers inside leaves), forward
pre-hooks accumulate the Gram matrix ``X X^T`` of the layer's inputs over calibration batches, in
float64 and in bounded memory (one ``d x d`` matrix per layer and unfolding, whatever the number
of batches):

* Linear: the input rows (``d = n``);
* Conv, channel scheme: the im2col patches (``d = C/g * prod(k)``, one matrix per group);
* Conv2d, spatial scheme: the vertical ``kh x 1`` patches (``d = C * kh``), the input side of
  the spatial factorization (an approximation that ignores correlations across the width taps).

:func:`~lrfx.passes.analysis.spectra.compute_spectra`, run after this pass, then gives the
data-aware spectra directly: per layer, the singular values of ``W S`` where
``S S^T = X X^T / n + damping``, each dropped value being the output error it causes (SVD-LLM).
:func:`whitened_spectra` computes the same values standalone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lrfx.decompositions import DAMPING, svdvals, unfold, whitening_factor
from lrfx.errors import LrfxError, ShapeError
from lrfx.facts import (
    FrozenMap,
    InputStats,
    LayerFacts,
    Spectrum,
    get_graph_facts,
    get_node_facts,
    update_graph_facts,
)
from lrfx.inputs import Inputs
from lrfx.layers import is_linear, linear_like
from lrfx.passes.analysis.spectra import layer_unfoldings
from lrfx.pipeline import PassContext, graph_pass
from lrfx.progress import progress_bar
from lrfx.tracing import eval_mode

__all__ = ["DAMPING", "CalibrationOptions", "InputStats", "collect_input_stats", "run_checked",
           "whitened_spectra", "whitening_factor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    """Options of :func:`collect_input_stats`.

    Attributes:
        calibration: The batches, each in any form :class:`~lrfx.inputs.Inputs` accepts.
        run: How to run one batch (``run(batch)``); by default the graph runs it, fed as the
            graph's input spec says. Module-mode captures run the model itself (their graph is
            specialized to the example's shapes).
        max_dim: The widest input side an unfolding gets statistics for (``C * kh * kw`` of a
            conv's channel unfolding); wider ones keep plain spectra. The default (a 3x3 conv
            over 512 channels) bounds each Gram at 170 MB.
    """

    calibration: Iterable[Any]
    run: Callable[[Any], Any] | None = None
    max_dim: int = 4608


def _too_wide(layer: LayerFacts, unit: str, dim: int, limit: int, skipped: set[str]) -> bool:
    """Unfoldings whose input side is wider than ``limit`` get no statistics (a ``d x d``
    float64 Gram, and ``d``-wide im2col rows per batch, would not fit in memory): their spectra
    stay plain."""
    if dim <= limit:
        return False
    key = f"{layer.name}:{unit}"
    if key not in skipped:
        skipped.add(key)
        log.info("%s: the %s unfolding's input side has %d columns (> %d): no calibration "
                 "statistics, plain spectrum", layer.name, unit, dim, limit)
    return True


def _same_padding(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


def _pad_conv_input(x: torch.Tensor, m: nn.Module) -> tuple[torch.Tensor, list[int]]:
    """The input padded as the conv pads it, plus the padding left to 0 for unfold."""
    assert isinstance(m, (nn.Conv1d, nn.Conv2d))
    dims = x.dim() - 2
    k, d = list(m.kernel_size), list(m.dilation)
    if isinstance(m.padding, str):
        pads = [(0, 0)] * dims if m.padding == "valid" else [
            _same_padding(k[i], d[i]) for i in range(dims)]
    else:
        pads = [(p, p) for p in m.padding]
    flat: list[int] = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, flat, mode=mode) if any(flat) else x, flat


def _patches(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    """im2col patches ``(B * L, C * kh * kw)`` of the padded input."""
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


#: Rows per Gram block: each block's ``X^T X`` is a float32 product (fast BLAS), the blocks are
#: summed in float64, so the rounding of one block is that of a 16k-term float32 sum (~1e-5
#: relative) whatever the number of calibration samples.
BLOCK_ROWS = 1 << 14


def _accumulate(stats: InputStats, key: str, rows: torch.Tensor, groups: int = 1) -> None:
    rows = rows.detach()
    if rows.dtype != torch.float64:
        rows = rows.float()
    g = rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)  # (groups, n, d)
    gram = None
    for start in range(0, g.shape[1], BLOCK_ROWS):
        block = g[:, start:start + BLOCK_ROWS]
        part = (block.transpose(1, 2) @ block).to(torch.float64)
        gram = part if gram is None else gram.add_(part)
    if gram is None:
        return
    if key in stats.grams:
        stats.grams[key] += gram
    else:
        stats.grams[key] = gram


def _conv_rows(padded: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
               dilation: tuple[int, int]) -> Iterator[torch.Tensor]:
    """im2col rows of ``padded`` a few samples at a time (about :data:`BLOCK_ROWS` rows per
    piece): the patches of a whole batch are never held at once."""
    n, _, h, w = padded.shape
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    per = max(1, BLOCK_ROWS // max(1, out_h * out_w))
    for start in range(0, n, per):
        yield _patches(padded[start:start + per], kernel, stride, dilation)


def _hook(layer: LayerFacts, stats: InputStats, max_dim: int, skipped: set[str]) -> Any:
    units = layer_unfoldings(layer)

    def pre_hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        if is_linear(m):
            if _too_wide(layer, "rows", x.shape[-1], max_dim, skipped):
                return
            _accumulate(stats, "rows", x.reshape(-1, x.shape[-1]))
            stats.count += x.reshape(-1, x.shape[-1]).shape[0]
            return
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(-2)
            k, s, d = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
            padded, _ = _pad_conv_input(x.squeeze(-2), m)
            padded = padded.unsqueeze(-2)
        else:
            k, s, d = m.kernel_size, m.stride, m.dilation  # type: ignore[assignment]
            padded, _ = _pad_conv_input(x, m)
        if x.dim() == 3:  # unbatched conv2d input
            padded = padded.unsqueeze(0)
        c = padded.shape[1]
        if "channel" in units and not _too_wide(layer, "channel", c // m.groups * k[0] * k[1],
                                                max_dim, skipped):
            for p in _conv_rows(padded, k, s, d):
                _accumulate(stats, "channel", p, m.groups)
                stats.count += p.shape[0]
            counted = True
        else:
            counted = False
        if "spatial" in units and not _too_wide(layer, "spatial", c * k[0], max_dim, skipped):
            for v in _conv_rows(padded, (k[0], 1), (s[0], 1), (d[0], 1)):
                _accumulate(stats, "spatial", v)
                if not counted:
                    stats.count += v.shape[0]
    return pre_hook


def _statable(gm: fx.GraphModule, layer: LayerFacts) -> nn.Module | None:
    if not layer.factorable or layer.weight != f"{layer.name}.weight":
        return None
    try:
        m = gm.get_submodule(layer.name)
    except AttributeError:
        return None
    return m if is_linear(m) or isinstance(m, (nn.Conv1d, nn.Conv2d)) else None


class _Checked(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeError(n.name, f"{n.op} {n.target}", first) from exc


def _weight_of(gm: fx.GraphModule, name: str) -> torch.Tensor:
    m = gm.get_submodule(name)
    entry = linear_like(m)
    w = entry.weight(m) if entry is not None else m.weight
    assert isinstance(w, torch.Tensor)
    return w


def run_checked(gm: fx.GraphModule, *args: Any) -> Any:
    """Run the graph; a failure raises :class:`ShapeError` naming the node (not torch's text)."""
    try:
        return _Checked(gm).run(*args)
    except ShapeError as exc:
        raise ShapeError(exc.node, exc.target, exc.reason) from exc.__cause__


@graph_pass(requires=["layers"], provides=["input_stats"], options=CalibrationOptions)
def collect_input_stats(gm: fx.GraphModule, ctx: PassContext) -> Mapping[str, InputStats]:
    """Accumulate ``X X^T`` of every factorable module's inputs over calibration batches.

    Reads: ``CalibrationOptions.calibration`` (an iterable of batches: tensors or tuples of
    positional inputs) and the layer facts. Writes: ``gm.meta["lrfx"].input_stats``. Does not
    change the graph or any module's state (eval mode, no grad; hooks removed after).

    Raises:
        ShapeError: A calibration batch does not fit the model; names the node.
    """
    options = ctx.option(CalibrationOptions)
    batches = options.calibration
    if batches is None:
        raise LrfxError("collect_input_stats needs calibration batches: "
                        "PassContext(options=[CalibrationOptions(calibration=...)])")
    stats: dict[str, InputStats] = {}
    handles = []
    seen: set[str] = set()
    skipped: set[str] = set()
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            m = _statable(gm, layer)
            if m is None or layer.name in seen:
                continue
            seen.add(layer.name)
            stats[layer.name] = InputStats({})
            hook = _hook(layer, stats[layer.name], options.max_dim, skipped)
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    n_batches = 0
    spec = get_graph_facts(gm).input_spec
    run = options.run
    try:
        total = len(batches) if isinstance(batches, Sized) else 0
        with eval_mode(gm), torch.no_grad(), progress_bar(
                "calibration statistics", total, enabled=ctx.progress) as advance:
            for k, batch in enumerate(batches):
                advance()
                try:
                    if run is not None:
                        run(batch)
                    else:
                        inputs = Inputs.of(batch, f"calibration batch {k}")
                        run_checked(gm, *spec.feed(inputs))
                except ShapeError as exc:  # names the node; say which batch
                    raise ShapeError(exc.node, exc.target, exc.reason,
                                     inputs=f"calibration batch {k}") from exc
                except LrfxError as exc:
                    raise LrfxError(f"calibration batch {k}: {exc}{_pair_hint(batch)}") from exc
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise LrfxError("calibration is empty: give at least one batch")
    update_graph_facts(gm, input_stats=FrozenMap(stats))
    return stats


def _pair_hint(batch: Any) -> str:
    """A hint when a calibration batch looks like the ``(inputs, labels)`` a DataLoader yields."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 \
            and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point():
        return (". It looks like an (inputs, labels) pair as a DataLoader yields: pass the "
                "inputs only, e.g. calibration=(x for x, _ in loader)")
    return ""


def whitened_spectra(
    gm: fx.GraphModule, layers: Iterable[Any], stats: Mapping[str, InputStats]
) -> tuple[dict[str, dict[str, Spectrum]], dict[str, dict[str, torch.Tensor]]]:
    """Whitened spectra and whitening factors of every layer with statistics.

    Returns:
        ``(spectra, factors)``: per layer, per unfolding, the :class:`Spectrum` of ``W S`` (``S^T
        M`` for the spatial unfolding) and the factor ``S``. Unfoldings without statistics (e.g.
        Tucker-2's mode 1) keep their plain spectra.
    """
    spectra: dict[str, dict[str, Spectrum]] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for rec in layers:
        st = stats.get(rec.name)
        if st is None or not st.grams:
            continue
        w = _weight_of(gm, rec.name).detach().to("cpu", torch.float64)
        groups = getattr(rec.calls[0], "groups", 1)
        sp = dict(rec.spectra)
        fac: dict[str, torch.Tensor] = {}
        for unit, gram in st.grams.items():
            s = whitening_factor(gram, st.count)
            if unit == "rows":
                mats = w.unsqueeze(0) @ s
            elif unit == "channel":
                mats = unfold(w, "channel", groups) @ s
            else:  # spatial: the input side is the rows of the unfolding
                mats = s.transpose(-2, -1) @ unfold(w, "spatial")
            sp[unit] = Spectrum(svdvals(mats))
            fac[unit] = s
        spectra[rec.name] = sp
        factors[rec.name] = fac
    return spectra, factors
