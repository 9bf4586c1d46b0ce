"""How long the singular-value spectra take: ``lrfx.analyze(spectra=True)`` vs ``spectra=False``.

For resnet50, vit_b_16 and vgg16 (random weights, seed 0, eval mode, input 1x3x224x224) this
times ``lrfx.analyze(model, x, spectra=True)`` and ``lrfx.analyze(model, x, spectra=False)``:
one warm-up call of each, then the best of ``--repeat`` (3) calls of each, alternating. The
spectra part is the difference of the two bests (tracing, shape propagation and MAC counting
are the same in both). It also records how many layers are factorable, how many distinct spectra
were computed (one per weight and unfolding: a layer with several schemes has several, e.g. a 3x3
conv has ``channel``, ``spatial`` and ``mode1``) and how many singular values they hold.

Run (from the repository root)::

    .venv/bin/python bench/spectra_time.py
    .venv/bin/python bench/spectra_time.py --models resnet50 --repeat 5
    .venv/bin/python bench/spectra_time.py --models vgg16 --breakdown   # where the time goes

Writes ``bench/results/spectra_time.json`` (with ``torch.get_num_threads()`` and machine info)
and ``bench/results/spectra_time.png``; prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

import lrfx

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "spectra_time.json"
DEFAULT_MODELS = ("resnet50", "vit_b_16", "vgg16")


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def spectra_stats(a: lrfx.Analysis) -> dict[str, Any]:
    """Factorable layers, distinct spectra (by identity: shared calls share one) and their size."""
    distinct: dict[int, lrfx.Spectrum] = {}
    by_unfolding: dict[str, int] = {}
    for layer in a.layers:
        for u, sp in layer.spectra.items():
            if id(sp) not in distinct:
                distinct[id(sp)] = sp
                by_unfolding[u] = by_unfolding.get(u, 0) + 1
    return {
        "layers": len(a.layers),
        "factorable_layers": len(a.factorable),
        "distinct_spectra": len(distinct),
        "spectra_by_unfolding": by_unfolding,
        "singular_values": sum(sp.values.numel() for sp in distinct.values()),
        "largest_unfolding_max_rank": max((sp.max_rank for sp in distinct.values()), default=0),
    }


def bench_model(name: str, repeat: int) -> dict[str, Any]:
    load = list(os.getloadavg())
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    runs: dict[bool, list[float]] = {True: [], False: []}
    result: dict[bool, lrfx.Analysis] = {}

    def call(spectra: bool) -> None:
        result[spectra] = lrfx.analyze(model, x, spectra=spectra, progress=False)

    with torch.no_grad():
        warm = {s: _time(lambda s=s: call(s)) for s in (False, True)}
        for _ in range(repeat):
            for s in (False, True):  # alternate so that noise hits both alike
                runs[s].append(_time(lambda s=s: call(s)))
    with_s, without_s = min(runs[True]), min(runs[False])
    a = result[True]
    rec = {
        "model": name,
        "load_average_before": load,
        "input_shape": [1, 3, 224, 224],
        "params": a.total_params,
        "total_macs": a.total_macs,
        "spectra_true_best_s": with_s,
        "spectra_false_best_s": without_s,
        "spectra_part_s": with_s - without_s,
        "spectra_true_runs_s": runs[True],
        "spectra_false_runs_s": runs[False],
        "warmup_s": {"spectra_false": warm[False], "spectra_true": warm[True]},
        **spectra_stats(a),
    }
    if result[False].total_macs != a.total_macs:
        raise RuntimeError(f"{name}: MACs differ between spectra=True and spectra=False")
    return rec


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lrfx": lrfx.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # the machine is shared: the 1/5/15-minute load average shows how noisy the timings are
        "load_average_at_write": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return info


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.8 * len(records) + 1.4))
    y = list(range(len(records)))
    h = 0.38
    without = [r["spectra_false_best_s"] for r in records]
    with_s = [r["spectra_true_best_s"] for r in records]
    ax.barh([i - h / 2 for i in y], without, height=h, label="analyze(spectra=False)")
    ax.barh([i + h / 2 for i in y], with_s, height=h, label="analyze(spectra=True)")
    for i, r in enumerate(records):
        ax.text(
            with_s[i] * 1.1,
            i + h / 2,
            f"{with_s[i]:.2f} s ({r['distinct_spectra']} spectra)",
            va="center",
            fontsize=7,
        )
        ax.text(without[i] * 1.1, i - h / 2, f"{without[i]:.2f} s", va="center", fontsize=7)
    ax.set_yticks(y, [r["model"] for r in records])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(without) / 2, max(with_s) * 8)
    ax.set_xlabel(
        f"seconds (log), best of {len(records[0]['spectra_true_runs_s'])}, "
        f"{torch.get_num_threads()} threads, 1x3x224x224"
    )
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def breakdown(name: str, top: int = 10) -> list[dict[str, Any]]:
    """Time each distinct spectrum once (the slowest ``top``), to see where the time goes."""
    from lrfx.decompositions import singular_values
    from lrfx.facts import get_node_facts
    from lrfx.passes.analysis.spectra import _unfoldings, layer_weight

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    gm = lrfx.trace(model)
    lrfx.run_analysis(gm, x, spectra=False)
    seen: set[tuple[Any, ...]] = set()
    out = []
    for node in gm.graph.nodes:
        facts = get_node_facts(node)
        for layer in facts.layers if facts else ():
            w = layer_weight(gm, layer) if layer.factorable else None
            if w is None:
                continue
            groups = getattr(layer.geometry, "groups", 1)
            for u in _unfoldings(layer):
                key = (layer.weight, layer.weight_rows, u)
                if key in seen:
                    continue
                seen.add(key)
                t = time.perf_counter()
                sv = singular_values(w, u, groups)
                out.append(
                    {
                        "layer": layer.name,
                        "weight_shape": list(w.shape),
                        "unfolding": u,
                        "groups": groups,
                        "k": sv.shape[1],
                        "seconds": time.perf_counter() - t,
                    }
                )
    out.sort(key=lambda r: -r["seconds"])
    total = sum(r["seconds"] for r in out)
    return [{"total_s": total, "spectra": len(out)}, *out[:top]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated names")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each mode (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each spectrum once and record the 10 slowest per model",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    records = []
    for name in (m.strip() for m in args.models.split(",") if m.strip()):
        rec = bench_model(name, args.repeat)
        gc.collect()  # the model and its analyses are gone with bench_model's frame
        if args.breakdown:
            total, *slowest = breakdown(name)
            rec["breakdown_total_s"] = total["total_s"]
            rec["breakdown_slowest"] = slowest
            gc.collect()
        records.append(rec)
        print(
            f"{name}: spectra=True {rec['spectra_true_best_s']:.3f} s, "
            f"spectra=False {rec['spectra_false_best_s']:.3f} s, "
            f"spectra part {rec['spectra_part_s']:.3f} s; "
            f"{rec['factorable_layers']} factorable layers, "
            f"{rec['distinct_spectra']} distinct spectra",
            flush=True,
        )

    doc = {
        "benchmark": "spectra_time",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "torch_num_threads": torch.get_num_threads(),
        "method": f"one warm-up of each mode, then best of {args.repeat} alternating runs; "
        "spectra part = best(spectra=True) - best(spectra=False)",
        "models": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(records, args.out.with_suffix(".png"))

    head = (
        f"{'model':10} {'with s':>8} {'without s':>9} {'spectra s':>9} {'factorable':>10} "
        f"{'spectra':>7} {'sing. values':>12}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in records:
        print(
            f"{r['model']:10} {r['spectra_true_best_s']:8.3f} {r['spectra_false_best_s']:9.3f} "
            f"{r['spectra_part_s']:9.3f} {r['factorable_layers']:10d} "
            f"{r['distinct_spectra']:7d} {r['singular_values']:12d}"
        )
    print(f"\ntorch threads: {torch.get_num_threads()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
