"""Channel pruning on real data: lrfx's network slimming (l1 / lp / transformed-l1 penalties on
BatchNorm scales) and structural pruning against Torch-Pruning, Fashion-MNIST ResNet-20 (or the
small VGG), at equal training epochs and equal MACs.

    .venv/bin/pip install torch-pruning                              # once
    .venv/bin/python bench/prune_fmnist.py --threads 2               # ResNet-20, ~1 h on 2 cores
    .venv/bin/python bench/prune_fmnist.py --model vgg_small
    .venv/bin/python bench/prune_fmnist.py --quick                   # 3k / 1k images, smoke test
    .venv/bin/python bench/prune_fmnist.py --pilot                   # the s pilot (5k images)

Every arm starts from the committed dense checkpoint (``bench/checkpoints/<model>_fmnist.pt``,
ResNet-20 92.67 %, VGG 93.22 % on the 10k test images) and gets the same epochs over the 60k
training images: ``--sparse-epochs`` (2) of training, then for each MACs budget (``--budgets``,
fractions of the dense model's MACs) a pruned model fine-tuned for ``--ft-epochs`` (1). The data
pipeline and optimizer are those of ``bench/train_methods.py`` (imported from it): shift/flip
augmentation, batch 128, SGD with Nesterov momentum 0.9, weight decay 1e-4, one cosine learning
rate from ``--lr`` to 0 over the arm's sparse + fine-tune epochs (each budget's fine-tune picks
the schedule up where the sparse training left it).

* ``lrfx_l1`` / ``lrfx_lp`` / ``lrfx_tl1`` — :class:`lrfx.Slimming` (``--form``, ``--s``) on the
  BatchNorm scales of the prunable channel groups; then per budget ``slim.finalize(model,
  macs=b)`` (global ranking of ``|gamma|``, exact MACs);
* ``lrfx_l1_mean`` / ``lrfx_tl1_mean`` — the same training, finalized with
  ``normalize="mean"`` (each group's scales relative to their mean, as Torch-Pruning ranks);
* ``tp_slim`` — Torch-Pruning's network slimming: ``BNScalePruner.regularize`` (``s * sign``
  added to the BN gradients) at the same ``s``, then ``BNScalePruner`` with ``BNScaleImportance``
  and global pruning, its ratio bisected so that the MACs (``lrfx.count_macs``) land at or just
  under the budget;
* ``tp_magnitude`` — plain training, then Torch-Pruning's ``BasePruner`` (a.k.a. ``MetaPruner``)
  with ``MagnitudeImportance(p=2)``, global, same bisection;
* ``lrfx_lowrank`` — the plain-trained model of ``tp_magnitude`` compressed by ``lrfx.compress``
  (low rank, whitened, 1,024 calibration images) to the budget, fine-tuned with
  :class:`lrfx.ProductDecay` as ``arm_post`` of ``train_methods.py``;
* ``lrfx_gates`` — the checkpoint compressed to 0.6x MACs, rank gates added
  (:func:`lrfx.add_rank_gates`), Slimming tl1 on BN scales and gates, finalized to each budget
  (the fraction converted to the gated model's MACs), fine-tuned with ProductDecay.

Torch-Pruning is told to leave alone the channel groups that lrfx reports as blocked
(``lrfx.channel_groups``; on this ResNet-20 the residual stream, whose option-A shortcuts
zero-pad channels, so only the nine inner block channels prune): left to itself Torch-Pruning
treats ``F.pad`` as element-wise, couples the 16-, 32- and 64-wide residual streams into one
group, and returns a model that no longer runs (recorded under ``tp_default_scope``). With both
pruning the same groups, both slimming recipes penalize the same BatchNorm scales.

Per arm and budget: accuracy right after pruning (``acc_no_ft``), after recomputing the BN
statistics on 1,024 training images (``acc_bn_recal``; the fine-tune starts from this model), after
fine-tuning (``acc_ft``), MACs / dense MACs, parameters, seconds; per arm the accuracy of the
trained unpruned model (as is, and with its BN statistics recomputed: ``acc_trained_bn_recal``),
the fraction of penalized scales below 1e-2 and the seconds per training step (from the epoch
times, and ``overhead``: interleaved steps on one batch). ``check_same_channels`` takes each
``tp_slim`` pruned model before fine-tuning, recovers the channels it kept (exact equality of the
pruned weight rows with the sliced rows of the unpruned model), builds the same lrfx plan
(:class:`lrfx.ChannelPlan` per group), applies it to the unpruned model with :func:`lrfx.apply` and
compares logits (512 test images) and accuracy.

``s`` pilot (``--pilot``: 5k training images, 1k test images, ``--sparse-epochs`` epochs, the three
penalties at several ``s``; ``bench/results/prune_fmnist_pilot.json``): see ``PILOT_NOTE``.

Writes ``bench/results/prune_fmnist.json`` (``prune_fmnist_<model>.json`` for other models) after
every arm and budget, and a ``.png``; ``--resume`` skips the arms a previous run finished.
Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import os

# On this shared 2-core machine other jobs run 2 threads too: OpenMP's default busy-waiting then
# makes a 2-thread training step ~10x slower (3.2 s instead of 0.28 s measured); passive waiting
# removes that. Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lrfx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import train_methods  # noqa: E402
from train_methods import (  # noqa: E402
    X1,
    Data,
    cosine,
    dense_model,
    finetune,
    params_of,
    plain_step,
    run_epochs,
    sgd,
)

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - the benchmark needs it
    tp = None

PILOT_NOTE = (
    "s pilot on ResNet-20, 5k training images, 1k test images, subgradient form, cosine lr "
    "0.02 over sparse + 1 epochs. (1) 2 epochs = 80 steps (prune_fmnist_pilot.json), s in "
    "{1e-3, 3e-3, 1e-2, 3e-2}, l1/lp/tl1: up to s=1e-2 no gamma falls below 1e-2 (the "
    "checkpoint's gammas are all ~0.45; the median only drops to 0.35) and accuracy holds; at "
    "3e-2 accuracy breaks (l1 86 %, tl1 49 %) before gammas are small: 80 steps are too few to "
    "tell. (2) So 24 epochs over the 5k images = 960 steps, the full run's 2 epochs "
    "(prune_fmnist_pilot_e24.json), s=5e-3: tl1 94.1 % (1k test), 43 % of gammas < 1e-2, "
    "98 % < 0.1; l1 93.5 %, 13 % < 1e-2, 90 % < 0.1. Default s = 5e-3 for all three penalties "
    "(lp's matched-step behaviour was not piloted; at 80 steps it tracked l1).")

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SLIM_ARMS = {"lrfx_l1": "l1", "lrfx_lp": "lp", "lrfx_tl1": "tl1", "lrfx_l1_mean": "l1",
             "lrfx_tl1_mean": "tl1"}
ALL_ARMS = ("lrfx_l1", "lrfx_lp", "lrfx_tl1", "tp_slim", "tp_magnitude", "lrfx_lowrank",
            "lrfx_gates", "lrfx_l1_mean", "lrfx_tl1_mean")


# --- helpers --------------------------------------------------------------------------------------


def fresh() -> nn.Module:
    """The dense checkpoint, in eval mode (so that no tracing pass moves its BN statistics)."""
    return dense_model().eval()


def small_frac(weights: list[torch.Tensor], tol: float = 1e-2) -> float:
    w = torch.cat([x.detach().abs().flatten() for x in weights])
    return float((w < tol).float().mean())


def bn_weights(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    out = []
    for n in names:
        w = model.get_submodule(n).weight
        assert isinstance(w, torch.Tensor)
        out.append(w)
    return out


class Groups:
    """lrfx's channel groups of the dense model, and what they imply for Torch-Pruning."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = lrfx.channel_groups(model, X1)
        self.blocked = [g for g in self.groups if not g.prunable]
        self.prunable = [g for g in self.groups if g.prunable]
        # modules Torch-Pruning must not prune: producers and norms of the blocked groups
        self.ignored = sorted({m.target for g in self.blocked for m in g.members
                               if m.role in ("out", "norm")})
        self.prunable_norms = [n for g in self.prunable for n in g.norms]
        self.out_group = {m.target: g for g in self.groups for m in g.members if m.role == "out"}
        self.in_group = {m.target: g for g in self.groups for m in g.members if m.role == "in"}

    def summary(self) -> dict[str, Any]:
        return {"prunable": [{"name": g.name, "channels": g.channels, "producers": g.producers}
                             for g in self.prunable],
                "blocked": [{"name": g.name, "channels": g.channels, "producers": g.producers,
                             "reason": g.reason} for g in self.blocked]}


def finetune_plain(model: nn.Module, data: Data, args: argparse.Namespace) -> list[float]:
    """Fine-tune a channel-pruned model: plain SGD with weight decay, continuing the arm's
    cosine schedule (epochs ``sparse .. sparse + ft`` of ``sparse + ft``)."""
    total = args.sparse_epochs + args.ft_epochs
    opt = sgd(model, args.lr, args.wd)
    sched = cosine(opt, total * data.steps_per_epoch,
                   start=args.sparse_epochs * data.steps_per_epoch)
    return run_epochs(model, data, range(args.sparse_epochs, total), opt, sched, plain_step)


def finetune_factored(model: nn.Module, data: Data, args: argparse.Namespace) -> list[float]:
    """Fine-tune a factored model as ``arm_post`` does (ProductDecay on U V, no other decay)."""
    total = args.sparse_epochs + args.ft_epochs
    return finetune(model, data, args, range(args.sparse_epochs, total), total)


def schedule(opt: torch.optim.Optimizer, data: Data, args: argparse.Namespace) -> Any:
    return cosine(opt, (args.sparse_epochs + args.ft_epochs) * data.steps_per_epoch)


def evaluate_budget(small: nn.Module, data: Data, args: argparse.Namespace, dense_macs: int,
                    factored: bool) -> dict[str, Any]:
    """acc right after pruning, after BN recalibration, after fine-tuning (of the recalibrated
    model), and its size."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"acc_no_ft": data.test(small)}
    lrfx.recalibrate_bn(small, data.calibration)
    out["acc_bn_recal"] = data.test(small)
    out["macs"] = lrfx.count_macs(small, X1) / dense_macs
    out["params"] = params_of(small)
    t1 = time.perf_counter()
    out["ft_loss"] = (finetune_factored if factored else finetune_plain)(small, data, args)
    out["ft_seconds"] = time.perf_counter() - t1
    out["acc_ft"] = data.test(small)
    out["seconds"] = time.perf_counter() - t0
    return out


def channels_of(model: nn.Module) -> dict[str, int]:
    return {n: int(m.weight.shape[0]) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and m.groups == 1}


def train_record(model: nn.Module, data: Data, losses: list[float], seconds: float,
                 steps: int) -> dict[str, Any]:
    recal = copy.deepcopy(model)
    lrfx.recalibrate_bn(recal, data.calibration)
    return {"acc_trained": data.test(model), "acc_trained_bn_recal": data.test(recal),
            "train_loss": losses, "train_seconds": seconds, "steps": steps,
            "seconds_per_step": seconds / max(steps, 1)}


# --- Torch-Pruning --------------------------------------------------------------------------------


def tp_pruner(model: nn.Module, kind: str, ratio: float, groups: Groups | None,
              reg: float = 0.0) -> Any:
    """A global Torch-Pruning pruner of ``kind`` (``slim`` / ``magnitude``) on ``model``.
    ``groups`` None: only the classifier is left alone (Torch-Pruning's usual setup)."""
    ignored = ([model.get_submodule(n) for n in groups.ignored] if groups is not None
               else [m for m in model.modules() if isinstance(m, nn.Linear)][-1:])
    model.eval()  # building the dependency graph runs the model: keep the BN statistics
    if kind == "slim":
        return tp.pruner.BNScalePruner(model, X1, importance=tp.importance.BNScaleImportance(),
                                       reg=reg, global_pruning=True, pruning_ratio=ratio,
                                       ignored_layers=ignored)
    return tp.pruner.BasePruner(model, X1, importance=tp.importance.MagnitudeImportance(p=2),
                                global_pruning=True, pruning_ratio=ratio,
                                ignored_layers=ignored)


def tp_scope_channels(groups: Groups) -> int:
    return sum(g.channels for g in groups.prunable)


def tp_prune_to(model: nn.Module, kind: str, budget: float, dense_macs: int, groups: Groups
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` pruned by Torch-Pruning at the smallest global pruning ratio whose
    MACs are <= ``budget`` (bisection over the number of pruned channels ``k``: ratio
    ``(k - 0.5) / N`` prunes exactly ``k`` of the ``N`` channels in Torch-Pruning's scope)."""
    n = tp_scope_channels(groups)
    target = budget * dense_macs
    cache: dict[int, tuple[nn.Module | None, float]] = {}

    def at(k: int) -> tuple[nn.Module | None, float]:
        if k not in cache:
            m = copy.deepcopy(model).eval()
            try:
                tp_pruner(m, kind, 0.0 if k == 0 else (k - 0.5) / n, groups).step()
                cache[k] = (m, lrfx.count_macs(m, X1) / dense_macs)
            except Exception as exc:  # an over-pruned model: treated as too small
                cache[k] = (None, -1.0)
                print(f"  tp {kind} k={k}: {type(exc).__name__}: {exc}", flush=True)
        return cache[k]

    lo, hi = 0, n - 1
    while lo < hi:  # the fewest pruned channels that fit
        mid = (lo + hi) // 2
        _, macs = at(mid)
        if macs * dense_macs <= target:
            hi = mid
        else:
            lo = mid + 1
    m, macs = at(lo)
    if m is None or macs * dense_macs > target:
        raise RuntimeError(f"Torch-Pruning cannot reach {budget} MACs (k={lo}, macs={macs})")
    return m, {"tp_pruned_channels": lo, "tp_ratio": (lo - 0.5) / n if lo else 0.0,
               "tp_scope_channels": n, "bisection_steps": len(cache)}


def tp_group_structure(model: nn.Module, groups: Groups) -> list[dict[str, Any]]:
    """Torch-Pruning's own coupled groups (only the classifier ignored), with the lrfx groups
    whose producers they contain."""
    m = copy.deepcopy(model).eval()
    last = [x for x in m.modules() if isinstance(x, nn.Linear)][-1:]
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=X1)
    out = []
    for group in dg.get_all_groups(ignored_layers=last,
                                   root_module_types=[nn.Conv2d, nn.Linear]):
        producers, widths = [], []
        for dep, _ in group:
            mod = dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(
                    dep.handler):
                name = dg._module2name.get(mod, "?")
                if name not in producers:
                    producers.append(name)
                    widths.append(int(mod.weight.shape[0]))
        lrfx_groups = sorted({groups.out_group[p].name for p in producers
                              if p in groups.out_group})
        out.append({"root": dg._module2name.get(group[0].dep.target.module, "?"),
                    "producers": producers, "widths": widths, "lrfx_groups": lrfx_groups,
                    "lrfx_blocked": [g for g in lrfx_groups if not groups.groups[g].prunable]})
    return out


def _try_forward(m: nn.Module, dense_macs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"shapes": channels_of(m)}
    try:
        with torch.no_grad():
            m.eval()(torch.zeros(2, 1, 28, 28))
        out["runs"] = True
        out["macs"] = lrfx.count_macs(m, X1) / dense_macs
    except Exception as exc:  # recorded
        out["runs"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:400]
    return out


def tp_default_scope(model: nn.Module, dense_macs: int, groups: Groups,
                     ratio: float = 0.3) -> dict[str, Any]:
    """What Torch-Pruning does when it is not told about lrfx's blocked groups (only the
    classifier ignored): its coupled groups; for each of its groups holding a blocked producer,
    whether the model still runs after Torch-Pruning removes that group's channel 0; and
    whether a global BN-scale pruning at ``ratio`` gives a model that runs."""
    out: dict[str, Any] = {"groups": tp_group_structure(model, groups), "one_channel": {}}
    for g in out["groups"]:
        if not g["lrfx_blocked"]:
            continue
        m = copy.deepcopy(model).eval()
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=X1)
        root = m.get_submodule(g["root"])
        group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=[0])
        group.prune()
        out["one_channel"][g["root"]] = _try_forward(m, dense_macs)
    m = copy.deepcopy(model).eval()
    tp_pruner(m, "slim", ratio, None).step()
    out["global_ratio"] = {"ratio": ratio, **_try_forward(m, dense_macs)}
    return out


# --- the correctness check ------------------------------------------------------------------------


def recover_plan(full: nn.Module, pruned: nn.Module, groups: Groups) -> dict[str, Any]:
    """The channels a structurally pruned copy kept, from exact row equality: for every
    conv/linear layer (in module order), its kept input channels are its input group's kept
    channels; the pruned weight's rows must be rows of the unpruned weight sliced to them."""
    kept: dict[int, list[int]] = {}
    problems: list[str] = []
    full_mods = dict(full.named_modules())
    for name, pm in pruned.named_modules():
        if not isinstance(pm, (nn.Conv2d, nn.Linear)):
            continue
        fm = full_mods[name]
        w, wp = fm.weight.detach(), pm.weight.detach()
        gin = groups.in_group.get(name)
        cin = list(range(w.shape[1]))
        if gin is not None and gin.index in kept:
            cin = kept[gin.index]
        if wp.shape[1] != len(cin):
            problems.append(f"{name}: {wp.shape[1]} input channels, the recovered plan gives "
                            f"{len(cin)} (input group {gin.name if gin else None})")
            continue
        ws = w[:, cin]
        rows = []
        for j in range(wp.shape[0]):
            hit = [i for i in range(ws.shape[0]) if torch.equal(ws[i], wp[j])]
            if len(hit) != 1:
                problems.append(f"{name}: pruned row {j} matches {len(hit)} unpruned rows")
                break
            rows.append(hit[0])
        else:
            if rows != sorted(rows):
                problems.append(f"{name}: kept rows out of order {rows}")
            g = groups.out_group.get(name)
            if g is None:
                if len(rows) != w.shape[0]:
                    problems.append(f"{name}: {len(rows)} of {w.shape[0]} outputs kept, but "
                                    "lrfx has no group for them")
                continue
            if g.index in kept and kept[g.index] != rows:
                problems.append(f"{name}: keeps other channels than its group's first producer")
            kept.setdefault(g.index, rows)
    # the BatchNorms must hold the kept channels' parameters and statistics exactly
    for name, pm in pruned.named_modules():
        if isinstance(pm, _BNS):
            fm = full_mods[name]
            g = next((g for g in groups.groups if name in g.norms), None)
            idx = kept.get(g.index, list(range(fm.num_features))) if g else list(
                range(fm.num_features))
            same = (len(idx) == pm.num_features and all(
                torch.equal(getattr(fm, a).detach()[idx], getattr(pm, a).detach())
                for a in ("weight", "bias", "running_mean", "running_var")))
            if not same:
                problems.append(f"{name}: BatchNorm entries differ from the kept channels")
    by_index = {g.index: g for g in groups.groups}
    layers, blocked = {}, []
    for i, rows in kept.items():
        g = by_index[i]
        if len(rows) == g.channels:
            continue
        if not g.prunable:
            blocked.append({"group": g.name, "kept": len(rows), "of": g.channels,
                            "lrfx_reason": g.reason})
            continue
        layers[g.name] = lrfx.ChannelPlan("prune", tuple(rows), g.channels)
    return {"plan": lrfx.RankPlan(layers), "problems": problems, "pruned_blocked": blocked,
            "kept": {by_index[i].name: len(r) for i, r in kept.items()}}


@torch.no_grad()
def check_same_channels(full: nn.Module, pruned: nn.Module, groups: Groups, data: Data,
                        dense_macs: int) -> dict[str, Any]:
    rec = recover_plan(full, pruned, groups)
    out: dict[str, Any] = {"problems": rec["problems"], "tp_pruned_blocked": rec["pruned_blocked"],
                           "kept": rec["kept"]}
    if rec["problems"] or rec["pruned_blocked"]:
        return out
    mine = lrfx.apply(copy.deepcopy(full).eval(), rec["plan"], X1).eval()
    pruned.eval()
    x = data.xte[:512]
    diff = (mine(x) - pruned(x)).abs()
    out.update(max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
               same_argmax_512=float((mine(x).argmax(1) == pruned(x).argmax(1)).float().mean()),
               acc_tp=data.test(pruned), acc_lrfx=data.test(mine),
               macs_tp=lrfx.count_macs(pruned, X1) / dense_macs,
               macs_lrfx=lrfx.count_macs(mine, X1) / dense_macs,
               params_tp=params_of(pruned), params_lrfx=params_of(mine),
               same_shapes=channels_of(pruned) == {k: v for k, v in channels_of(mine).items()
                                                   if k in channels_of(pruned)})
    return out


# --- arms -----------------------------------------------------------------------------------------


def arm_slim(penalty: str, data: Data, args: argparse.Namespace, budgets: list[float],
             dense_macs: int, save: Callable[[dict[str, Any]], None], normalize: str = "none"
             ) -> dict[str, Any]:
    model = fresh()
    opt = sgd(model, args.lr, args.wd)
    slim = lrfx.Slimming(model, X1, penalty=penalty, s=args.s, form=args.form, optimizer=opt)
    sched = schedule(opt, data, args)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        slim.after_backward(m)
        return loss.item()

    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(args.sparse_epochs), opt, sched, step,
                        after_batch=lambda k: slim.after_step(model))
    res: dict[str, Any] = train_record(model, data, losses, time.perf_counter() - t0,
                                       args.sparse_epochs * data.steps_per_epoch)
    res.update(penalty=repr(slim), scales=list(slim.scales),
               small_frac=small_frac(bn_weights(model, slim.scales)),
               sparsity_1e3=slim.sparsity(model, tol=1e-3), budgets={})
    save(res)
    model.eval()
    for b in budgets:
        t = time.perf_counter()
        plan = slim.plan(model, macs=b, normalize=normalize)
        small = slim.finalize(model, macs=b, normalize=normalize)
        r = {"kept": {k: len(getattr(v, "keep", ())) for k, v in plan.layers.items()},
             "threshold": plan.settings.get("threshold"), "finalize_seconds":
             time.perf_counter() - t}
        r.update(evaluate_budget(small, data, args, dense_macs, factored=False))
        res["budgets"][str(b)] = r
        log(f"lrfx_{penalty}", b, r)
        save(res)
    return res


def arm_tp_slim(data: Data, args: argparse.Namespace, budgets: list[float], dense_macs: int,
                groups: Groups, save: Callable[[dict[str, Any]], None],
                checks: dict[str, Any]) -> dict[str, Any]:
    model = fresh()
    reg = tp_pruner(model, "slim", 0.5, groups, reg=args.s)  # the regularizer's pruner
    opt = sgd(model, args.lr, args.wd)
    sched = schedule(opt, data, args)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        reg.regularize(m)
        return loss.item()

    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(args.sparse_epochs), opt, sched, step)
    res: dict[str, Any] = train_record(model, data, losses, time.perf_counter() - t0,
                                       args.sparse_epochs * data.steps_per_epoch)
    penalized = [n for n, m in model.named_modules()
                 if isinstance(m, _BNS) and m not in reg.ignored_layers]
    res.update(scales=penalized, small_frac=small_frac(bn_weights(model, penalized)),
               budgets={})
    save(res)
    model.eval()
    for b in budgets:
        t = time.perf_counter()
        small, info = tp_prune_to(model, "slim", b, dense_macs, groups)
        info["prune_seconds"] = time.perf_counter() - t
        info["kept"] = channels_of(small)
        checks[str(b)] = check_same_channels(model, small, groups, data, dense_macs)
        log("check", b, checks[str(b)])
        info.update(evaluate_budget(small, data, args, dense_macs, factored=False))
        res["budgets"][str(b)] = info
        log("tp_slim", b, info)
        save(res)
    return res


def plain_trained(data: Data, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint trained plainly for the sparse epochs (cached on disk for ``--resume``)."""
    cache = Path(args.cache_dir) / (f"prune_fmnist_{args.model}_plain_{args.sparse_epochs}"
                                    f"_{args.ft_epochs}_{len(data.xtr)}_{args.seed}.pt")
    model = fresh()
    if cache.exists():
        blob = torch.load(cache, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["record"]
    opt = sgd(model, args.lr, args.wd)
    sched = schedule(opt, data, args)
    t0 = time.perf_counter()
    losses = run_epochs(model, data, range(args.sparse_epochs), opt, sched, plain_step)
    rec = train_record(model, data, losses, time.perf_counter() - t0,
                       args.sparse_epochs * data.steps_per_epoch)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "record": rec}, cache)
    return model.eval(), rec


def arm_tp_magnitude(data: Data, args: argparse.Namespace, budgets: list[float],
                     dense_macs: int, groups: Groups, save: Callable[[dict[str, Any]], None]
                     ) -> dict[str, Any]:
    model, rec = plain_trained(data, args)
    res: dict[str, Any] = {**rec, "small_frac": small_frac(bn_weights(
        model, groups.prunable_norms)), "budgets": {}}
    save(res)
    for b in budgets:
        t = time.perf_counter()
        small, info = tp_prune_to(model, "magnitude", b, dense_macs, groups)
        info["prune_seconds"] = time.perf_counter() - t
        info["kept"] = channels_of(small)
        info.update(evaluate_budget(small, data, args, dense_macs, factored=False))
        res["budgets"][str(b)] = info
        log("tp_magnitude", b, info)
        save(res)
    return res


def arm_lowrank(data: Data, args: argparse.Namespace, budgets: list[float], dense_macs: int,
                save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    model, rec = plain_trained(data, args)
    res: dict[str, Any] = {**rec, "budgets": {}}
    for b in budgets:
        t = time.perf_counter()
        small = lrfx.compress(copy.deepcopy(model), X1, macs=b, calibration=data.calibration)
        plan = lrfx.facts_of(small).plan
        info: dict[str, Any] = {"compress_seconds": time.perf_counter() - t,
                                "ranks": {n: getattr(e, "rank", None) for n, e in plan.items()
                                          if e.lowrank}
                                if plan else {}}
        info.update(evaluate_budget(small, data, args, dense_macs, factored=True))
        res["budgets"][str(b)] = info
        log("lrfx_lowrank", b, info)
        save(res)
    return res


def arm_gates(data: Data, args: argparse.Namespace, budgets: list[float], dense_macs: int,
              save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    fact = lrfx.compress(fresh(), X1, macs=args.gates_start, calibration=data.calibration)
    gated = lrfx.add_rank_gates(fact).eval()
    compress_seconds = time.perf_counter() - t0
    gated_macs = lrfx.count_macs(gated, X1)
    acc_start = data.test(gated)
    decay = lrfx.ProductDecay(args.wd)
    opt = sgd(gated, args.lr, 0.0)
    slim = lrfx.Slimming(gated, X1, penalty="tl1", s=args.s, form=args.form, optimizer=opt,
                         scales="all")
    sched = schedule(opt, data, args)

    def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(m(x), y)
        penalty = decay.penalty(m)
        (loss if penalty is None else loss + penalty).backward()
        slim.after_backward(m)
        return loss.item()

    t0 = time.perf_counter()
    losses = run_epochs(gated, data, range(args.sparse_epochs), opt, sched, step,
                        after_batch=lambda k: slim.after_step(gated))
    res: dict[str, Any] = train_record(gated, data, losses, time.perf_counter() - t0,
                                       args.sparse_epochs * data.steps_per_epoch)
    gates = [n for n in slim.scales if not isinstance(gated.get_submodule(n), _BNS)]
    bns = [n for n in slim.scales if n not in gates]
    res.update(compress_seconds=compress_seconds, gated_macs=gated_macs / dense_macs,
               acc_compressed_start=acc_start, penalty=repr(slim), n_gates=len(gates),
               n_bn=len(bns),
               small_frac=small_frac(bn_weights(gated, slim.scales)),
               small_frac_gates=small_frac(bn_weights(gated, gates)) if gates else None,
               small_frac_bn=small_frac(bn_weights(gated, bns)) if bns else None,
               skipped=slim.skipped, budgets={})
    save(res)
    gated.eval()
    for b in budgets:
        f = b * dense_macs / gated_macs
        t = time.perf_counter()
        small = slim.finalize(gated, macs=min(f, 1.0))
        info: dict[str, Any] = {"fraction_of_gated": f, "finalize_seconds":
                                time.perf_counter() - t}
        info.update(evaluate_budget(small, data, args, dense_macs, factored=True))
        res["budgets"][str(b)] = info
        log("lrfx_gates", b, info)
        save(res)
    return res


def log(name: str, b: float, r: dict[str, Any]) -> None:
    keys = ("acc_no_ft", "acc_bn_recal", "acc_ft", "macs", "max_abs_logit_diff", "acc_tp",
            "acc_lrfx", "problems", "tp_pruned_blocked")
    print(name, b, {k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
                    for k in keys if k in r}, flush=True)


# --- per-step overhead ----------------------------------------------------------------------------


def overhead(data: Data, args: argparse.Namespace, groups: Groups) -> dict[str, Any]:
    """Median seconds per training step of plain SGD, each lrfx penalty and Torch-Pruning's
    regularizer, interleaved round by round on one batch (robust to the machine's other load)."""
    xb, yb = next(iter(data.epoch(0)))
    arms: dict[str, tuple[nn.Module, Callable[[nn.Module], None], Callable[[nn.Module], None]]]
    arms = {}
    m = fresh()
    arms["plain"] = (m, lambda _: None, lambda _: None)
    opts = {}
    for name, pen in SLIM_ARMS.items():
        m = fresh()
        opts[name] = sgd(m, 1e-3, args.wd)
        sl = lrfx.Slimming(m, X1, penalty=pen, s=args.s, form=args.form, optimizer=opts[name])
        arms[name] = (m, sl.after_backward, sl.after_step)
    m = fresh()
    reg = tp_pruner(m, "slim", 0.5, groups, reg=args.s)
    arms["tp_slim"] = (m, reg.regularize, lambda _: None)
    for name, (m, _, _) in arms.items():
        opts.setdefault(name, sgd(m, 1e-3, args.wd))
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.overhead_steps + 2):
        for k, (m, after_backward, after_step) in arms.items():
            m.train()
            t = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()
            after_backward(m)
            opts[k].step()
            after_step(m)
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"steps": args.overhead_steps, "batch": len(xb), "median_step_seconds": med,
            "relative_to_plain": {k: v / med["plain"] for k, v in med.items()}}


# --- the s pilot ----------------------------------------------------------------------------------


def pilot(args: argparse.Namespace) -> None:
    data = Data(5000, 1000, args.batch, args.seed)
    epochs = args.pilot_epochs or args.sparse_epochs
    args.sparse_epochs = epochs  # the pilot's schedule: its epochs + ft_epochs, cosine
    suffix = "" if epochs == 2 else f"_e{epochs}"
    out = Path(args.out or ROOT / "results" / f"prune_fmnist_pilot{suffix}.json")
    results: dict[str, Any] = {"config": config(args, data), "runs": []}
    results["config"]["dense_acc_1k"] = data.test(fresh())
    for s in [float(v) for v in args.pilot_s.split(",")]:
        for penalty in args.pilot_penalties.split(","):
            model = fresh()
            opt = sgd(model, args.lr, args.wd)
            slim = lrfx.Slimming(model, X1, penalty=penalty, s=s, form=args.form, optimizer=opt)
            sched = schedule(opt, data, args)

            def step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, sl: Any = slim) -> float:
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                sl.after_backward(m)
                return loss.item()

            t0 = time.perf_counter()
            run_epochs(model, data, range(args.sparse_epochs), opt, sched, step,
                       after_batch=lambda k, sl=slim, m=model: sl.after_step(m))
            w = torch.cat([x.detach().abs() for x in bn_weights(model, slim.scales)])
            model.eval()
            small = slim.finalize(model, macs=0.5)
            r = {"s": s, "penalty": penalty, "epochs": epochs,
                 "steps": epochs * data.steps_per_epoch, "acc": data.test(model),
                 "small_frac": float((w < 1e-2).float().mean()),
                 "frac_below_0.1": float((w < 0.1).float().mean()),
                 "median_gamma": float(w.median()), "acc_pruned_0.5_no_ft": data.test(small),
                 "seconds": time.perf_counter() - t0}
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            out.write_text(json.dumps(results, indent=1, default=str))


# --- report ---------------------------------------------------------------------------------------


def config(args: argparse.Namespace, data: Data) -> dict[str, Any]:
    return {**vars(args), "train_images": len(data.xtr), "test_images": len(data.xte),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_pruning": importlib.metadata.version("torch-pruning") if tp else None,
            "torch_pruning_module_version": getattr(tp, "__version__", None),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "pilot_note": PILOT_NOTE,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("acc_no_ft", "right after pruning"), ("acc_bn_recal", "BN recalibrated"),
            ("acc_ft", f"after {results['config']['ft_epochs']} fine-tune epoch(s)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    markers = dict(zip(ALL_ARMS, "os^DvPX<>", strict=True))
    for ax, (key, title) in zip(axes, keys, strict=True):
        dense = results["config"]["dense_checkpoint_acc"]
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense checkpoint ({dense:.2f} %)")
        for arm, r in results["arms"].items():
            pts = sorted((v["macs"], v[key]) for v in r.get("budgets", {}).values() if key in v)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers.get(arm, "o"), label=arm)
        ax.set_xlabel("MACs (fraction of dense)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "acc_ft":
            lo = min((v["acc_ft"] for r in results["arms"].values()
                      for v in r.get("budgets", {}).values() if "acc_ft" in v), default=80)
            ax.set_ylim(max(lo - 1, 0), dense + 1)
    axes[-1].legend(fontsize=7)
    c = results["config"]
    fig.suptitle(f"Fashion-MNIST {c['model']}: {c['sparse_epochs']} sparse + {c['ft_epochs']} "
                 f"fine-tune epochs from the dense checkpoint, s={c['s']} ({c['form']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=("resnet20", "vgg_small"))
    ap.add_argument("--sparse-epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--methods", default=",".join(ALL_ARMS))
    ap.add_argument("--s", type=float, default=5e-3, help="sparsity weight (every slim arm)")
    ap.add_argument("--form", default="subgradient", choices=("subgradient", "prox"))
    ap.add_argument("--gates-start", type=float, default=0.6,
                    help="MACs of the factored model the gates arm starts from")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--train-size", type=int, default=60000)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3k / 1k images, 1 + 1 epochs, one budget (0.5)")
    ap.add_argument("--pilot", action="store_true", help="the s pilot instead of the arms")
    ap.add_argument("--pilot-s", default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--overhead-steps", type=int, default=20,
                    help="interleaved timing steps per method (0: skip)")
    ap.add_argument("--pilot-epochs", type=int, default=0,
                    help="pilot epochs over its 5k images (0: --sparse-epochs)")
    ap.add_argument("--pilot-penalties", default="l1,lp,tl1")
    ap.add_argument("--resume", action="store_true", help="skip arms already done in --out")
    ap.add_argument("--cache-dir", default="/tmp",
                    help="where the plainly trained model is kept between arms / runs")
    ap.add_argument("--out", default=None,
                    help="default bench/results/prune_fmnist.json (resnet20) or "
                         "prune_fmnist_<model>.json (--quick: prune_fmnist_quick*.json)")
    args = ap.parse_args()
    if tp is None:
        raise SystemExit("needs Torch-Pruning: .venv/bin/pip install torch-pruning")
    if args.quick:
        args.train_size, args.test_size = min(args.train_size, 3000), min(args.test_size, 1000)
        args.sparse_epochs, args.ft_epochs, args.budgets = 1, 1, "0.5"
    train_methods.MODEL = args.model
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    if args.pilot:
        pilot(args)
        return
    if args.out is None:
        name = "prune_fmnist" + ("_quick" if args.quick else "") + (
            "" if args.model == "resnet20" else f"_{args.model}")
        args.out = str(ROOT / "results" / f"{name}.json")
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(ALL_ARMS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {ALL_ARMS}")
    data = Data(args.train_size, args.test_size, args.batch, args.seed)
    dense = fresh()
    dense_macs = lrfx.count_macs(dense, X1)
    groups = Groups(dense)
    out = Path(args.out)
    results: dict[str, Any] = {}
    if args.resume and out.exists():
        results = json.loads(out.read_text())
        results.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
    results.setdefault("arms", {})
    results.setdefault("check_same_channels", {})
    cfg = {**config(args, data), "dense_checkpoint_acc": data.test(dense),
           "dense_macs": dense_macs, "dense_params": params_of(dense),
           "channel_groups": groups.summary(), "tp_ignored_layers": groups.ignored}
    if "config" in results:  # resumed: keep the first run's config, note this one's
        results.setdefault("resume_configs", []).append(
            {k: cfg[k] for k in ("load_average_at_start", "torch_threads", "s", "methods")})
    else:
        results["config"] = cfg
    if "tp_default_scope" not in results:  # on the dense checkpoint
        results["tp_default_scope"] = tp_default_scope(dense, dense_macs, groups)
        print("tp_default_scope", {k: v.get("error", "runs") for k, v in
                                   results["tp_default_scope"]["one_channel"].items()},
              results["tp_default_scope"]["global_ratio"].get("error", "runs"), flush=True)
    t_all = time.perf_counter()
    wall_before = results.get("wall_seconds_previous_runs", 0.0) + results.get(
        "wall_seconds", 0.0) if args.resume else 0.0
    results["wall_seconds_previous_runs"] = wall_before

    def save() -> None:
        results["wall_seconds"] = time.perf_counter() - t_all
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))

    def saver(arm: str) -> Callable[[dict[str, Any]], None]:
        def f(r: dict[str, Any]) -> None:
            results["arms"][arm] = r
            save()
        return f

    if args.overhead_steps and "overhead" not in results:
        results["overhead"] = overhead(data, args, groups)
        print("overhead", json.dumps({k: round(v, 3) for k, v in
                                      results["overhead"]["relative_to_plain"].items()}),
              flush=True)
    save()
    for arm in methods:
        if results["arms"].get(arm, {}).get("done"):
            print(arm, "done already, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(arm, "...", flush=True)
        if arm in SLIM_ARMS:
            r = arm_slim(SLIM_ARMS[arm], data, args, budgets, dense_macs, saver(arm),
                         normalize="mean" if arm.endswith("_mean") else "none")
        elif arm == "tp_slim":
            results["check_same_channels"] = {}
            r = arm_tp_slim(data, args, budgets, dense_macs, groups, saver(arm),
                            results["check_same_channels"])
        elif arm == "tp_magnitude":
            r = arm_tp_magnitude(data, args, budgets, dense_macs, groups, saver(arm))
        elif arm == "lrfx_lowrank":
            r = arm_lowrank(data, args, budgets, dense_macs, saver(arm))
        else:
            r = arm_gates(data, args, budgets, dense_macs, saver(arm))
        r["done"] = True
        r["arm_seconds"] = time.perf_counter() - t0
        results["arms"][arm] = r
        print(arm, f"done in {r['arm_seconds']:.0f} s; trained acc {r['acc_trained']:.2f}, "
              f"small gammas {r.get('small_frac')}", flush=True)
        save()
    plain = results["arms"].get("tp_magnitude", {}).get("seconds_per_step")
    results["seconds_per_step_from_epochs"] = {
        a: {"seconds": r["seconds_per_step"],
            "relative_to_plain": r["seconds_per_step"] / plain if plain else None}
        for a, r in results["arms"].items() if "seconds_per_step" in r}
    results["load_average_at_end"] = os.getloadavg()
    save()
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
