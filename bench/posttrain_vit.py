"""Post-training compression of a small vision transformer (issue 10): plain SVD, whitened
(one-shot), sequential calibration and loss-aware allocation, side by side, no fine-tuning.

    .venv/bin/python bench/train_fmnist.py --epochs 10 --models vit_tiny   # the checkpoint
    .venv/bin/python bench/posttrain_vit.py [--budgets 0.7,0.5] [--calibration 1024]
        [--attention fused,mha]

The committed Fashion-MNIST ViT (``bench/checkpoints/vit_tiny_fmnist.pt``: 4x4 patches, 6
pre-norm blocks of width 64, fused ``qkv`` + ``proj`` Linear attention, GELU MLP of 128; 0.21 M
weights), ``lrfx.compress(model, macs=budget, allocator="lc", scheme="auto")`` — every Linear
(and the patch-embedding conv) is a candidate —, 1,024 calibration images (8 batches of 128, a
fixed random subset of the training set), no fine-tuning; accuracy on the full 10k test set and
the cosine similarity between the original and the compressed model's final class-token
embedding (the head's input), mean and 5th percentile over the test set. Methods:

* ``plain``: weight-space SVD, no calibration data;
* ``whitened``: data-aware (SVD-LLM) factors from the original model's statistics
  (``sequential=False``);
* ``sequential``: the default — each layer fitted to the compressed prefix's inputs;
* ``seq+measured`` / ``seq+fisher``: sequential with loss-aware allocation (``sensitivity=``).

The same weights run twice: with the fused ``qkv`` / ``proj`` Linear layers (``fused``), and as
the identical model on ``nn.MultiheadAttention`` (``mha``: packed ``in_proj_weight``, q/k/v
factored separately; its projections get statistics from a replayed call, but the sequential
walk cannot refit inside the attention module).

Writes ``bench/results/posttrain_vit.json`` (after every run) and ``.png``.
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
from torch import nn

import lrfx
from lrfx.contrib.data import load_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lrfx.contrib.zoo import fused_to_mha, vit_tiny

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "posttrain_vit.json"
METHODS = {
    "plain": {},
    "whitened": {"sequential": False},
    "sequential": {},
    "seq+measured": {"sensitivity": "measured"},
    "seq+fisher": {"sensitivity": "fisher"},
}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000
             ) -> tuple[float, torch.Tensor]:
    """Accuracy (%) and the head's inputs (the final class-token embeddings)."""
    head = model.get_submodule("head")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), bs):
            correct += int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
    finally:
        handle.remove()
    return 100.0 * correct / len(x), torch.cat(seen)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, style in zip(results["variants"], ("-", ":"), strict=False):
        res = results["variants"][variant]
        for color, method in enumerate(METHODS):
            runs = sorted((r for r in res["runs"] if r["method"] == method),
                          key=lambda r: r["macs_fraction"])
            if runs:
                xs = [r["macs_fraction"] for r in runs]
                kw = {"marker": "o", "ls": style, "color": f"C{color}",
                      "label": f"{method} ({variant})"}
                axes[0].plot(xs, [r["acc"] for r in runs], **kw)
                axes[1].plot(xs, [r["cosine_mean"] for r in runs], **kw)
    axes[0].axhline(results["dense_acc"], color="k", ls="--", lw=1, label="dense")
    axes[0].set_ylabel("test accuracy (%), 10k images")
    axes[1].set_ylabel("cosine(original, compressed) embedding, mean")
    for ax in axes:
        ax.set_xlabel("MACs kept (fraction of the whole model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("ViT (0.21 M weights) on Fashion-MNIST, no fine-tuning (lc, auto)")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default="fused,mha")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, _ = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:args.calibration]
    cal = [xtr[idx[i:i + 128]] for i in range(0, args.calibration, 128)]
    state = torch.load(ROOT / "checkpoints" / "vit_tiny_fmnist.pt", weights_only=True)
    results: dict = {"machine": f"{platform.machine()}, {args.threads} threads",
                     "torch": torch.__version__, "calibration_images": args.calibration,
                     "test_images": len(xte), "allocator": "lc", "scheme": "auto",
                     "load_average": list(os.getloadavg()), "variants": {}}
    for variant in args.attention.split(","):
        model = vit_tiny(attention=variant)
        model.load_state_dict(state if variant == "fused" else fused_to_mha(state))
        model.eval()
        dense_acc, dense_emb = evaluate(model, xte, yte)
        results["dense_acc"] = dense_acc
        res = results["variants"][variant] = {
            "dense_acc": dense_acc, "dense_macs": lrfx.count_macs(model, xte[:1]), "runs": []}
        print(f"vit_tiny ({variant} attention): dense {dense_acc:.2f}", flush=True)
        for budget in (float(b) for b in args.budgets.split(",")):
            for method in args.methods.split(","):
                t0 = time.perf_counter()
                if method == "plain":
                    gm = lrfx.compress(model, xte[:1], macs=budget)
                else:
                    gm = lrfx.compress(model, xte[:1], macs=budget, calibration=cal,
                                       **METHODS[method])
                seconds = time.perf_counter() - t0
                acc, emb = evaluate(gm, xte, yte)
                cos = torch.nn.functional.cosine_similarity(emb, dense_emb, dim=1)
                report = lrfx.facts_of(gm).report
                run = {"budget": budget, "method": method, "acc": acc,
                       "cosine_mean": float(cos.mean()),
                       "cosine_p05": float(cos.quantile(0.05)),
                       "macs_fraction": report.macs_ratio, "layers_factored": len(report),
                       "sequential": report.sequential, "seconds": round(seconds, 1)}
                res["runs"].append(run)
                print(f"  {budget:.1f}x {method:13s} {acc:.2f}  cos {run['cosine_mean']:.4f} "
                      f"(p05 {run['cosine_p05']:.4f}, MACs {run['macs_fraction']:.3f}, "
                      f"{len(report)} layers, {seconds:.0f} s)", flush=True)
                OUT.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)


if __name__ == "__main__":
    main()
