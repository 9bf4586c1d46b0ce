"""What a rewrite did: the per-layer rewrite records and the before/after report.

``lrfx.apply`` and ``lrfx.compress`` both leave a :class:`CompressionReport` in
``gm.meta["lrfx"].report``; its per-layer figures come from the plan and the cost model (the
rewritten graph is re-counted only in tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CompressionReport", "RewriteRecord"]


@dataclass(frozen=True)
class RewriteRecord:
    """What the rewrite did to one layer.

    Attributes:
        name: The layer (plan key).
        scheme, rank: How it was factored.
        path: Where the factored module lives in the graph module.
        nodes: Graph nodes created for it (empty for module substitution).
    """

    name: str
    scheme: str
    rank: Any
    path: str
    nodes: tuple[str, ...]


#: What the ``measured`` column (``output_error``) of a sequential compression means.
MEASURED = ("relative squared error of the layer's output in the compressed model against the "
            "original model's, measured on the calibration data")


@dataclass(frozen=True)
class CompressionReport:
    """Before/after figures of one rewrite (``gm.meta["lrfx"].report``).

    Iterating over a report yields its per-layer rows (``report[0]["layer"]``...).

    Attributes:
        layers: Per factored layer: ``layer``, ``scheme``, ``rank``, ``macs_before``,
            ``macs_after``, ``params_before``, ``params_after`` and ``error``: the relative
            squared truncation error the allocator predicted (of the weight, or of the layer's
            output on the calibration data when whitened); ``None`` when no spectra were known.
            With sequential calibration also ``output_error``: the relative squared error of
            the layer's output in the compressed model against the original model's, measured
            on the calibration data (``None`` for layers it did not walk), and ``fit``: how the
            factors were chosen (``joint``, ``last``, or ``spectra (why)``).
        macs_before, macs_after, params_before, params_after: Model totals.
        budget: ``{"metric", "target", "fraction"}`` (empty for a hand-written plan).
        allocator, scheme, whitened: How the plan was made.
        sequential: Whether the factors were fitted by sequential calibration.
        seconds: Wall time of the whole call.
        mode: How the model was captured: ``fx`` (the result is a ``GraphModule``) or
            ``module`` (layers substituted into a copy that keeps the model's class).
        mode_reason: Why module mode was used.
        leaves: Submodules analyzed with hooks instead of traced, ``{name: reason}``.
        skipped: Layers left dense, ``{name: reason}`` (excluded by the config, no factored
            form cheaper than dense, kept dense by the allocator, not factorable...).
        curves: Per factored layer, the predicted error of its scheme at every candidate rank:
            ``{"scheme", "rank": [...], "error": [...]}`` (the rank is the last of a tucker2
            pair); the energy kept is ``1 - error``. Empty without spectra (``lrfx.load``).
        warnings: What the caller should look at (layers compressed to near-uselessness...).
        config: The settings of the call (a :class:`lrfx.CompressConfig` as a dict).
        pruned: Per pruned channel group (a plan's channel entries): ``layer`` (the entry's
            name), ``channels_before``, ``channels_after`` and ``members`` (what was sliced).
        latency: With a latency budget: ``dense_ms`` and ``compressed_ms`` (the two models timed
            side by side after the rewrite), ``ratio`` (measured), ``predicted_ms`` and
            ``predicted_ratio`` (the allocator's sum of measured layer times), ``threads``,
            ``inputs`` and ``environment`` (what the times depend on), with
            ``latency_batch_sizes`` also ``batches`` (the same per batch size) and
            ``mean_ratio`` (what the budget applies to); each layer row then has
            ``latency_before_ms`` / ``latency_after_ms`` (its dense and planned forms timed
            alone). Empty otherwise.
    """

    layers: tuple[Mapping[str, Any], ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    budget: Mapping[str, Any] = field(default_factory=dict)
    allocator: str = ""
    scheme: str = ""
    whitened: bool = False
    sequential: bool = False
    seconds: float = 0.0
    mode: str = "fx"
    mode_reason: str = ""
    leaves: Mapping[str, str] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    curves: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    latency: Mapping[str, Any] = field(default_factory=dict)
    pruned: tuple[Mapping[str, Any], ...] = ()

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.layers[i]

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator,
            "scheme": self.scheme,
            "whitened": self.whitened,
            "sequential": self.sequential,
            "budget": dict(self.budget),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": self.seconds,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "leaves": dict(self.leaves),
            "skipped": dict(self.skipped),
            "warnings": list(self.warnings),
            "config": dict(self.config),
            "latency": dict(self.latency),
            "layers": [dict(x) for x in self.layers],
            "curves": {k: dict(v) for k, v in self.curves.items()},
            "pruned": [dict(x) for x in self.pruned],
        }

    def table(self) -> str:
        """Per-layer lines and a totals line, as plain text."""
        cols = ["layer", "scheme", "rank", "MACs before", "MACs after", "error"]
        rows = [[str(x["layer"]), str(x["scheme"]), str(x["rank"]), f"{x['macs_before']:,}",
                 f"{x['macs_after']:,}",
                 "-" if x.get("error") is None else f"{x['error']:.4f}"] for x in self.layers]
        if self.sequential:
            cols.append("measured")
            for r, x in zip(rows, self.layers, strict=True):
                r.append("-" if x.get("output_error") is None else f"{x['output_error']:.4f}")
        if self.latency:
            cols += ["ms before", "ms after"]
            for r, x in zip(rows, self.layers, strict=True):
                for k in ("latency_before_ms", "latency_after_ms"):
                    r.append("-" if x.get(k) is None else f"{x[k]:.3f}")
        width = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

        def line(r: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(r, width, strict=True)))

        out = [line(cols)] + [line(r) for r in rows] if rows or not self.pruned else []
        if self.pruned:
            out += [f"channels of {r['layer']}: {r['channels_before']} -> {r['channels_after']}"
                    for r in self.pruned]
        if rows:
            out.append(f"error: {self.error_definition()}")
        if rows and self.sequential:
            out.append(f"measured: {MEASURED}")
        how = f"{self.allocator}, scheme {self.scheme}" if self.allocator else "plan"
        out.append(
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x); params "
            f"{self.params_before:,} -> {self.params_after:,}; "
            + (f"{len(self.pruned)} channel groups pruned; " if self.pruned else "")
            + f"{len(self.layers)} layers factored ({how}{', whitened' if self.whitened else ''}"
            f"{', sequential' if self.sequential else ''}) in {self.seconds:.1f} s"
        )
        if self.latency:
            out.append(self.latency_line())
        if self.mode == "module":
            out.append(f"captured in module mode ({self.mode_reason}): the factored layers were "
                       "substituted into a copy of the model, which keeps its class")
        out += [f"leaf {name}: {why}" for name, why in self.leaves.items()]
        if self.skipped:
            out.append(f"{len(self.skipped)} layer(s) left dense (the reasons: report.skipped, "
                       "report.md)")
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)

    def latency_line(self) -> str:
        """The measured latency in one line (empty without a latency budget)."""
        lat = self.latency
        if not lat:
            return ""
        per = "".join(f"; batch {b}: {v['ratio']:.3f}x" for b, v in lat.get("batches", {}).items())
        return (f"latency {lat['dense_ms']:.3f} ms -> {lat['compressed_ms']:.3f} ms measured "
                f"({lat['ratio']:.3f}x; predicted {lat.get('predicted_ratio', float('nan')):.3f}x)"
                f" at inputs {lat.get('inputs', '?')}, {lat.get('threads', '?')} threads{per}; "
                "ms before/after: each layer's dense and planned forms timed alone")

    def error_definition(self) -> str:
        """What the ``error`` column means, in one sentence."""
        if self.whitened:
            return ("predicted relative squared error of the layer's output on the calibration "
                    "data, ||Y - Y_r||^2 / ||Y||^2 (0 = exact, 1 = nothing kept)")
        return ("predicted relative squared error of the layer's weight, ||W - W_r||^2 / "
                "||W||^2 (0 = exact, 1 = nothing kept; no calibration data: weight error)")

    def write(self, directory: str | Path) -> list[Path]:
        """Write ``report.json``, a readable ``report.md`` and its figures into ``directory``.

        The Markdown has the totals, how the plan was made, what "error" means, the per-layer
        table (full names), the layers left dense and why, the warnings and the config; the
        figures (PNG, when matplotlib is installed) are MACs and parameters per layer before and
        after, the predicted error per factored layer, and each factored layer's error curve
        with its chosen rank.

        Returns:
            The files written.
        """
        from lrfx.report_files import write_report

        return write_report(self, Path(directory))
