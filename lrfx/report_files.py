"""A compression report as files a person reads: ``report.md`` and its PNG figures.

Called by :meth:`lrfx.CompressionReport.write` (and by ``lrfx compress`` / ``lrfx apply``, which
write into the output folder). matplotlib is imported here, lazily, with the Agg backend;
without it the Markdown is written alone and says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrfx.report import MEASURED

if TYPE_CHECKING:
    from lrfx.report import CompressionReport

__all__ = ["CURVES_PER_FIGURE", "write_report"]

#: Error curves per PNG (a 6 x 4 grid); more factored layers spill into further files.
CURVES_PER_FIGURE = 24


def _rank_text(rank: Any) -> str:
    return "x".join(map(str, rank)) if isinstance(rank, (list, tuple)) else str(rank)


def _main_rank(rank: Any) -> int:
    return int(rank[-1]) if isinstance(rank, (list, tuple)) else int(rank)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _figures(report: CompressionReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    rows = list(report.layers)
    if rows:
        names = [r["layer"] for r in rows]
        height = max(3.0, 0.22 * len(rows) + 1.5)
        label = 0.065 * max(len(n) for n in names)  # inches the layer names need
        fig, axes = plt.subplots(1, 2, figsize=(11 + label, height), sharey=True)
        y = list(range(len(rows)))
        for ax, key, title in ((axes[0], "macs", "MACs"), (axes[1], "params", "parameters")):
            ax.barh([v + 0.2 for v in y], [r[f"{key}_before"] for r in rows], height=0.4,
                    label="before", color="#bbbbbb")
            ax.barh([v - 0.2 for v in y], [r[f"{key}_after"] for r in rows], height=0.4,
                    label="after", color="#1f77b4")
            ax.set_title(f"{title} per factored layer")
            ax.set_xlabel(title)
            ax.legend(loc="lower right")
        axes[0].set_yticks(y, names, fontsize=7)
        axes[0].invert_yaxis()
        fig.tight_layout()
        path = out / "report_costs.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        errs = [(r["layer"], r["error"]) for r in rows if r.get("error") is not None]
        if errs:
            label = 0.065 * max(len(n) for n, _ in errs)
            fig, ax = plt.subplots(figsize=(6 + label, max(3.0, 0.22 * len(errs) + 1.5)))
            ax.barh(range(len(errs)), [e for _, e in errs], color="#d62728")
            ax.set_yticks(range(len(errs)), [n for n, _ in errs], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, max(1e-6, max(e for _, e in errs)) * 1.1)
            ax.set_xlabel("predicted relative error")
            ax.set_title("predicted error per factored layer")
            fig.tight_layout()
            path = out / "report_error.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)

    curves = [(r, report.curves[r["layer"]]) for r in rows if r["layer"] in report.curves]
    for page in range(math.ceil(len(curves) / CURVES_PER_FIGURE)):
        chunk = curves[page * CURVES_PER_FIGURE:(page + 1) * CURVES_PER_FIGURE]
        cols = min(4, len(chunk))
        nrows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat[len(chunk):]:
            ax.axis("off")
        for ax, (row, curve) in zip(axes.flat, chunk, strict=False):
            ranks, errors = curve["rank"], curve["error"]
            ax.plot(ranks, [1 - e for e in errors], color="#1f77b4", lw=1.2)
            chosen = _main_rank(row["rank"])
            if chosen in ranks:
                kept = 1 - errors[ranks.index(chosen)]
                ax.axvline(chosen, color="#d62728", lw=0.8, ls="--")
                ax.plot([chosen], [kept], "o", color="#d62728", ms=4)
                ax.set_title(f"{row['layer']}\n{row['scheme']} rank {_rank_text(row['rank'])}: "
                             f"{kept:.1%} kept", fontsize=7)
            else:
                ax.set_title(f"{row['layer']}\n{row['scheme']} rank {_rank_text(row['rank'])}",
                             fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("rank", fontsize=7)
            ax.set_ylabel("1 - error", fontsize=7)
        fig.tight_layout()
        path = out / f"report_curves_{page + 1}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(str(c)) for c in r) + " |" for r in rows]
    return lines


def _markdown(report: CompressionReport, figures: Sequence[Path], note: str) -> str:
    def ratio(a: int, b: int) -> str:
        return f"{a / b:.3f}x" if b else "-"

    md = ["# lrfx compression report", ""]
    totals = [
        ["MACs", f"{report.macs_before:,}", f"{report.macs_after:,}",
         ratio(report.macs_after, report.macs_before)],
        ["parameters", f"{report.params_before:,}", f"{report.params_after:,}",
         ratio(report.params_after, report.params_before)],
    ]
    lat = report.latency
    if lat:
        totals.append(["latency (ms, measured)", f"{lat['dense_ms']:.3f}",
                       f"{lat['compressed_ms']:.3f}", f"{lat['ratio']:.3f}x"])
    md += _table(["", "before", "after", "ratio"], totals)
    budget = report.budget
    how = [f"- factored layers: {len(report.layers)}; left dense: {len(report.skipped)}"]
    if budget and budget.get("metric") == "latency":
        how.append(f"- budget: latency {budget.get('fraction', 0):.3f} of the dense model's "
                   f"measured latency; predicted {lat.get('predicted_ratio', 0):.3f}x, measured "
                   f"{lat.get('ratio', 0):.3f}x at inputs {lat.get('inputs', '?')}, "
                   f"{lat.get('threads', '?')} threads ({lat.get('environment', '')})")
    elif budget:
        how.append(f"- budget: {budget.get('metric')} {budget.get('fraction', 0):.3f} of the "
                   f"model ({budget.get('target', 0):,})")
    if report.allocator:
        how.append(f"- allocator: {report.allocator}; scheme: {report.scheme}; data-aware "
                   f"(whitened): {'yes' if report.whitened else 'no'}; sequential calibration: "
                   f"{'yes' if report.sequential else 'no'}")
    how.append(f"- capture: {report.mode}" + (f" ({report.mode_reason})"
                                                if report.mode_reason else ""))
    how.append(f"- time: {report.seconds:.1f} s")
    md += ["", *how, ""]
    md += [f"**error**: {report.error_definition()}.", ""]
    if report.sequential:
        md += [f"**measured**: {MEASURED}; **fit**: how the factors were chosen (joint: both "
               "factors in closed form for the compressed layer's inputs; last: the last piece "
               "refit; spectra: one-shot factors, and why).", ""]
    if report.warnings:
        md += ["## Warnings", "", *(f"- {_md_escape(w)}" for w in report.warnings), ""]
    if note:
        md += [f"_{note}_", ""]
    for f in figures:
        md += [f"![{f.stem}]({f.name})", ""]
    md += ["## Factored layers", ""] + ([] if report.layers else ["none", ""])
    extra = ["measured", "fit"] if report.sequential else []
    timed = ["ms before", "ms after"] if lat else []

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    md += _table(["layer", "scheme", "rank", "MACs before", "MACs after", "params before",
                  "params after", "error", *extra, *timed],
                 [[f"`{r['layer']}`", r["scheme"], _rank_text(r["rank"]),
                   f"{r['macs_before']:,}", f"{r['macs_after']:,}", f"{r['params_before']:,}",
                   f"{r['params_after']:,}",
                   "-" if r.get("error") is None else f"{r['error']:.4f}",
                   *(["-" if r.get("output_error") is None else f"{r['output_error']:.4f}",
                      str(r.get("fit") or "-")] if extra else []),
                   *([ms(r.get("latency_before_ms")), ms(r.get("latency_after_ms"))]
                     if timed else [])]
                  for r in report.layers])
    if timed:
        md += ["", "**ms before / after**: each layer's dense and planned forms timed alone at "
               "its input shape (what the allocator added up)."]
    if report.pruned:
        md += ["", "## Pruned channel groups", ""]
        md += _table(["group", "channels", "what was sliced"],
                     [[f"`{r['layer']}`", f"{r['channels_before']} → {r['channels_after']}",
                       _md_escape(", ".join(r.get("members", [])))] for r in report.pruned])
    md += ["", "## Layers left dense", ""]
    if report.skipped:
        md += _table(["layer", "why"], [[f"`{k}`", v] for k, v in report.skipped.items()])
    else:
        md += ["none"]
    if report.leaves:
        md += ["", "## Leaves (analyzed with hooks, not traced)", ""]
        md += _table(["module", "why"], [[f"`{k}`", v] for k, v in report.leaves.items()])
    if report.config:
        md += ["", "## Config", "", "```json", json.dumps(dict(report.config), indent=2,
                                                           default=str), "```"]
    return "\n".join(md) + "\n"


def write_report(report: CompressionReport, out: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``report_*.png`` into
    ``out`` (created if needed); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    note = ""
    try:
        figures = _figures(report, out)
    except ImportError:
        figures, note = [], "matplotlib is not installed: no figures (pip install matplotlib)"
    (out / "report.md").write_text(_markdown(report, figures, note))
    return [out / "report.json", out / "report.md", *figures]

