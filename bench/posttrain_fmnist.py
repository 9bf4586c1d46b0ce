"""Post-training compression quality on Fashion-MNIST: every allocator x {plain, whitened} x
{channel, spatial, auto} at 0.7 / 0.5 / 0.3 of the MACs, BN recalibrated, no fine-tuning; then a
short fine-tune of lc + whitened + auto at 0.5.

    .venv/bin/python bench/train_fmnist.py          # once: trains the dense models (checkpoints)
    .venv/bin/python bench/posttrain_fmnist.py [--models resnet20,vgg_small] [--finetune-epochs 2]

Writes ``bench/results/posttrain_fmnist.json`` (updated after every run, so a partial run is
usable) and ``bench/results/posttrain_fmnist.png`` (accuracy vs MACs).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import lrfx
from lrfx.contrib.data import load_fashion_mnist
from lrfx.passes.analysis.activations import collect_input_stats, whitened_spectra
from lrfx.passes.rewrite import factorize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fmnist import accuracy, build, train

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "posttrain_fmnist.json"
BUDGETS = (0.7, 0.5, 0.3)
ALLOCATORS = ("lc", "energy", "global_sigma", "uniform")
SCHEMES = ("channel", "spatial", "auto")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        res = results["models"][name]
        ax.axhline(res["dense_acc"], color="k", ls="--", lw=1, label="dense")
        for alloc in ALLOCATORS:
            for mode, ls in (("whitened", "-"), ("plain", ":")):
                pts = sorted((r["macs_fraction"], r["acc"]) for r in res["runs"]
                             if r["allocator"] == alloc and r["mode"] == mode
                             and r["scheme"] == "auto")
                if pts:
                    ax.plot(*zip(*pts, strict=True), ls, marker="o", label=f"{alloc} {mode}")
        for ft in res.get("finetune", []):
            ax.plot(ft["macs_fraction"], ft["acc"], "k*", ms=12,
                    label=f"lc whitened + {ft['epochs']} ep fine-tune")
        ax.set_title(f"{name} on Fashion-MNIST (scheme auto, BN recalibrated)")
        ax.set_xlabel("MACs kept (fraction)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet20,vgg_small")
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-size", type=int, default=10000,
                    help="evaluate on the first N test images (10,000 = all)")
    ap.add_argument("--schemes", default="resnet20=channel,spatial,auto;vgg_small=auto",
                    help="schemes per model, e.g. 'resnet20=channel,auto;vgg_small=auto'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xte, yte = xte[: args.test_size], yte[: args.test_size]
    schemes_of = {k: tuple(v.split(",")) for k, v in
                  (item.split("=") for item in args.schemes.split(";"))}
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=gen)[: args.calibration]
    calib = [xtr[idx[i : i + 128]] for i in range(0, len(idx), 128)]
    x = xte[:1]
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.update(machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                   torch=torch.__version__, calibration_images=args.calibration,
                   test_images=len(xte))
    results.setdefault("models", {})
    for name in args.models.split(","):
        model = build(name)
        model.load_state_dict(torch.load(ROOT / "checkpoints" / f"{name}_fmnist.pt"))
        model.eval()
        dense = accuracy(model, xte, yte)
        gm0 = lrfx.trace(model)
        before = lrfx.run_analysis(gm0, x, spectra=True)
        stats = collect_input_stats(gm0, lrfx.PassContext(options={"calibration": calib}))
        wspectra, whitening = whitened_spectra(gm0, before.layers, stats)
        res = {"dense_acc": dense, "dense_macs": before.total_macs, "runs": [], "finetune": []}
        results["models"][name] = res
        print(f"{name}: dense {dense:.2f}% at {before.total_macs:,} MACs", flush=True)
        best = None
        for budget in BUDGETS:
            for alloc in ALLOCATORS:
                for mode in ("plain", "whitened"):
                    for scheme in schemes_of.get(name, SCHEMES):
                        t0 = time.time()
                        plan, _ = lrfx.allocate(before, macs=budget, allocator=alloc,
                                                scheme=scheme,
                                                spectra=wspectra if mode == "whitened" else None)
                        gm = copy.deepcopy(gm0)
                        factorize(gm, lrfx.PassContext(options={
                            "plan": plan, "whitening": whitening if mode == "whitened" else {}}))
                        lrfx.recalibrate_bn(gm, calib)
                        acc = accuracy(gm, xte, yte)
                        run = {"budget": budget, "allocator": alloc, "mode": mode,
                               "scheme": scheme, "acc": acc,
                               "macs_fraction": (plan.macs or 0) / before.total_macs,
                               "layers_factored": len(plan.factored),
                               "seconds": time.time() - t0}
                        res["runs"].append(run)
                        print(json.dumps(run), flush=True)
                        if (budget, alloc, mode, scheme) == (0.5, "lc", "whitened", "auto"):
                            best = gm
                        OUT.write_text(json.dumps(results, indent=2) + "\n")
        if best is not None and args.finetune_epochs > 0:
            t0 = time.time()
            log: list[dict[str, float]] = []
            train(best, xtr, ytr, xte, yte, args.finetune_epochs, lr=0.01, log=log)
            res["finetune"].append({"budget": 0.5, "allocator": "lc", "mode": "whitened",
                                    "scheme": "auto", "epochs": args.finetune_epochs,
                                    "macs_fraction": best.meta["lrfx"].extra.get("macs_after",
                                                                                 0) or 0.5,
                                    "acc": log[-1]["test_acc"], "log": log,
                                    "seconds": time.time() - t0})
            res["finetune"][-1]["macs_fraction"] = lrfx.run_analysis(
                best, x, spectra=False).total_macs / before.total_macs
            OUT.write_text(json.dumps(results, indent=2) + "\n")
        plot(results)


if __name__ == "__main__":
    main()
