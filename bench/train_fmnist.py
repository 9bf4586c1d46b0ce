"""Train the dense reference models on Fashion-MNIST (CPU), for the post-training benchmarks.

    .venv/bin/python bench/train_fmnist.py [--epochs 8] [--models resnet20,vgg_small]
    .venv/bin/python bench/train_fmnist.py --epochs 10 --models vit_tiny   # AdamW, lr 2e-3

Writes ``bench/checkpoints/<model>_fmnist.pt`` (a plain state_dict) and
``bench/results/train_fmnist.json`` (per-epoch loss and test accuracy, time, threads).
Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lrfx.contrib.data import load_fashion_mnist
from lrfx.contrib.zoo import resnet20, vgg_small, vit_tiny

ROOT = Path(__file__).resolve().parent
VGG_CONFIG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


def build(name: str) -> nn.Module:
    if name == "resnet20":
        return resnet20(in_channels=1)
    if name == "vgg_small":
        return vgg_small(in_channels=1, config=VGG_CONFIG)
    if name == "vit_tiny":
        return vit_tiny(in_channels=1)
    raise SystemExit(f"unknown model {name}")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (pad + crop) and horizontal flips."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    out = padded[:, :, dy : dy + 28, dx : dx + 28]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += int((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum())
    return 100.0 * correct / len(x)


def train(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor,
          yte: torch.Tensor, epochs: int, lr: float = 0.1, bs: int = 128, seed: int = 0,
          log: list[dict[str, float]] | None = None, adamw: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt: torch.optim.Optimizer
    if adamw:  # transformers: AdamW, weight decay on matrices only
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                 {"params": rest, "weight_decay": 0.0}], lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                              nesterov=True)
    steps = epochs * ((len(xtr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), bs):
            idx = order[i : i + bs]
            loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        acc = accuracy(model, xte, yte)
        rec = {"epoch": epoch + 1, "loss": total / len(xtr), "test_acc": acc,
               "seconds": time.time() - t0}
        print(json.dumps(rec), flush=True)
        if log is not None:
            log.append(rec)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--models", default="resnet20,vgg_small")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    out = ROOT / "results" / "train_fmnist.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models.split(","):
        model = build(name)
        log: list[dict[str, float]] = []
        t0 = time.time()
        vit = name.startswith("vit")
        train(model, xtr, ytr, xte, yte, args.epochs, lr=2e-3 if vit else 0.1, log=log,
              adamw=vit)
        ckpt = ROOT / "checkpoints" / f"{name}_fmnist.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), ckpt)
        results[name] = {
            "epochs": args.epochs,
            "optimizer": "AdamW lr 2e-3 wd 0.05" if vit else "SGD nesterov lr 0.1 wd 5e-4",
            "test_acc": log[-1]["test_acc"],
            "train_seconds": time.time() - t0,
            "log": log,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()} ({platform.node()})",
            "torch": torch.__version__,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {log[-1]['test_acc']:.2f}% after {args.epochs} epochs -> {ckpt}")


if __name__ == "__main__":
    main()
