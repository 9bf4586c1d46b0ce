"""Train a small CNN on scikit-learn's digits, compress it to half its MACs, compare accuracy."""

import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors

torch.manual_seed(0)
x, y = load_digits_tensors()
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]

net = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
)
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
for _ in range(15):
    for i in range(0, len(xtr), 100):
        loss = F.cross_entropy(net(xtr[i : i + 100]), ytr[i : i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


calibration = [xtr[i : i + 200] for i in range(0, 800, 200)]
gm = lrfx.compress(net, xte[:1], macs=0.5, calibration=calibration)
print(gm.meta["lrfx"].extra["report"].table())
print(f"dense accuracy {accuracy(net):.1f}%, compressed (no fine-tuning) {accuracy(gm):.1f}%")
