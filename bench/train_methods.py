"""Training-time methods on real data: TRP, LC and Decomposable-Net against the post-training
path, Fashion-MNIST ResNet-20 (or the small VGG), at equal training epochs.

    .venv/bin/python bench/train_methods.py                      # about 45 min on 2 cores
    .venv/bin/python bench/train_methods.py --model vgg_small

Every arm starts from the committed dense checkpoint (``bench/checkpoints/<model>_fmnist.pt``:
8 epochs; ResNet-20 92.67 %, VGG 93.22 % on the 10k test images) and gets the same ``--epochs``
more passes over the 60k training images (SGD, Nesterov momentum 0.9, cosine learning rate from
``--lr`` to 0, batch 128, the shift/flip augmentation of ``bench/train_fmnist.py``, one seed):

* ``dense`` — plain training (the reference every budget is compared with);
* ``post`` — the strongest post-training path: ``lrfx.compress`` (lc allocator, whitened and
  sequential factors, BN recalibrated, 1,024 calibration images), then every epoch fine-tuning
  with weight decay on the product of the factors (:class:`lrfx.ProductDecay`);
* ``trp`` — every epoch with :class:`lrfx.TRP` (budgeted: each projection takes the energy the
  MACs budget allows; nuclear term 3e-4, projection every step), factored at the end, no
  fine-tuning;
* ``lc`` — all epochs but the last with :class:`lrfx.LC` (budgeted C steps every
  ``--lc-every`` batches, ``mu`` from 1e-3 growing geometrically to ``--lc-mu-final``; the nested
  model kept by its loss on 4 training batches), then the factored nested model is fine-tuned for
  the last epoch like ``post``;
* ``dnet`` — every epoch with :class:`lrfx.DecomposableNet` (rho ~ U[0.01, 0.25], rank_min 5),
  then **one** trained model deployed at every budget and at 0.25 and 0.8 (BN recomputed on 1,024
  training images, no fine-tuning).

Budgets are fractions of the dense model's MACs. Accuracy is on the full 10k test set. A short
side-by-side timing (``--overhead-steps`` interleaved steps of each method on the same batch)
gives each method's time per step relative to plain training. Writes
``bench/results/train_methods.json`` and ``.png``. Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_fashion_mnist

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from train_fmnist import accuracy, augment, build  # noqa: E402

X1 = torch.zeros(1, 1, 28, 28)
MODEL = "resnet20"


def dense_model() -> nn.Module:
    """The committed dense checkpoint of ``MODEL`` (``--model``)."""
    model = build(MODEL)
    checkpoint = ROOT / "checkpoints" / f"{MODEL}_fmnist.pt"
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model


class Data:
    def __init__(self, train_size: int, test_size: int, batch: int, seed: int) -> None:
        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
        self.xtr, self.ytr = xtr[:train_size], ytr[:train_size]
        self.xte, self.yte = xte[:test_size], yte[:test_size]
        self.batch, self.seed = batch, seed
        g = torch.Generator().manual_seed(seed + 1)
        pick = torch.randperm(len(self.xtr), generator=g)[:1024]
        self.calibration = [self.xtr[pick[i:i + 128]] for i in range(0, len(pick), 128)]
        self.monitor = [(self.xtr[pick[i:i + 128]], self.ytr[pick[i:i + 128]])
                        for i in range(0, min(512, len(pick)), 128)]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.xtr) / self.batch)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(len(self.xtr), generator=gen)
        for i in range(0, len(self.xtr), self.batch):
            idx = order[i:i + self.batch]
            yield augment(self.xtr[idx], gen), self.ytr[idx]

    def test(self, model: nn.Module) -> float:
        return accuracy(model, self.xte, self.yte)


def sgd(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                           momentum=0.9, nesterov=True, weight_decay=weight_decay)


def cosine(opt: torch.optim.Optimizer, total: int, start: int = 0
           ) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine from the initial lr to 0 over ``total`` steps, entered at step ``start``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k + start, total) / max(total, 1))))


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]


def run_epochs(model: nn.Module, data: Data, epochs: range, opt: torch.optim.Optimizer,
               sched: Any, step: Step, after_batch: Callable[[int], None] | None = None
               ) -> list[float]:
    """Train ``model`` over ``epochs`` (indices into the shared schedule); returns mean losses."""
    losses = []
    model.train()
    for e in epochs:
        total, n = 0.0, 0
        for k, (xb, yb) in enumerate(data.epoch(e)):
            opt.zero_grad(set_to_none=True)
            total += step(model, xb, yb)
            opt.step()
            sched.step()
            n += 1
            if after_batch is not None:
                after_batch(k)
        losses.append(total / max(n, 1))
    return losses


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item()


def macs_of(model: nn.Module, dense_macs: int) -> float:
    return lrfx.count_macs(model, X1) / dense_macs


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- arms -----------------------------------------------------------------------------------------


def arm_dense(data: Data, args: argparse.Namespace) -> dict[str, Any]:
    model = dense_model()
    opt = sgd(model, args.lr, args.wd)
    sched = cosine(opt, args.epochs * data.steps_per_epoch)
    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(args.epochs), opt, sched, plain_step)
    return {"acc": data.test(model), "macs": 1.0, "params": params_of(model),
            "train_loss": losses, "seconds": time.perf_counter() - t0}


def finetune(model: nn.Module, data: Data, args: argparse.Namespace, epochs: range,
             total_epochs: int) -> list[float]:
    """Fine-tune a factored model: no weight decay on the factors, ProductDecay on U V."""
    decay = lrfx.ProductDecay(args.wd)
    opt = sgd(model, args.lr, 0.0)
    sched = cosine(opt, total_epochs * data.steps_per_epoch,
                   start=epochs.start * data.steps_per_epoch)  # continue the shared schedule

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        penalty = decay.penalty(m)
        (loss if penalty is None else loss + penalty).backward()
        return loss.item()

    return run_epochs(model, data, epochs, opt, sched, step)


def arm_post(data: Data, args: argparse.Namespace, budget: float, dense_macs: int
             ) -> dict[str, Any]:
    t0 = time.perf_counter()
    small = lrfx.compress(dense_model(), X1, macs=budget, calibration=data.calibration)
    before = data.test(small)
    losses = finetune(small, data, args, range(args.epochs), args.epochs)
    plan = lrfx.facts_of(small).plan
    return {"acc": data.test(small), "acc_before_finetune": before,
            "macs": macs_of(small, dense_macs), "params": params_of(small),
            "ranks": {n: e.rank for n, e in plan.items() if e.lowrank} if plan else {},
            "train_loss": losses, "seconds": time.perf_counter() - t0}


def arm_trp(data: Data, args: argparse.Namespace, budget: float, dense_macs: int
            ) -> dict[str, Any]:
    model = dense_model()
    trp = lrfx.TRP(model, X1, macs=budget, every=args.trp_every, lambda_nuc=args.trp_lambda)
    opt = sgd(model, args.lr, args.wd)
    sched = cosine(opt, args.epochs * data.steps_per_epoch)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        trp.after_backward(m)
        return loss.item()

    t0 = time.perf_counter()
    trp.project(model)  # start from the projected pretrained weights
    losses = run_epochs(model, data, range(args.epochs), opt, sched, step,
                        after_batch=lambda k: trp.after_step(model))
    small = trp.finalize(model.eval())
    return {"acc": data.test(small), "macs": macs_of(small, dense_macs),
            "params": params_of(small), "ranks": dict(trp.ranks), "train_loss": losses,
            "seconds": time.perf_counter() - t0, "skipped": trp.skipped}


def arm_lc(data: Data, args: argparse.Namespace, budget: float, dense_macs: int
           ) -> dict[str, Any]:
    model = dense_model()
    lc_epochs = max(args.epochs - 1, 1)
    c_steps = lc_epochs * data.steps_per_epoch // args.lc_every
    growth = (args.lc_mu_final / args.lc_mu0) ** (1.0 / max(c_steps - 1, 1))
    lc = lrfx.LC(model, X1, macs=budget, mu0=args.lc_mu0, growth=growth, monitor=data.monitor)
    opt = sgd(model, args.lr, args.wd)
    sched = cosine(opt, args.epochs * data.steps_per_epoch)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        (loss + lc.penalty(m)).backward()
        return loss.item()

    def after(k: int) -> None:
        if (k + 1) % args.lc_every == 0 and lc.step < c_steps:
            lc.c_step(model)

    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(lc_epochs), opt, sched, step, after_batch=after)
    small = lc.finalize(model.eval())
    lrfx.recalibrate_bn(small, data.calibration)  # Theta's BN statistics, not W's
    nested = data.test(small)
    if args.epochs > 1:
        losses += finetune(small, data, args, range(lc_epochs, args.epochs), args.epochs)
    best = lc.best or {}
    return {"acc": data.test(small), "acc_nested": nested, "macs": macs_of(small, dense_macs),
            "params": params_of(small),
            "ranks": {n: e.rank for n, e in lc.plan().items() if e.lowrank},
            "c_steps": lc.step, "mu_final": lc.mu, "growth": growth,
            "best_step": best.get("step"), "train_loss": losses,
            "seconds": time.perf_counter() - t0,
            "history": [{k: v for k, v in h.items() if k != "ranks"} for h in lc.history]}


def arm_dnet(data: Data, args: argparse.Namespace, budgets: list[float], dense_macs: int
             ) -> dict[str, Any]:
    model = dense_model()
    dnet = lrfx.DecomposableNet(model, X1)
    opt = sgd(model, args.lr, args.wd)
    sched = cosine(opt, args.epochs * data.steps_per_epoch)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        full, _ = dnet.backward(m, x, y)
        return full.item()

    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(args.epochs), opt, sched, step)
    train_seconds = time.perf_counter() - t0
    model.eval()
    sizes = sorted({*budgets, 0.25, 0.8})  # rank_min 5 puts the floor at 0.21x
    out: dict[str, Any] = {"full_rank_acc": data.test(model), "train_loss": losses,
                           "seconds": train_seconds, "sizes": {}}
    for b, small in dnet.sizes(model, macs=sizes, calibration=data.calibration).items():
        out["sizes"][str(b[1])] = {"acc": data.test(small), "macs": macs_of(small, dense_macs),
                                   "params": params_of(small)}
    return out


# --- per-step overhead ----------------------------------------------------------------------------


def overhead(data: Data, steps: int) -> dict[str, Any]:
    """Seconds per training step of each method, interleaved round by round on one batch."""
    xb, yb = next(iter(data.epoch(0)))
    arms: dict[str, tuple[nn.Module, Step, Callable[[nn.Module], None]]] = {}
    plain = dense_model()
    arms["plain"] = (plain, plain_step, lambda m: None)
    m_trp = dense_model()
    trp = lrfx.TRP(m_trp, X1, macs=0.45)

    def trp_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        v = plain_step(m, x, y)
        trp.after_backward(m)
        return v

    arms["trp"] = (m_trp, trp_step, trp.after_step)
    m_lc = dense_model()
    lc = lrfx.LC(m_lc, X1, macs=0.45)

    def lc_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        (loss + lc.penalty(m)).backward()
        return loss.item()

    arms["lc"] = (m_lc, lc_step, lambda m: None)  # C steps are rare (every --lc-every batches)
    m_dn = dense_model()
    dnet = lrfx.DecomposableNet(m_dn, X1)
    arms["dnet"] = (m_dn, lambda m, x, y: dnet.backward(m, x, y)[0].item(), lambda m: None)
    opts = {k: sgd(m, 1e-3, 0.0) for k, (m, _, _) in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(steps + 2):
        for k, (m, step, after) in arms.items():
            m.train()
            t = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            step(m, xb, yb)
            opts[k].step()
            after(m)
            if r >= 2:  # warm-up rounds
                times[k].append(time.perf_counter() - t)
    t = time.perf_counter()
    lc.c_step(m_lc)
    c_step = time.perf_counter() - t
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"steps": steps, "batch": len(xb), "median_step_seconds": med,
            "relative_to_plain": {k: v / med["plain"] for k, v in med.items()},
            "lc_c_step_seconds": c_step}


# --- report ---------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = results["arms"]["dense"]["acc"]
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f} %)")
    for name, marker in (("post", "o"), ("trp", "s"), ("lc", "^")):
        pts = sorted((v["macs"], v["acc"]) for v in results["arms"].get(name, {}).values())
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=name)
    if "dnet" in results["arms"]:
        pts = sorted((v["macs"], v["acc"]) for v in results["arms"]["dnet"]["sizes"].values())
        ax.plot(*zip(*pts, strict=True), marker="D", label="Decomposable-Net (one model)")
    ax.set_xlabel("MACs (fraction of dense)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST {results['config']['model']}, {results['config']['epochs']} "
                 "epochs from the dense checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=("resnet20", "vgg_small"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--budgets", default="0.6,0.45,0.3")
    ap.add_argument("--methods", default="dense,post,trp,lc,dnet")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--trp-every", type=int, default=1)
    ap.add_argument("--trp-lambda", type=float, default=3e-4)
    ap.add_argument("--lc-every", type=int, default=47)
    ap.add_argument("--lc-mu0", type=float, default=1e-3)
    ap.add_argument("--lc-mu-final", type=float, default=5.0)
    ap.add_argument("--train-size", type=int, default=60000)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overhead-steps", type=int, default=20)
    ap.add_argument("--out", default=None,
                    help="default bench/results/train_methods.json (resnet20) or "
                         "train_methods_<model>.json")
    args = ap.parse_args()
    global MODEL
    MODEL = args.model
    if args.out is None:
        name = "train_methods" + ("" if MODEL == "resnet20" else f"_{MODEL}")
        args.out = str(ROOT / "results" / f"{name}.json")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    data = Data(args.train_size, args.test_size, args.batch, args.seed)
    dense_macs = lrfx.count_macs(dense_model(), X1)
    out = Path(args.out)
    results: dict[str, Any] = {
        "config": {**vars(args), "dense_checkpoint_acc": data.test(dense_model()),
                   "dense_macs": dense_macs, "torch": torch.__version__,
                   "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_average_at_start": os.getloadavg()},
        "arms": {}}
    t_all = time.perf_counter()

    def save() -> None:
        results["wall_seconds"] = time.perf_counter() - t_all
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))

    if args.overhead_steps:
        results["overhead"] = overhead(data, args.overhead_steps)
        print("overhead", json.dumps(results["overhead"]["relative_to_plain"]), flush=True)
        save()
    if "dense" in methods:
        results["arms"]["dense"] = arm_dense(data, args)
        print("dense", results["arms"]["dense"]["acc"], flush=True)
        save()
    for name, fn in (("post", arm_post), ("trp", arm_trp), ("lc", arm_lc)):
        if name not in methods:
            continue
        results["arms"][name] = {}
        for b in budgets:
            r = fn(data, args, b, dense_macs)
            results["arms"][name][str(b)] = r
            print(name, b, f"acc {r['acc']:.2f} macs {r['macs']:.3f} ({r['seconds']:.0f} s)",
                  flush=True)
            save()
    if "dnet" in methods:
        results["arms"]["dnet"] = arm_dnet(data, args, budgets, dense_macs)
        print("dnet", json.dumps({k: v["acc"] for k, v in
                                  results["arms"]["dnet"]["sizes"].items()}), flush=True)
        save()
    results["load_average_at_end"] = os.getloadavg()
    save()
    if "dense" in results["arms"]:
        plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
