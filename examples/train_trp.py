"""Trained Rank Pruning inside your own training loop (scikit-learn's digits, CPU, seconds).

TRP trains the dense model while projecting its 3x3 convolutions onto their low-rank truncation
(energy 0.9) and adding a nuclear-norm subgradient; at the end the weights are factored at the
ranks reached, with no fine-tuning. A dense model trained the same epochs is the reference.

    python examples/train_trp.py              # 12 epochs, about 15 s on 2 cores
    python examples/train_trp.py --epochs 40
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=12)
args = parser.parse_args()

x, y = load_digits_tensors()
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model: nn.Module, method: lrfx.TRP | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=order)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            if method is not None:
                method.after_backward(model)  # nuclear-norm subgradient
            opt.step()
            if method is not None:
                method.after_step(model)      # projection every `every` steps
    model.eval()


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


dense = cnn()
train(dense, None)

model = cnn()
trp = lrfx.TRP(model, xte[:1], energy=0.9, every=4)  # layers="paper": 3x3 convs but the first
train(model, trp)
small = trp.finalize(model)  # factored at the ranks TRP reached; no fine-tuning

macs = lrfx.count_macs(small, xte[:1]) / lrfx.count_macs(dense, xte[:1])
print(f"ranks: {trp.ranks}")
print(f"dense {accuracy(dense):.1f}%  |  TRP factored {accuracy(small):.1f}% at {macs:.2f}x MACs "
      f"({args.epochs} epochs each)")
