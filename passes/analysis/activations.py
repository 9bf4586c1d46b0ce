"""Activation statistics for data-aware (whitened) low-rank factorization.

For every factorable Linear/Conv1d/Conv2d module (graph nodes and layers inside leaves), forward
pre-hooks accumulate the Gram matrix ``X X^T`` of the layer's inputs over calibration batches, in
float64 and in bounded memory (one ``d x d`` matrix per layer and unfolding, whatever the number
of batches):

* Linear: the input rows (``d = n``);
* Conv, channel scheme: the im2col patches (``d = C/g * prod(k)``, one matrix per group);
* Conv2d, spatial scheme: the vertical ``kh x 1`` patches (``d = C * kh``), the input side of
  the spatial factorization (an approximation that ignores correlations across the width taps).

Conv Grams are computed from the shift structure of the patches
(:func:`~lrfx.passes.analysis.grams.patch_gram`: one correlation per tap offset, exact border
corrections), not by materializing im2col (except kernels of more than
:data:`~lrfx.passes.analysis.grams.MAX_TAPS` taps); the vertical Gram is a by-product of the
channel one.

Memory: the statistics themselves, ``8 * d^2`` bytes per layer and unfolding (951 MB of patch
Grams over torchvision's resnet50, 162 MB for its largest conv), are kept until the
factorization; on top of them a call holds one more Gram (the batch's, before it is added in),
at most :data:`CHUNK_BYTES` of the layer's input (a few copies of it inside the products) and
:data:`~lrfx.passes.analysis.grams.PAIR_BYTES` of blocks being assembled. Measured peaks are in
``bench/README.md`` §8.

:func:`~lrfx.passes.analysis.spectra.compute_spectra`, run after this pass, then gives the
data-aware spectra directly: per layer, the singular values of ``W S`` where
``S S^T = X X^T / n + damping``, each dropped value being the output error it causes (SVD-LLM).
:func:`whitened_spectra` computes the same values standalone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lrfx.cost import ConvGeometry, LinearGeometry
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
from lrfx.passes.analysis.grams import patch_gram
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


#: Input bytes per conv-statistics call (the products copy their input a few times).
CHUNK_BYTES = 32 << 20

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


def _add(stats: InputStats, key: str, gram: torch.Tensor) -> None:
    if key in stats.grams:
        stats.grams[key] += gram
    else:
        stats.grams[key] = gram


def _out_positions(padded: torch.Tensor, k: tuple[int, int], s: tuple[int, int],
                   d: tuple[int, int]) -> int:
    h, w = padded.shape[-2:]
    return max(0, (h - d[0] * (k[0] - 1) - 1) // s[0] + 1) * max(
        0, (w - d[1] * (k[1] - 1) - 1) // s[1] + 1)


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
            k, s, d = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
            padded, flat = _pad_conv_input(x, m)
            padded, flat = padded.unsqueeze(-2), [*flat, 0, 0]
        else:
            k, s, d = m.kernel_size, m.stride, m.dilation  # type: ignore[assignment]
            padded, flat = _pad_conv_input(x, m)
        if padded.dim() == 3:  # unbatched conv2d input
            padded = padded.unsqueeze(0)
        padded = padded.detach()
        if padded.dtype != torch.float64:
            padded = padded.float()
        # zero padding needs no border correction (an optimization; reflect etc. do)
        zeros = (flat[2], flat[3], flat[0], flat[1]) if m.padding_mode == "zeros" else (0,) * 4
        c = padded.shape[1]
        channel = "channel" in units and not _too_wide(
            layer, "channel", c // m.groups * k[0] * k[1], max_dim, skipped)
        spatial = "spatial" in units and not _too_wide(layer, "spatial", c * k[0], max_dim,
                                                       skipped)
        # a few samples at a time: the copies the products make stay within CHUNK_BYTES
        per = max(1, CHUNK_BYTES // max(1, padded[0].numel() * padded.element_size()))
        for start in range(0, padded.shape[0], per):
            piece = padded[start:start + per]
            vertical = None
            if channel:
                both = spatial and m.groups == 1 and s[1] == 1
                res = patch_gram(piece, k, s, d, m.groups, pad=zeros, vertical=both)
                gram, vertical = res if isinstance(res, tuple) else (res, None)
                _add(stats, "channel", gram)
                stats.count += piece.shape[0] * _out_positions(piece, k, s, d)
            if spatial:
                if vertical is None:
                    res = patch_gram(piece, (k[0], 1), (s[0], 1), (d[0], 1), pad=zeros)
                    assert not isinstance(res, tuple)
                    vertical = res
                    if not channel:
                        stats.count += piece.shape[0] * _out_positions(
                            piece, (k[0], 1), (s[0], 1), (d[0], 1))
                _add(stats, "spatial", vertical)
    return pre_hook


def _statable(gm: fx.GraphModule, layer: LayerFacts) -> nn.Module | None:
    if not layer.factorable or layer.weight != f"{layer.name}.weight":
        return None
    try:
        m = gm.get_submodule(layer.name)
    except AttributeError:
        return None
    return m if is_linear(m) or isinstance(m, (nn.Conv1d, nn.Conv2d)) else None


def _feed_hook(hook: Any, standin: nn.Module, x: torch.Tensor) -> None:
    hook(standin, (x,), {})


def _functional(node: fx.Node, layer: LayerFacts) -> nn.Module | None:
    """A weightless stand-in module (meta device) with the hyper-parameters of a functional
    ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` layer, so the module hooks can read its input."""
    if node.op != "call_function" or not layer.factorable or layer.inside_leaf:
        return None
    g = layer.geometry
    if isinstance(g, LinearGeometry) and node.target in (F.linear, torch._C._nn.linear):
        return nn.Linear(g.in_features, g.out_features, bias=False, device="meta")
    if isinstance(g, ConvGeometry) and not g.transposed and len(g.kernel) in (1, 2) and \
            node.target in (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d):
        cls: Any = nn.Conv1d if len(g.kernel) == 1 else nn.Conv2d
        return cls(g.in_channels, g.out_channels, g.kernel, g.stride, g.padding,
                   g.dilation, g.groups, bias=False, padding_mode=g.padding_mode,
                   device="meta")
    return None


_MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _attention_of(gm: fx.GraphModule, layer: LayerFacts) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the ``nn.MultiheadAttention`` whose projection ``layer`` is."""
    parent, _, part = layer.name.rpartition(".")
    if part not in _MHA_PARTS or not parent:
        return None
    try:
        m = gm.get_submodule(parent)
    except AttributeError:
        return None
    return (parent, m) if isinstance(m, nn.MultiheadAttention) else None


def _attention_hook(name: str, mha: nn.Module, stats: dict[str, InputStats], max_dim: int,
                    skipped: set[str]) -> Any:
    """Statistics of the four projections of an ``nn.MultiheadAttention``: its packed
    projections and its out projection are applied inside one functional call, so the hook
    replays the call through a :class:`~lrfx.modules.LowRankMultiheadAttention` holding the
    same weights (same results) whose projections are plain Linear modules with hooks. The
    replay costs one more attention forward per calibration batch."""
    from lrfx.modules import LowRankMultiheadAttention

    assert isinstance(mha, nn.MultiheadAttention)
    with torch.no_grad():
        replica = LowRankMultiheadAttention.replacing(mha, {}, name).eval()
    for part in _MHA_PARTS:
        key = f"{name}.{part}"
        stats[key] = InputStats({})

        def rows(m: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
            x = args[0]
            if _too_wide_name(key, x.shape[-1], max_dim, skipped):
                return
            flat = x.reshape(-1, x.shape[-1])
            _accumulate(stats[key], "rows", flat)
            stats[key].count += flat.shape[0]
        replica.get_submodule(part).register_forward_pre_hook(rows)

    def pre_hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = dict(zip(_MHA_ARGS, args, strict=False))
        call.update(kwargs)
        call["need_weights"] = False  # the projections' inputs do not depend on it
        with torch.no_grad():
            replica(**call)
    return pre_hook


def _too_wide_name(key: str, dim: int, limit: int, skipped: set[str]) -> bool:
    if dim <= limit:
        return False
    if key not in skipped:
        skipped.add(key)
        log.info("%s: input side has %d columns (> %d): no calibration statistics, plain "
                 "spectrum", key, dim, limit)
    return True


class _Checked(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule,
                 watch: Mapping[str, Callable[[torch.Tensor], None]] | None = None) -> None:
        super().__init__(gm)
        self.watch = watch or {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            seen = self.watch.get(n.name)
            if seen is not None:  # a functional layer: hand its input to the statistics
                args, _ = self.fetch_args_kwargs_from_env(n)
                if args and isinstance(args[0], torch.Tensor):
                    seen(args[0])
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


def run_checked(gm: fx.GraphModule, *args: Any,
                watch: Mapping[str, Callable[[torch.Tensor], None]] | None = None) -> Any:
    """Run the graph; a failure raises :class:`ShapeError` naming the node (not torch's text).
    ``watch``: per node name, a callback given the node's first input before it runs."""
    try:
        return _Checked(gm, watch).run(*args)
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
    watch: dict[str, Callable[[torch.Tensor], None]] = {}  # functional layers, by node
    seen: set[str] = set()
    skipped: set[str] = set()
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            mha = _attention_of(gm, layer)
            if mha is not None and layer.factorable and mha[0] not in seen:
                seen.add(mha[0])
                handles.append(mha[1].register_forward_pre_hook(
                    _attention_hook(mha[0], mha[1], stats, options.max_dim, skipped),
                    with_kwargs=True))
            standin = _functional(node, layer)
            if standin is not None and layer.name not in seen:
                seen.add(layer.name)
                stats[layer.name] = InputStats({})
                hook = _hook(layer, stats[layer.name], options.max_dim, skipped)
                watch[node.name] = functools.partial(_feed_hook, hook, standin)
                continue
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
                        run_checked(gm, *spec.feed(inputs), watch=watch)
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
