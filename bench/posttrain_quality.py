"""Post-training quality without fine-tuning (issue 10): plain SVD, whitened (one-shot),
sequential calibration, and sequential + loss-aware allocation, side by side.

    .venv/bin/python bench/posttrain_quality.py [--models resnet20,vgg_small] [--budgets 0.7,0.3]

Every run: ``lrfx.compress(model, macs=budget, allocator="lc", scheme="auto")`` of the committed
Fashion-MNIST checkpoints (``bench/checkpoints``), 1,024 calibration images (8 batches of 128,
a fixed random subset of the training set), BatchNorm recalibrated on them, no fine-tuning,
accuracy on the full 10,000-image test set. Methods:

* ``plain``: no calibration in the factorization (weight-space SVD), BN recalibrated after;
* ``whitened``: data-aware (SVD-LLM) factors from the original model's statistics
  (``sequential=False``);
* ``sequential``: the default — each layer fitted to the compressed prefix's inputs;
* ``seq+measured`` / ``seq+fisher`` / ``seq+output``: sequential, with loss-aware allocation
  (``sensitivity=``); fisher and output only at the smallest budget.

Writes ``bench/results/posttrain_quality.json`` (after every run) and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import lrfx
from lrfx.contrib.data import load_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fmnist import accuracy, build

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "posttrain_quality.json"
METHODS = {
    "plain": {},
    "whitened": {"sequential": False},
    "sequential": {},
    "seq+measured": {"sensitivity": "measured"},
    "seq+fisher": {"sensitivity": "fisher"},
    "seq+output": {"sensitivity": "output"},
}
SMALLEST_ONLY = ("seq+fisher", "seq+output")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        res = results["models"][name]
        ax.axhline(res["dense_acc"], color="k", ls="--", lw=1, label="dense")
        for method in METHODS:
            pts = sorted((r["macs_fraction"], r["acc"]) for r in res["runs"]
                         if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_title(f"{name}, Fashion-MNIST, no fine-tuning (lc, auto)")
        ax.set_xlabel("MACs kept (fraction)")
        ax.set_ylabel("test accuracy (%), 10k images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet20,vgg_small")
    ap.add_argument("--budgets", default="0.7,0.5,0.3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    xtr, _ = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:args.calibration]
    cal = [xtr[idx[i:i + 128]] for i in range(0, args.calibration, 128)]
    results: dict = {"machine": f"{platform.machine()}, {args.threads} threads",
                     "torch": torch.__version__, "calibration_images": args.calibration,
                     "test_images": len(xte), "allocator": "lc", "scheme": "auto",
                     "load_average": list(os.getloadavg()), "models": {}}
    for name in args.models.split(","):
        model = build(name)
        model.load_state_dict(torch.load(ROOT / "checkpoints" / f"{name}_fmnist.pt",
                                         weights_only=True))
        model.eval()
        res = results["models"][name] = {"dense_acc": accuracy(model, xte, yte), "runs": []}
        print(f"{name}: dense {res['dense_acc']:.2f}", flush=True)
        for budget in budgets:
            for method in methods:
                if method in SMALLEST_ONLY and budget != min(budgets):
                    continue
                t0 = time.perf_counter()
                if method == "plain":
                    gm = lrfx.compress(model, xte[:1], macs=budget)
                    lrfx.recalibrate_bn(gm, cal)
                else:
                    gm = lrfx.compress(model, xte[:1], macs=budget, calibration=cal,
                                       **METHODS[method])
                seconds = time.perf_counter() - t0
                report = lrfx.facts_of(gm).report
                run = {"budget": budget, "method": method, "acc": accuracy(gm, xte, yte),
                       "macs_fraction": report.macs_ratio, "layers_factored": len(report),
                       "sequential": report.sequential, "seconds": round(seconds, 1)}
                res["runs"].append(run)
                print(f"  {budget:.1f}x {method:13s} {run['acc']:.2f} "
                      f"(MACs {run['macs_fraction']:.3f}, {seconds:.0f} s)", flush=True)
                OUT.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)


if __name__ == "__main__":
    main()
