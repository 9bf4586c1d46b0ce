"""Latency-true compression (issue 11): MACs plans vs latency plans vs a plain channel anchor,
measured side by side.

    .venv/bin/python bench/latency.py [--models resnet50,mobilenet_v2,vit_b_16,resnet20]
                                      [--batches 1,32] [--threads 2] [--onnx]

For every model and batch size ``b`` (inputs of batch ``b``; 224 px for torchvision, 28 px for the
Fashion-MNIST ResNet-20):

* ``macs``: ``lrfx.compress(model, x, macs=0.5)`` (the MACs plan; the same at every batch size);
* ``anchor``: the plain channel-wise factorization, every layer at the same fraction of its rank
  (``scheme="channel", allocator="uniform", macs=0.59``);
* ``macsM`` (ResNet-20 only, ``--macs-sweep``): smaller MACs plans, to compare accuracy with a
  latency plan at equal measured latency;
* ``latency=macs@b``: ``lrfx.compress(model, x_b, latency=r)`` where ``r`` is the latency ratio
  the MACs plan measured at batch ``b`` (equal measured latency: compare MACs and accuracy;
  skipped where the MACs plan is not faster than dense);
* ``latencyL@b``: ``latency=L`` for each ``L`` of ``--latency-budgets`` (0.5 is the issue's
  target); a budget the machine cannot reach is recorded with lrfx's error message;
* ``latencyL@1+32``: ``latency=L, latency_batch_sizes=(1, 32)``: one plan for every batch size
  (no layer slower at any of them; the budget applies to the mean ratio).

Every plan is then timed against the dense model at *every* batch size, interleaved in one
:func:`lrfx.latency.time_models` call per batch size (medians), so a plan made for batch 1 is also
checked at batch 32 and vice versa ("never slower than dense at any batch size tested").
Latency efficiency = (1 - latency ratio) / (1 - MAC ratio). The torchvision models have random
weights (nothing is downloaded): their latencies are real, their plans follow random spectra.
The ResNet-20 is the committed Fashion-MNIST checkpoint, compressed with 1,024 calibration
images (sequential calibration, BN recalibrated, no fine-tuning) and scored on the 10k test set.
``--onnx``: resnet50's plans are also exported to ONNX and timed in onnxruntime the same way.

Layer timings are cached in ``$LRFX_CACHE_DIR`` (default here: ``bench/results/.latency-cache``,
not committed). Writes ``bench/results/latency.json`` (after every step) and ``latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "latency.json"
os.environ.setdefault("LRFX_CACHE_DIR", str(ROOT / "results" / ".latency-cache"))

import lrfx  # noqa: E402
from lrfx.errors import BudgetInfeasibleError  # noqa: E402
from lrfx.latency import Timed, WallTimer, time_models  # noqa: E402

sys.path.insert(0, str(ROOT))


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "resnet20":
        from train_fmnist import build

        m = build("resnet20")
        m.load_state_dict(torch.load(ROOT / "checkpoints" / "resnet20_fmnist.pt",
                                     weights_only=True))
        return m.eval(), (1, 28, 28)
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval(), (3, 224, 224)


def _efficiency(mac: float, lat: float) -> float | None:
    return None if mac >= 1 else (1 - lat) / (1 - mac)


def _describe(gm: torch.nn.Module) -> dict[str, Any]:
    facts = lrfx.facts_of(gm)
    r, plan = facts.report, facts.plan
    out: dict[str, Any] = {"macs_ratio": r.macs_ratio,
                           "params_ratio": r.params_after / r.params_before,
                           "layers_factored": len(r), "seconds": round(r.seconds, 1)}
    if r.latency:
        out.update(predicted_ratio=r.latency.get("predicted_ratio"),
                   measured_at_build=r.latency.get("ratio"),
                   tries=plan.settings.get("latency_tries"),
                   left_dense_slower=sum("latency: " in v for v in r.skipped.values()))
    return out


def _profile(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Where the dense model's time goes: its conv/linear layers timed alone, and the rest."""
    p = lrfx.profile_latency(model, x)
    top = sorted(p.layers, key=lambda r: -r["ms"])[:5]
    return {"model_ms": p.model_ms, "layers_ms": p.layers_ms,
            "rest_share": max(0.0, 1 - p.layers_ms / p.model_ms),
            "slowest": [{k: r[k] for k in ("layer", "ms", "gmacs_per_s")} for r in top]}


def _onnx(models: dict[str, torch.nn.Module], x: torch.Tensor, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            path = Path(tmp) / f"{name}.onnx"
            lrfx.export(m, path, x, format="onnx")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}

            def make(sess: Any = sess, feed: dict = feed) -> Any:
                return lambda: sess.run(None, feed)

            jobs.append(Timed(f"onnx:{name}", make))
        times = WallTimer(warmup=2, min_repeats=7, max_repeats=30, time_cap=4.0)(jobs)
    return dict(zip(models, times, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16,resnet20")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="also time resnet50 in onnxruntime")
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--latency-budgets", default="0.5,0.7,0.9")
    ap.add_argument("--macs-sweep", default="0.3,0.2,0.1",
                    help="extra MACs plans for the model scored on real data (resnet20)")
    ap.add_argument("--profile-only", action="store_true",
                    help="only (re)measure where the time goes (lrfx.profile_latency) and merge "
                    "it into the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.update({"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                    "threads": args.threads, "torch": torch.__version__,
                    "batches": batches, "load_average_start": list(os.getloadavg())})
    results.setdefault("models", {})
    for name in args.models.split(","):
        t_model = time.perf_counter()
        model, shape = _model(name)
        xs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
              for b in batches}
        cal = acc = None
        if name == "resnet20":
            from train_fmnist import accuracy

            from lrfx.contrib.data import load_fashion_mnist

            xtr, _ = load_fashion_mnist("train")
            xte, yte = load_fashion_mnist("test")
            idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
            idx = idx[:args.calibration]
            cal = [xtr[idx[i:i + 128]] for i in range(0, args.calibration, 128)]
            xs = {b: xte[:b].clone() for b in batches}

            def acc(m: torch.nn.Module, xte: torch.Tensor = xte,
                    yte: torch.Tensor = yte) -> float:
                return accuracy(m, xte, yte)

        profiles = {str(b): _profile(model, xs[b]) for b in batches}
        if args.profile_only:
            results["models"].setdefault(name, {})["profile"] = profiles
            OUT.write_text(json.dumps(results, indent=1) + "\n")
            continue
        res: dict[str, Any] = {"plans": {}, "timings": {}, "profile": profiles}
        results["models"][name] = res
        kw: dict[str, Any] = {} if cal is None else {"calibration": cal}
        plans: dict[str, torch.nn.Module] = {}
        b0 = batches[0]
        print(f"{name}: building plans", flush=True)
        plans["macs"] = lrfx.compress(model, xs[b0], macs=0.5, **kw)
        plans["anchor"] = lrfx.compress(model, xs[b0], macs=0.59, scheme="channel",
                                        allocator="uniform", **kw)
        if acc is not None:  # smaller MACs plans: which MACs budget reaches a latency plan's time
            for m in args.macs_sweep.split(","):
                plans[f"macs{m}"] = lrfx.compress(model, xs[b0], macs=float(m), **kw)
        for b in batches:
            r = time_models({"dense": model, "macs": plans["macs"]}, xs[b])
            ratio = r["macs"] / r["dense"]
            res["plans"][f"macs ratio measured at batch {b}"] = ratio
            budgets = [(f"latency=macs@{b}", ratio)] + [
                (f"latency{v}@{b}", float(v)) for v in args.latency_budgets.split(",")]
            for label, budget in budgets:
                if budget >= 1:
                    res["plans"][label] = {"skipped": f"the MACs plan is not faster ({budget:.3f})"}
                    continue
                try:
                    plans[label] = lrfx.compress(model, xs[b], latency=min(budget, 1.0), **kw)
                except BudgetInfeasibleError as e:
                    res["plans"][label] = {"infeasible": str(e)}
                    print(f"  {label}: infeasible: {e}", flush=True)
        if len(batches) > 1:
            both = "+".join(str(b) for b in batches)
            for v in args.latency_budgets.split(","):
                label = f"latency{v}@{both}"
                try:
                    plans[label] = lrfx.compress(model, xs[b0], latency=float(v),
                                                 latency_batch_sizes=batches, **kw)
                except BudgetInfeasibleError as e:
                    res["plans"][label] = {"infeasible": str(e)}
                    print(f"  {label}: infeasible: {e}", flush=True)
        for label, gm in plans.items():
            d = _describe(gm)
            if acc is not None:
                d["accuracy"] = acc(gm)
            res["plans"][label] = d
            print(f"  {label}: {d}", flush=True)
        if acc is not None:
            res["dense_accuracy"] = acc(model)
        for b in batches:
            t = time_models({"dense": model, **plans}, xs[b])
            res["timings"][str(b)] = {
                label: {"ms": 1e3 * t[label], "latency_ratio": t[label] / t["dense"],
                        "macs_ratio": lrfx.facts_of(plans[label]).report.macs_ratio,
                        "efficiency": _efficiency(
                            lrfx.facts_of(plans[label]).report.macs_ratio,
                            t[label] / t["dense"])}
                for label in plans}
            res["timings"][str(b)]["dense_ms"] = 1e3 * t["dense"]
            print(f"  batch {b}: " + ", ".join(
                f"{k} {v['latency_ratio']:.3f}" for k, v in res["timings"][str(b)].items()
                if isinstance(v, dict)), flush=True)
            if args.onnx and name == "resnet50":
                o = _onnx({"dense": model, **plans}, xs[b], args.threads)
                res.setdefault("onnxruntime", {})[str(b)] = {
                    label: o[label] / o["dense"] for label in plans} | {
                    "dense_ms": 1e3 * o["dense"]}
                print(f"  onnxruntime batch {b}: {res['onnxruntime'][str(b)]}", flush=True)
        res["wall_seconds"] = round(time.perf_counter() - t_model)
        results["load_average_end"] = list(os.getloadavg())
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    if not args.profile_only:
        plot(results)


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    batches = [str(b) for b in results["batches"]]
    fig, axes = plt.subplots(len(batches), len(models), squeeze=False,
                             figsize=(4.2 * len(models), 3.6 * len(batches)))
    for i, b in enumerate(batches):
        for j, name in enumerate(models):
            ax = axes[i][j]
            t = results["models"][name]["timings"].get(b, {})
            for label, v in t.items():
                if not isinstance(v, dict):
                    continue
                ax.scatter(v["macs_ratio"], v["latency_ratio"], s=30,
                           marker="o" if label.startswith("latency") else "s")
                ax.annotate(label, (v["macs_ratio"], v["latency_ratio"]), fontsize=7)
            ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
            ax.axhline(1.0, color="red", lw=0.6)
            ax.set_xlim(0, 1.05)
            ax.set_ylim(0, 1.25)
            ax.set_title(f"{name}, batch {b}", fontsize=9)
            ax.set_xlabel("MAC ratio")
            ax.set_ylabel("measured latency ratio")
    fig.suptitle(f"lrfx latency plans vs MACs plans ({results['threads']} threads, "
                 f"torch {results['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
