"""Network slimming inside your own training loop, then structural pruning (digits, CPU, seconds).

The BatchNorm scales are pushed toward zero by a transformed-l1 penalty (proximal form, Bui et
al. 2020); the channels with the smallest scales are then removed structurally — conv outputs,
BatchNorm entries and the next layer's inputs — for half the MACs, and the pruned model is
fine-tuned for one epoch. A second run slims the *ranks* of a factored model with rank gates.

    python examples/prune_slimming.py              # about 10 s on 2 cores
    python examples/prune_slimming.py --penalty l1 --form subgradient --s 1e-3
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--penalty", default="tl1", choices=("l1", "lp", "tl1"))
parser.add_argument("--form", default="prox", choices=("prox", "subgradient"))
parser.add_argument("--s", type=float, default=3e-2)
parser.add_argument("--macs", type=float, default=0.5)
args = parser.parse_args()

x, y = load_digits_tensors()
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def train(model: nn.Module, epochs: int, slim: lrfx.Slimming | None = None,
          opt: torch.optim.Optimizer | None = None, lr: float = 0.05) -> None:
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=order)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            if slim is not None:
                slim.after_backward(model)   # subgradient form: s * P'(gamma)
            opt.step()
            if slim is not None:
                slim.after_step(model)       # prox form: gamma <- prox(gamma)
    model.eval()


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


# --- channels -----------------------------------------------------------------------------------
net = cnn()
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
slim = lrfx.Slimming(net, xtr[:1], penalty=args.penalty, s=args.s, form=args.form,
                     optimizer=opt, init=0.5)
train(net, args.epochs, slim, opt)
print(f"slimmed ({args.penalty}, {args.form}): {accuracy(net):.2f} %, "
      f"{100 * slim.sparsity(tol=1e-2):.0f} % of the BN scales below 1e-2")

pruned = slim.finalize(net, macs=args.macs)
report = lrfx.facts_of(pruned).report
print(f"pruned to {report.macs_ratio:.2f}x MACs, {report.params_after:,} params: "
      f"{accuracy(pruned):.2f} % before fine-tuning")
for row in report.pruned:
    print(f"  {row['layer']:>4}: {row['channels_before']} -> {row['channels_after']} channels")
train(pruned, 1, lr=0.01)
print(f"after one epoch of fine-tuning: {accuracy(pruned):.2f} %")
assert report.macs_after == lrfx.count_macs(pruned, xtr[:1]) <= args.macs * report.macs_before

# --- ranks: gates between the factors of a factored model ---------------------------------------
dense = cnn()
train(dense, 4)
factored = lrfx.compress(dense, xtr[:1], macs=0.8)
gated = lrfx.add_rank_gates(factored)
opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
slim = lrfx.Slimming(gated, xtr[:1], penalty="tl1", s=args.s, form="prox", optimizer=opt,
                     scales="gates")
train(gated, 2, slim, opt)
smaller = slim.finalize(gated, macs=0.6)
ranks = {n: m.rank for n, m in smaller.named_modules() if isinstance(m, lrfx.modules.Factored)}
before = {n: m.rank for n, m in factored.named_modules() if isinstance(m, lrfx.modules.Factored)}
print(f"rank gates: ranks {before} -> {ranks}, "
      f"{lrfx.count_macs(smaller, xtr[:1]) / lrfx.count_macs(dense, xtr[:1]):.2f}x the dense "
      f"MACs; {accuracy(smaller):.2f} % (gated {accuracy(gated):.2f} %)")
train(smaller, 1, lr=0.01)
print(f"after one epoch of fine-tuning: {accuracy(smaller):.2f} %")
