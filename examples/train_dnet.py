"""Decomposable-Net: train once, deploy at any size (scikit-learn's digits, CPU, seconds).

Every step trains the full network and a randomly sized low-rank one that shares its weights;
afterwards the one trained model is truncated to five MACs budgets without retraining (BatchNorm
statistics recomputed on a few training batches). A dense model trained the same epochs,
compressed post-training to the same budgets, is the reference.

    python examples/train_dnet.py               # 10 epochs, about 20 s on 2 cores
    python examples/train_dnet.py --epochs 40
"""

import argparse

import torch
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

x, y = load_digits_tensors()
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
data = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
calibration = [b[0] for b in data[:8]]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                           weight_decay=5e-4)


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


dense = cnn()
lrfx.fit(dense, data, epochs=args.epochs, optimizer=sgd(dense))

model = cnn()
dnet = lrfx.DecomposableNet(model, xte[:1], rank_min=5)
opt = sgd(model)
model.train()
for _ in range(args.epochs):  # your loop: dnet.backward replaces loss.backward()
    for xb, yb in data:
        opt.zero_grad()
        dnet.backward(model, xb, yb)
        opt.step()

budgets = [0.2, 0.3, 0.45, 0.6, 0.8]
sizes = dnet.sizes(model, macs=budgets, calibration=calibration)  # five sizes, one model
print(f"dense {accuracy(dense):.1f}%, Decomposable-Net full rank {accuracy(model):.1f}% "
      f"({args.epochs} epochs each)")
for b in budgets:
    oneshot = lrfx.compress(dense, xte[:1], macs=b, calibration=calibration)
    print(f"  {b:.2f}x MACs: Decomposable-Net {accuracy(sizes[('macs', b)]):5.1f}%   "
          f"dense + post-training compression {accuracy(oneshot):5.1f}%")
