"""The LC algorithm inside your own training loop (scikit-learn's digits, CPU, seconds).

A CNN is trained dense, then LC alternates L steps (your loss + the quadratic coupling to the
nested low-rank model) with exact C steps that choose every layer's rank for a 0.3x MACs budget,
mu growing each step. The nested model is factored and briefly fine-tuned with weight decay on
the product of the factors. One-shot post-training compression at the same budget, fine-tuned the
same, is the reference.

    python examples/train_lc.py               # 8 LC steps, about 20 s on 2 cores
    python examples/train_lc.py --steps 30
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=8, help="LC steps (one epoch each)")
parser.add_argument("--macs", type=float, default=0.3)
args = parser.parse_args()

x, y = load_digits_tensors()
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
data = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]

torch.manual_seed(0)
dense = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
)
lrfx.fit(dense, data, epochs=10, lr=3e-3)


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


# LC: every epoch is one L step, followed by a C step (end_epoch)
model = copy.deepcopy(dense)
lc = lrfx.LC(model, xte[:1], macs=args.macs, mu0=1e-3, growth=1.5,
             monitor=data[:4])  # keep the nested model with the lowest loss on 4 batches
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
for epoch in range(args.steps):
    for xb, yb in data:
        opt.zero_grad()
        (F.cross_entropy(model(xb), yb) + lc.penalty(model)).backward()
        opt.step()
    lc.end_epoch(model, epoch)  # C step, multipliers, mu *= growth
small = lc.finalize(model)

# fine-tune the factored model: weight decay on the product U V, not on the factors
decay = lrfx.ProductDecay(1e-4)
lrfx.fit(small, data, epochs=2, lr=1e-3, callbacks=[decay])

# the reference: one-shot compression to the same budget, fine-tuned the same
oneshot = lrfx.compress(dense, xte[:1], macs=args.macs, calibration=[b[0] for b in data[:8]])
lrfx.fit(oneshot, data, epochs=2, lr=1e-3, callbacks=[decay])

total = lrfx.count_macs(dense, xte[:1])
print(f"LC ranks: {lc.ranks}")
print(f"dense {accuracy(dense):.1f}%  |  LC {accuracy(small):.1f}% at "
      f"{lrfx.count_macs(small, xte[:1]) / total:.2f}x MACs  |  one-shot + fine-tune "
      f"{accuracy(oneshot):.1f}% at {lrfx.count_macs(oneshot, xte[:1]) / total:.2f}x")
