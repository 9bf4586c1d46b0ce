"""Structural channel pruning across the torchvision CNN zoo: groups, exactness, equivalence.

For every CNN of the zoo where channel pruning makes sense (random weights, ``weights=None``,
eval mode, every BatchNorm's gamma / beta / running statistics randomized by a seeded generator
so that scores and outputs are not all ties), on one ``randn(1, 3, s, s)`` (``s`` = 224, or a
smaller size for a model listed in ``SIZES``), this benchmark records:

* **groups** (:func:`lrfx.channel_groups`): total, prunable, blocked; the blocked groups' reasons
  counted by kind (layer and node names stripped: "grouped conv", "reaches the model's output",
  "used by view", ...); the prunable channels as a fraction of all the groups' channels;
* **keep-all identity**: a plan keeping every channel of every prunable group, applied with
  :func:`lrfx.apply`: max abs difference of its output from the model's (must be ~0);
* **prune at macs=0.5** (:func:`lrfx.channel_plan` then :func:`lrfx.apply`): predicted
  ``plan.macs`` equal to ``lrfx.count_macs(pruned, x)`` (exact), ``plan.params`` equal to the
  pruned model's parameter count, the report's figures, achieved MACs and parameter ratios,
  output shape unchanged, the caller's model left untouched, the time of each call.
  Models without any BatchNorm on a prunable group (convnext_tiny, squeezenet1_1) make
  ``channel_plan`` raise, as documented; they are then scored with ``scores=`` the L1 norm of
  each group's producer filters (recorded as ``scores``);
* **pruned == masked** (models whose pruned groups all have BatchNorms, or no norm at all, and no
  LayerNorm): a copy of the dense model with the removed channels' BN weight and bias zeroed at
  every norm member of their group (at the member's offset; at the producers' weight and bias
  for a group without norms) must compute what the pruned model does (max abs and relative
  difference).

Any exception is recorded (type and first line of the message, plus the end of the traceback)
and the sweep goes on. The JSON is rewritten after every model.

Run (from the repository root; ~1.5 min on the 2-core box, 1 thread)::

    .venv/bin/python bench/prune_zoo.py
    .venv/bin/python bench/prune_zoo.py --models resnet18,convnext_tiny --size 128
    .venv/bin/python bench/prune_zoo.py --report        # table + PNG from the JSON

Writes ``bench/results/prune_zoo.json`` (machine info, settings, per-model records, summary) and
``bench/results/prune_zoo.png`` (prunable fraction of channels and achieved MACs / params ratios
per model); prints a table and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import lrfx
from lrfx.plan import ChannelPlan, RankPlan

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "prune_zoo.json"

#: The models, with the keyword arguments they are built with (besides ``weights=None``).
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {},
    "vgg11_bn": {}, "vgg16_bn": {}, "densenet121": {}, "mobilenet_v2": {},
    "mobilenet_v3_small": {}, "mobilenet_v3_large": {}, "efficientnet_b0": {},
    "efficientnet_v2_s": {}, "regnet_y_400mf": {}, "regnet_x_400mf": {}, "convnext_tiny": {},
    "shufflenet_v2_x1_0": {}, "mnasnet0_5": {},
    "googlenet": {"aux_logits": False, "init_weights": True}, "squeezenet1_1": {},
}
#: Input sizes other than ``--size`` for models too slow at it on the 2-core box (none needed so
#: far; a model listed here records the size it ran at).
SIZES: dict[str, int] = {}
#: The MACs budget of the pruning plan (a fraction of the dense model's).
MACS = 0.5
#: Tolerances: keep-all output vs model (abs), pruned vs masked (relative to max |output|).
IDENTITY_TOL = 1e-5
MASKED_RTOL = 1e-4

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------


def build(name: str, seed: int) -> nn.Module:
    """The model with random weights and distinct BN scales, shifts and statistics, eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **MODELS.get(name, {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BNS):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.05)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


_REASONS = [  # (pattern on a blocked group's reason, its kind)
    (r"reaches the model's output", "reaches the model's output"),
    (r"is a grouped conv", "grouped conv"),
    (r"is called \d+ times", "module called more than once"),
    (r"shares its weight", "shared weight"),
    (r"comes from an untracked input", "untracked input of a cat"),
    (r"combines channel layouts that do not line up", "layouts do not line up"),
    (r"concatenates tensors whose channels differ", "cat of differing channels"),
    (r"adds or multiplies tensors whose channels differ", "binary op of differing channels"),
    (r"combines the channels with a per-channel tensor", "per-channel tensor not followed"),
    (r"no conv or linear layer produces", "no producer"),
]


def reason_kind(reason: str) -> str:
    """A blocked group's reason without layer / node names."""
    for pattern, kind in _REASONS:
        if re.search(pattern, reason):
            return kind
    m = re.match(r"used by \S+ \((.*)\), which lrfx does not follow", reason)
    if m:
        return f"used by {m.group(1)}"
    return re.sub(r"\b[\w.]*\d[\w.]*\b", "<name>", reason)  # unknown: names with digits go


def l1_scores(model: nn.Module, groups: Any) -> dict[str, torch.Tensor]:
    """Per prunable group, the L1 norm of its producers' output filters (averaged): the scores
    given to :func:`lrfx.channel_plan` for a model without BatchNorms."""
    out = {}
    for g in groups.prunable:
        rows = [model.get_submodule(t).weight.detach().abs().flatten(1).sum(1)
                for t in g.producers]
        if rows:
            out[g.name] = torch.stack(rows).mean(0)
    return out


def masked_model(model: nn.Module, groups: Any, plan: RankPlan) -> nn.Module:
    """A copy of the dense model with the plan's removed channels zeroed (BN weight and bias) at
    every norm member of their group (at its producers, weight and bias, for a group without
    norms): what the structurally pruned model must compute."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, entry in plan.channels.items():
            g = groups[name]
            gone = torch.ones(g.channels, dtype=torch.bool)
            gone[list(entry.keep)] = False
            idx = gone.nonzero().flatten()
            norms = [m for m in g.members if m.role == "norm"]
            for m in norms or [m for m in g.members if m.role == "out"]:
                mod = masked.get_submodule(m.target)
                mod.weight[idx + m.offset] = 0
                if mod.bias is not None:
                    mod.bias[idx + m.offset] = 0
    return masked


def maskable(model: nn.Module, groups: Any, plan: RankPlan) -> tuple[bool, str]:
    """Whether the masked check applies: every pruned group's norms are BatchNorms (or it has
    none, and is zeroed at its producers), no LayerNorm / attribute member (zeroing those is not
    what pruning does)."""
    for name in plan.channels:
        g = groups[name]
        norms = [m for m in g.members if m.role == "norm"]
        for m in g.members:
            if m.role in ("param", "shape"):
                return False, f"group {name} has a {m.role} member ({m.target})"
        for m in norms:
            if not isinstance(model.get_submodule(m.target), _BNS):
                kind = type(model.get_submodule(m.target)).__name__
                return False, f"group {name} has a {kind} norm ({m.target})"
    return True, ""


def _err(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = float((a - b).abs().max())
    return d, d / max(float(b.abs().max()), 1e-30)


def one(name: str, size: int, seed: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": name, "input_size": size}
    t_start = time.perf_counter()
    stage = "build"
    try:
        model = build(name, seed)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rec["params"] = sum(p.numel() for p in model.parameters())

        stage = "channel_groups"
        t0 = time.perf_counter()
        groups = lrfx.channel_groups(model, x)
        rec["t_channel_groups_s"] = time.perf_counter() - t0
        total_ch = sum(g.channels for g in groups)
        prunable_ch = sum(g.channels for g in groups.prunable)
        rec.update(
            groups=len(groups), prunable=len(groups.prunable), blocked=len(groups.blocked),
            channels=total_ch, prunable_channels=prunable_ch,
            prunable_channel_fraction=prunable_ch / total_ch if total_ch else 0.0,
            blocked_reasons=dict(Counter(reason_kind(g.reason) for g in groups.blocked)
                                 .most_common()),
            blocked_examples={},
        )
        for g in groups.blocked:  # one full reason per kind, to read what the kind means
            rec["blocked_examples"].setdefault(reason_kind(g.reason), f"{g.name}: {g.reason}")

        stage = "count_macs"
        rec["macs"] = lrfx.count_macs(model, x)

        stage = "identity"
        keep_all = RankPlan({g.name: ChannelPlan("prune", tuple(range(g.channels)), g.channels)
                             for g in groups.prunable})
        if keep_all.layers:
            same = lrfx.apply(model, keep_all, x)
            with torch.no_grad():
                rec["identity_max_abs_diff"] = float((same(x) - y).abs().max())
            rec["identity_ok"] = rec["identity_max_abs_diff"] <= IDENTITY_TOL
            del same
        else:
            rec["identity_max_abs_diff"] = None

        stage = "channel_plan"
        t0 = time.perf_counter()
        rec["scores"] = "bn"
        try:
            plan = lrfx.channel_plan(model, x, macs=MACS)
        except lrfx.LrfxError as exc:
            if "no channel group has a score" not in str(exc):
                raise
            # no BatchNorm on any prunable group (convnext, squeezenet): the documented way out
            rec["scores"] = "l1 (no BN scales: " + _err(exc)[:60] + "...)"
            plan = lrfx.channel_plan(model, x, macs=MACS, scores=l1_scores(model, groups))
        rec["t_channel_plan_s"] = time.perf_counter() - t0
        rec["pruned_groups"] = len(plan.channels)
        rec["unscored_groups"] = len(plan.settings.get("unscored", []))
        rec["pruned_channels"] = sum(e.channels - len(e.keep) for e in plan.channels.values())

        stage = "apply"
        t0 = time.perf_counter()
        pruned = lrfx.apply(model, plan, x)
        rec["t_apply_s"] = time.perf_counter() - t0

        stage = "check"
        with torch.no_grad():
            yp = pruned(x)
        rec["shape_ok"] = tuple(yp.shape) == tuple(y.shape)
        rec["model_untouched"] = all(torch.equal(v, model.state_dict()[k])
                                     for k, v in state.items())
        macs_after = lrfx.count_macs(pruned, x)
        params_after = sum(p.numel() for p in pruned.parameters())
        report = pruned.meta["lrfx"].report  # type: ignore[union-attr,index]
        rec.update(
            plan_macs=plan.macs, macs_after=macs_after, macs_exact=plan.macs == macs_after,
            plan_params=plan.params, params_after=params_after,
            params_exact=plan.params == params_after,
            macs_ratio=macs_after / rec["macs"], params_ratio=params_after / rec["params"],
            within_budget=macs_after <= MACS * rec["macs"],
            report_ok=(report.macs_before == rec["macs"] and report.macs_after == plan.macs
                       and len(report.pruned) == len(plan.channels)),
        )

        stage = "masked"
        ok, why = maskable(model, groups, plan)
        if ok and plan.channels:
            with torch.no_grad():
                ym = masked_model(model, groups, plan)(x)
            rec["masked_max_abs_diff"], rec["masked_rel_diff"] = _diff(yp, ym)
            rec["masked_ok"] = rec["masked_rel_diff"] <= MASKED_RTOL
        else:
            rec["masked_max_abs_diff"] = rec["masked_rel_diff"] = None
            rec["masked_skipped"] = why or "nothing pruned"
        rec["ok"] = all(rec.get(k) is not False for k in (
            "identity_ok", "shape_ok", "model_untouched", "macs_exact", "params_exact",
            "within_budget", "report_ok", "masked_ok"))
    except Exception as exc:  # one model must not stop the sweep
        rec.update(ok=False, error=_err(exc), error_stage=stage,
                   trace=traceback.format_exc()[-2000:])
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lrfx": lrfx.__version__,
        "torch_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name"))
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
            capture_output=True, text=True, check=True).stdout.strip())
    return info


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in records if "error" not in r]

    def count(key: str) -> str:
        vals = [r.get(key) for r in done if r.get(key) is not None]
        return f"{sum(bool(v) for v in vals)}/{len(vals)}"

    reasons: Counter[str] = Counter()
    for r in done:
        reasons.update(r.get("blocked_reasons", {}))
    masked = [r["masked_rel_diff"] for r in done if r.get("masked_rel_diff") is not None]
    ident = [r["identity_max_abs_diff"] for r in done
             if r.get("identity_max_abs_diff") is not None]
    return {
        "models": len(records),
        "errors": {r["model"]: r["error"] for r in records if "error" in r},
        "all_checks_ok": count("ok"),
        "macs_exact": count("macs_exact"),
        "params_exact": count("params_exact"),
        "identity_ok": count("identity_ok"),
        "masked_ok": count("masked_ok"),
        "shape_ok": count("shape_ok"),
        "within_budget": count("within_budget"),
        "model_untouched": count("model_untouched"),
        "report_ok": count("report_ok"),
        "max_identity_abs_diff": max(ident) if ident else None,
        "max_masked_rel_diff": max(masked) if masked else None,
        "groups": sum(r["groups"] for r in done),
        "prunable_groups": sum(r["prunable"] for r in done),
        "blocked_reasons": dict(reasons.most_common()),
        "total_wall_s": sum(r.get("wall_s", 0.0) for r in records),
    }


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def table(records: list[dict[str, Any]]) -> str:
    head = (f"{'model':20} {'px':>3} {'grp':>4} {'prn':>4} {'blk':>4} {'ch%':>5} {'MACs':>5} "
            f"{'par':>5} {'exact':>5} {'ident':>8} {'masked':>8} {'s':>5}  top blocked reasons")
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['model']:20} {r['input_size']:>3} ERROR at {r['error_stage']}: "
                         f"{r['error']}")
            continue
        top = ", ".join(f"{k} {v}" for k, v in list(r["blocked_reasons"].items())[:3])
        exact = "yes" if r["macs_exact"] and r["params_exact"] else "NO"
        lines.append(
            f"{r['model']:20} {r['input_size']:>3} {r['groups']:>4} {r['prunable']:>4} "
            f"{r['blocked']:>4} {100 * r['prunable_channel_fraction']:>5.1f} "
            f"{r['macs_ratio']:>5.3f} {r['params_ratio']:>5.3f} {exact:>5} "
            f"{_fmt(r['identity_max_abs_diff'], '.1e'):>8} "
            f"{_fmt(r['masked_rel_diff'], '.1e'):>8} {r['wall_s']:>5.1f}  {top}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "error" not in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.3 * len(recs) + 1.2)))
    y = list(range(len(recs)))
    h = 0.27
    ax.barh([i - h for i in y], [r["prunable_channel_fraction"] for r in recs], h,
            color="tab:blue", label="prunable fraction of group channels")
    ax.barh(y, [r["macs_ratio"] for r in recs], h, color="tab:orange",
            label=f"MACs after / before (budget {MACS})")
    ax.barh([i + h for i in y], [r["params_ratio"] for r in recs], h, color="tab:green",
            label="params after / before")
    ax.axvline(MACS, color="0.4", lw=0.8, ls="--")
    labels = []
    for r in recs:
        flag = "" if r["ok"] else " (!)"
        masked = "" if r.get("masked_ok") is None else " m"
        l1 = "" if r.get("scores", "bn") == "bn" else " L1"
        labels.append(f"{r['model']} ({r['input_size']}){l1}{masked}{flag}")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("fraction")
    ax.set_title("lrfx channel pruning at macs=0.5 on the torchvision CNN zoo\n"
                 "m: pruned == masked checked; L1: scored by filter L1 norms (no BN); "
                 "(!): a check failed", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, records: list[dict[str, Any]], info: dict[str, Any],
          args: argparse.Namespace) -> None:
    doc = {
        "benchmark": "prune_zoo",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {
            "macs": MACS, "seed": args.seed, "default_size": args.size,
            "identity_tol": IDENTITY_TOL, "masked_rtol": MASKED_RTOL,
            "weights": "random (weights=None, seed), never downloaded; every BN gamma ~ "
                       "U(0.05, 1.05), beta ~ 0.1 N(0,1), mean ~ 0.1 N(0,1), var ~ U(0.5, 1.5)",
            "input": "randn(1, 3, s, s), seeded",
        },
        "summary": summarize(records),
        "models": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)


def report(records: list[dict[str, Any]], out: Path) -> None:
    plot(records, out.with_suffix(".png"))
    print()
    print(table(records))
    print()
    print(json.dumps({k: v for k, v in summarize(records).items()}, indent=1))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated (default: {', '.join(MODELS)})")
    p.add_argument("--size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (PNG next to it)")
    p.add_argument("--report", action="store_true", help="only the table and PNG from --out")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads(args.out.read_text())["models"], args.out)
        return 0
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(
        MODELS)
    info = machine_info(args.threads)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        rec = one(name, SIZES.get(name, args.size), args.seed)
        records.append(rec)
        status = (f"ERROR at {rec['error_stage']}: {rec['error']}" if "error" in rec else
                  f"groups {rec['prunable']}/{rec['groups']} prunable, "
                  f"MACs x{rec['macs_ratio']:.3f} exact={_fmt(rec['macs_exact'])} "
                  f"ok={_fmt(rec['ok'])}")
        print(f"[{i}/{len(names)}] {name}: {status}  [{rec['wall_s']:.1f} s]", flush=True)
        info["wall_s"] = time.perf_counter() - t0
        write(args.out, records, info, args)
        gc.collect()
    report(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
