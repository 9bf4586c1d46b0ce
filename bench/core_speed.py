"""Speed of the core path, as ratios measured side by side in one run (issue: core redesign).

    .venv/bin/python bench/core_speed.py                      # everything, ~4 min on 2 cores
    .venv/bin/python bench/core_speed.py --reps 5 --skip-baseline --skip-vgg

What it measures (torchvision models with random weights, seed 0, eval mode, float32, one
``randn(1, 3, 224, 224)`` input, ``torch.set_num_threads(--threads)``), each repetition
interleaving the contenders so that load on the machine hits them alike:

* **resnet50, the yardstick**: a plain ``torch.linalg.svd(w.reshape(out, -1),
  full_matrices=False)`` of every conv/linear weight, against
  ``lrfx.compress(resnet50, x, macs=0.5)`` (allocator ``lc``, ``scheme="auto"``: analyze +
  allocate + apply in one pipeline), with a per-stage breakdown (the ``lc`` share), and against
  the three public calls ``analyze`` + ``allocate`` + ``apply`` made separately;
* **before**: the same ``compress`` call of the code at ``--baseline`` (default: the commit
  before the redesign), run from a ``git archive`` of it in a subprocess that times itself;
* **vgg16 spectra**: the spectra pass (values only, as ``lrfx.analyze`` runs it) against the
  pre-redesign numerics (float64 QR + ``svdvals`` per unfolding, still
  ``lrfx.decompositions.singular_values``) on the same layers;
* **load vs compress** of resnet18: ``lrfx.load`` of a saved ``compress(macs=0.5)`` result
  against the ``compress`` itself, and whether the outputs are identical.

Writes ``bench/results/core_speed.json`` and ``core_speed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import lrfx
from lrfx.api import _refresh_layers  # noqa: F401  (imported to fail early if the API moved)
from lrfx.decompositions import singular_values
from lrfx.passes.analysis import (
    SpectraOptions,
    annotate_costs,
    compute_spectra,
    propagate_shapes,
)
from lrfx.passes.analysis.spectra import layer_unfoldings, layer_weight
from lrfx.pipeline import GraphPass, PassContext

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BASE_COMMIT = "43fb3ae"

_BASELINE_WORKER = r"""
import json, sys, time, torch, torchvision, lrfx
torch.set_num_threads(int(sys.argv[1])); torch.manual_seed(0)
m = torchvision.models.resnet50().eval(); x = torch.randn(1, 3, 224, 224)
lrfx.compress(m, x, macs=0.5)  # warm-up
out = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); lrfx.compress(m, x, macs=0.5); out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {
        "platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def svd_sweep(model: nn.Module) -> float:
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    t = time.perf_counter()
    for w in ws:
        torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    return time.perf_counter() - t


class StageTimer:
    """Times every pass run through ``GraphPass.__call__`` (and the allocation)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._orig = GraphPass.__call__
        self._alloc = lrfx.api.allocate
        self._trace = lrfx.api.trace

    def __enter__(self) -> StageTimer:
        timer = self

        def call(p: GraphPass[Any], gm: Any, ctx: Any = None) -> Any:
            t = time.perf_counter()
            try:
                return timer._orig(p, gm, ctx)
            finally:
                timer.times[p.name] = timer.times.get(p.name, 0.0) + time.perf_counter() - t

        def timed(name: str, fn: Any) -> Any:
            def run(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - t
            return run

        GraphPass.__call__ = call  # type: ignore[method-assign]
        lrfx.api.allocate = timed("allocate", self._alloc)  # type: ignore[assignment]
        lrfx.api.trace = timed("trace", self._trace)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        GraphPass.__call__ = self._orig  # type: ignore[method-assign]
        lrfx.api.allocate = self._alloc  # type: ignore[assignment]
        lrfx.api.trace = self._trace  # type: ignore[assignment]


def baseline_tree(rev: str, dest: Path) -> Path:
    """The package at ``rev`` laid out as an importable ``lrfx`` (passes/ as lrfx/passes)."""
    archive = dest / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev, "lrfx", "passes"],
                   cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "src", filter="data")
    shutil.move(str(dest / "src" / "passes"), str(dest / "src" / "lrfx" / "passes"))
    return dest / "src"


def legacy_spectra_seconds(gm: Any) -> float:
    """The pre-redesign spectra numerics on the layers of an analyzed graph module."""
    t = time.perf_counter()
    done = set()
    for node in gm.graph.nodes:
        facts = node.meta.get("lrfx")
        for layer in getattr(facts, "layers", ()):
            w = layer_weight(gm, layer) if layer.factorable else None
            if w is None:
                continue
            groups = int(getattr(layer.geometry, "groups", 1))
            for u in layer_unfoldings(layer):
                key = (layer.weight, layer.weight_rows, u)
                if key not in done:
                    done.add(key)
                    singular_values(w, u, groups)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default=BASE_COMMIT, help="git revision of the 'before' code")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "core_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {"machine": machine(), "reps": args.reps}

    # --- resnet50: yardstick, compress (with stages), the three calls, the baseline ------------
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    lrfx.compress(model, x, macs=0.5)  # warm-up (imports, first-call allocations)
    base_dir = None
    if not args.skip_baseline:
        base_dir = baseline_tree(args.baseline, Path(tempfile.mkdtemp(prefix="lrfx-base-")))
    rows: dict[str, list[float]] = {"svd_sweep": [], "compress": [], "three_calls": [],
                                    "baseline_compress": []}
    stages: list[dict[str, float]] = []
    for rep in range(args.reps):
        rows["svd_sweep"].append(svd_sweep(model))
        with StageTimer() as st:
            t = time.perf_counter()
            gm = lrfx.compress(model, x, macs=0.5)
            rows["compress"].append(time.perf_counter() - t)
        stages.append(st.times)
        t = time.perf_counter()
        a = lrfx.analyze(model, x)
        plan, _ = lrfx.allocate(a, macs=0.5)
        lrfx.apply(model, plan, x)
        rows["three_calls"].append(time.perf_counter() - t)
        if base_dir is not None:
            env = {**os.environ, "PYTHONPATH": str(base_dir)}
            res = subprocess.run([sys.executable, "-c", _BASELINE_WORKER, str(args.threads), "1"],
                                 env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
            if res.returncode != 0:
                raise SystemExit(f"baseline failed:\n{res.stderr[-2000:]}")
            rows["baseline_compress"].extend(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in rows.items() if v),
              flush=True)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    stage_med = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]}
    report = gm.meta["lrfx"].report
    out["resnet50"] = {
        "seconds": rows,
        "median": med,
        "compress_over_svd_sweep": med["compress"] / med["svd_sweep"],
        "three_calls_over_svd_sweep": med["three_calls"] / med["svd_sweep"],
        "stages_median": stage_med,
        "lc_share_of_compress": stage_med.get("allocate", 0.0) / med["compress"],
        "macs_ratio": report.macs_ratio,
        "layers_factored": len(report.layers),
    }
    if "baseline_compress" in med:
        out["resnet50"]["baseline_commit"] = args.baseline
        out["resnet50"]["speedup_over_baseline"] = med["baseline_compress"] / med["compress"]
        out["resnet50"]["baseline_over_svd_sweep"] = med["baseline_compress"] / med["svd_sweep"]

    # --- vgg16 spectra: new pass vs the pre-redesign numerics ----------------------------------
    if not args.skip_vgg:
        vgg = torchvision.models.vgg16().eval()
        gm = lrfx.trace(vgg)
        ctx = PassContext(example_inputs=(x,))
        propagate_shapes(gm, ctx)
        annotate_costs(gm, ctx)
        new_t, old_t = [], []
        for _ in range(max(1, args.reps - 1)):
            lrfx.mark_weights_changed(gm)
            annotate_costs(gm, ctx)
            t = time.perf_counter()
            compute_spectra(gm, PassContext(options=[SpectraOptions()]))
            new_t.append(time.perf_counter() - t)
            old_t.append(legacy_spectra_seconds(gm))
            print(f"vgg16 spectra: new {new_t[-1]:.2f}s, before {old_t[-1]:.2f}s", flush=True)
        out["vgg16_spectra"] = {
            "seconds_new": new_t, "seconds_before": old_t,
            "speedup": statistics.median(old_t) / statistics.median(new_t),
        }

    # --- load vs compress, resnet18 ------------------------------------------------------------
    r18 = torchvision.models.resnet18().eval()
    comp_t, load_t = [], []
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            t = time.perf_counter()
            gm = lrfx.compress(r18, x, macs=0.5)
            comp_t.append(time.perf_counter() - t)
            lrfx.save(gm, tmp)
            fresh = torchvision.models.resnet18()  # built outside the timing
            t = time.perf_counter()
            back = lrfx.load(tmp, fresh, x)
            load_t.append(time.perf_counter() - t)
            with torch.no_grad():
                same &= bool(torch.equal(back.eval()(x), gm.eval()(x)))
    out["resnet18_load"] = {
        "seconds_compress": comp_t, "seconds_load": load_t,
        "load_over_compress": statistics.median(load_t) / statistics.median(comp_t),
        "outputs_identical": same,
    }

    out["machine"]["load_average_end"] = os.getloadavg()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["resnet50"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = ["svd_sweep", "compress", "three_calls"]
    labels = ["plain SVD sweep\n(yardstick)", "lrfx.compress", "analyze+allocate\n+apply"]
    if "baseline_compress" in r["median"]:
        names.append("baseline_compress")
        labels.append(f"compress before\n({r.get('baseline_commit', '')})")
    vals = [r["median"][n] for n in names]
    bars = ax1.bar(labels, vals, color=["#888", "#2a7", "#5ad", "#d55"][: len(vals)])
    for b, v in zip(bars, vals, strict=True):
        ax1.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}s\n({v / vals[0]:.2f}x)",
                 ha="center", va="bottom", fontsize=8)
    ax1.axhline(0.5 * vals[0], color="#2a7", ls="--", lw=1)
    ax1.text(len(vals) - 0.5, 0.5 * vals[0], "target: 0.5x sweep", color="#2a7", fontsize=8,
             ha="right", va="bottom")
    ax1.tick_params(axis="x", labelsize=8)
    ax1.set_ylabel("seconds (median)")
    ax1.set_title(f"resnet50, macs=0.5, {out['machine']['threads']} threads")
    st = r["stages_median"]
    keys = sorted(st, key=lambda k: -st[k])
    ax2.barh(keys, [st[k] for k in keys], color="#2a7")
    ax2.set_xlabel("seconds inside lrfx.compress (median)")
    ax2.set_title("where compress spends its time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
