"""MAC counts of the whole torchvision classification zoo: lrfx vs torchvision vs FlopCounterMode.

For every model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights,
nothing is downloaded), at the input size of its DEFAULT weights (``crop_size`` of the weights'
transforms), this benchmark:

* traces it with :func:`lrfx.trace` (ok / failed, and which submodules became leaves, with why);
* checks the traced ``GraphModule`` is faithful: its output equals the model's
  (``torch.allclose``, rtol 1e-4, atol 1e-5), max abs difference recorded;
* counts MACs with :func:`lrfx.count_macs` and compares them with ``weights.meta["_ops"]``
  (torchvision's "GFLOPS", which are really GMACs): relative error, pass within 0.5 %;
* runs ``torch.utils.flop_counter.FlopCounterMode`` on the model's forward and records
  ``flops / 2`` and whether it equals lrfx's count exactly (expected for models without
  attention; torch's counter misses the fused CPU attention kernels of ViT/Swin, so this is
  recorded, not required);
* where the counter disagrees, runs it again with grad enabled (no fused MHA fast path) and checks
  that counter + lrfx's own ``attention`` MACs (the uncounted CPU SDPA kernel) equal lrfx's total;
* records the wall time of each stage.

Each model runs in its own subprocess (``--worker``), so the big ones (vit_h_14 at 518 px,
regnet_y_128gf at 384 px) free all their memory when done, and a crash or a timeout costs one
record, not the sweep. The JSON is rewritten after every model, so a partial sweep is kept;
``--resume`` skips models already in it.

Run (from the repository root)::

    .venv/bin/python bench/zoo_macs.py                          # all ~80 models, 10-60 min
    .venv/bin/python bench/zoo_macs.py --models resnet18,vit_b_16,swin_t
    .venv/bin/python bench/zoo_macs.py --resume                 # finish an interrupted sweep
    .venv/bin/python bench/zoo_macs.py --update --models vit_b_16   # rerun some, keep the rest
    .venv/bin/python bench/zoo_macs.py --report                 # table + PNG from the JSON

Writes ``bench/results/zoo_macs.json`` (per-model records, summary, machine info) and
``bench/results/zoo_macs.png`` (relative error per model); prints a table and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "zoo_macs.json"

#: |lrfx - torchvision| / torchvision must be within this to pass.
REL_TOL = 0.005
#: Parity of the traced graph module with the eager model.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# worker: one model, in its own process
# --------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return msg[:500]


def _flat_tensors(out: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _input_size(weights: Any) -> int:
    crop = weights.transforms.keywords["crop_size"]
    return int(crop if isinstance(crop, int) else crop[0])


def _build(name: str, size: int) -> Any:
    """The model with random weights, in eval mode, built for ``size`` px inputs."""
    import torch
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    # A ViT's position embedding is sized for one image size; the DEFAULT weights of vit_h_14
    # are the 518 px SWAG ones, which torchvision builds with image_size=518. No other model
    # in the zoo depends on the input size at construction.
    if isinstance(model, VisionTransformer) and model.image_size != size:
        del model
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, image_size=size)
    return model.eval()


def measure(name: str) -> dict[str, Any]:
    """Every figure of one model; each stage fails on its own, recording the reason."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    import lrfx

    t_start = time.perf_counter()
    rec: dict[str, Any] = {"model": name}
    weights = torchvision.models.get_model_weights(name).DEFAULT
    size = _input_size(weights)
    tv_gmacs = float(weights.meta["_ops"])
    rec.update(weights=str(weights), input_size=size, tv_gmacs=tv_gmacs)
    times: dict[str, float] = {}
    rec["times_s"] = times

    t = time.perf_counter()
    model = _build(name, size)
    times["build"] = time.perf_counter() - t
    rec["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        # 1. trace
        gm = None
        t = time.perf_counter()
        try:
            gm = lrfx.trace(model)
            rec["traced"] = True
            leaves = gm.meta["lrfx"].leaves
            rec["leaves"] = [
                {"name": lf.name, "type": lf.type, "reason": lf.reason} for lf in leaves
            ]
            rec["graph_nodes"] = len(gm.graph.nodes)
        except Exception as exc:
            rec["traced"] = False
            rec["trace_error"] = _reason(exc)
        times["trace"] = time.perf_counter() - t

        # 2. FlopCounterMode on the eager forward; its output is also the parity reference
        # (the mode only counts, it does not change the numerics), which saves one forward.
        ref = None
        t = time.perf_counter()
        try:
            with FlopCounterMode(display=False) as fc:
                ref = model(x)
            flops = int(fc.get_total_flops())
            rec["flop_counter_flops"] = flops
            rec["flop_counter_macs"] = flops // 2
            rec["flop_counter_by_op"] = {
                str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()
            }
        except Exception as exc:
            rec["flop_counter_error"] = _reason(exc)
        times["eager_forward_flop_counter"] = time.perf_counter() - t

        # 3. parity of the traced graph module
        if gm is not None and ref is not None:
            t = time.perf_counter()
            try:
                out = gm(x)
                a, b = _flat_tensors(ref), _flat_tensors(out)
                same_structure = len(a) == len(b) and all(
                    u.shape == v.shape for u, v in zip(a, b, strict=False)
                )
                rec["parity"] = same_structure and all(
                    torch.allclose(u, v, rtol=PARITY_RTOL, atol=PARITY_ATOL)
                    for u, v in zip(a, b, strict=True)
                )
                if same_structure:
                    rec["parity_max_abs_diff"] = max(
                        (float((u - v).abs().max()) for u, v in zip(a, b, strict=True)), default=0.0
                    )
                    rec["parity_exact"] = all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
                else:
                    rec["parity_error"] = "outputs differ in structure or shape"
            except Exception as exc:
                rec["parity"] = False
                rec["parity_error"] = _reason(exc)
            times["traced_forward"] = time.perf_counter() - t
        del gm, ref
        gc.collect()

        # 4. lrfx MACs (public entry point: traces its own copy, propagates shapes, counts)
        t = time.perf_counter()
        try:
            macs = int(lrfx.count_macs(model, x))
            rec["lrfx_macs"] = macs
            rec["lrfx_gmacs"] = macs / 1e9
            rec["rel_err"] = (macs / 1e9 - tv_gmacs) / tv_gmacs
            rec["within_tol"] = abs(rec["rel_err"]) <= REL_TOL
            # torchvision publishes 3 decimals: tiny models can miss 0.5 % by rounding alone
            rec["matches_rounded"] = round(macs / 1e9, 3) == round(tv_gmacs, 3)
            if "flop_counter_macs" in rec:
                rec["flop_counter_equal"] = rec["flop_counter_macs"] == macs
                rec["flop_counter_diff_macs"] = macs - rec["flop_counter_macs"]
        except Exception as exc:
            rec["lrfx_error"] = _reason(exc)
            rec["lrfx_traceback"] = traceback.format_exc()[-3000:]
        times["count_macs"] = time.perf_counter() - t

    # 5. where FlopCounterMode disagrees, explain it. Under no_grad, eval-mode
    # nn.MultiheadAttention takes the fused fast path (aten._native_multi_head_attention), which
    # the counter does not see at all (projections included). With grad enabled it takes the
    # ordinary path, where only the CPU scaled_dot_product_attention kernel stays uncounted: the
    # counter plus lrfx's own "attention" MACs must then give lrfx's total exactly.
    if rec.get("flop_counter_equal") is False:
        t = time.perf_counter()
        try:
            with torch.enable_grad(), FlopCounterMode(display=False) as fc:
                model(x)
            grad_macs = int(fc.get_total_flops()) // 2
            with torch.no_grad():
                layers = lrfx.analyze(model, x, spectra=False).layers
            attn = sum(layer.macs for layer in layers if layer.kind == "attention")
            rec["flop_counter_grad_macs"] = grad_macs
            rec["lrfx_attention_macs"] = attn
            rec["flop_counter_grad_plus_attention_equal"] = grad_macs + attn == rec["lrfx_macs"]
        except Exception as exc:
            rec["flop_counter_grad_error"] = _reason(exc)
        times["flop_counter_explain"] = time.perf_counter() - t

    times["total"] = time.perf_counter() - t_start
    return rec


def worker_main(name: str, out_path: str, threads: int | None) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.ERROR)  # lrfx warns about leaves; they are in the record
    if threads:
        torch.set_num_threads(threads)
    rec = measure(name)
    Path(out_path).write_text(json.dumps(rec))
    return 0


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import torch
    import torchvision

    import lrfx

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lrfx": lrfx.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # the machine is shared: the 1/5/15-minute load average shows how noisy the timings are
        "load_average_at_start": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    with contextlib.suppress(ValueError, OSError):
        info["mem_total_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    return info


def run_one(name: str, timeout: float, threads: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
        cmd += ["--worker-out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        load = list(os.getloadavg())
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {
                "model": name,
                "error": f"timed out after {timeout:.0f} s",
                "wall_s": time.perf_counter() - t,
            }
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            return {
                "model": name,
                "error": f"worker exited with {proc.returncode}",
                "stderr_tail": proc.stderr[-3000:],
                "wall_s": wall,
            }
        rec: dict[str, Any] = json.loads(out.read_text())
        rec["wall_s"] = wall  # includes interpreter start and imports
        rec["load_average_before"] = load
        return rec


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)

    def names(pred: Any) -> list[str]:
        return [r["model"] for r in records if pred(r)]

    attention = {"vit", "swin", "maxvit"}
    return {
        "models": n,
        "traced": len(names(lambda r: r.get("traced"))),
        "trace_failed": names(lambda r: r.get("traced") is False),
        "with_leaves": {
            r["model"]: [lf["name"] for lf in r["leaves"]] for r in records if r.get("leaves")
        },
        "parity_ok": len(names(lambda r: r.get("parity"))),
        "parity_failed": names(lambda r: r.get("traced") and not r.get("parity")),
        "parity_bit_exact": len(names(lambda r: r.get("parity_exact"))),
        "counted": len(names(lambda r: "lrfx_macs" in r)),
        "within_tol": len(names(lambda r: r.get("within_tol"))),
        "matches_rounded": len(names(lambda r: r.get("matches_rounded"))),
        "outside_tol": {
            r["model"]: r["rel_err"] for r in records if "rel_err" in r and not r["within_tol"]
        },
        "outside_tol_but_matches_rounded": names(
            lambda r: "rel_err" in r and not r["within_tol"] and r["matches_rounded"]
        ),
        "flop_counter_equal": len(names(lambda r: r.get("flop_counter_equal"))),
        "flop_counter_differs": {
            r["model"]: r["flop_counter_diff_macs"]
            for r in records
            if r.get("flop_counter_equal") is False
        },
        "flop_counter_differs_explained": names(
            lambda r: r.get("flop_counter_grad_plus_attention_equal")
        ),
        "flop_counter_differs_without_attention": names(
            lambda r: (
                r.get("flop_counter_equal") is False and r["model"].split("_")[0] not in attention
            )
        ),
        "errors": {
            r["model"]: r.get("error") or r.get("lrfx_error") or r.get("trace_error")
            for r in records
            if r.get("error") or r.get("lrfx_error") or r.get("trace_error")
        },
        "max_abs_rel_err": max(
            (abs(r["rel_err"]) for r in records if "rel_err" in r), default=None
        ),
        "total_wall_s": sum(r.get("wall_s", 0.0) for r in records),
    }


def _yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def table(records: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "size",
        "lrfx GMACs",
        "tv GMACs",
        "rel err %",
        "<=0.5%",
        "FC equal",
        "FC-lrfx MMACs",
        "traced",
        "leaves",
        "parity",
        "wall s",
    ]
    rows = []
    for r in records:
        fc_diff = r.get("flop_counter_diff_macs")
        rows.append(
            [
                r["model"],
                str(r.get("input_size", "")),
                f"{r['lrfx_gmacs']:.4f}" if "lrfx_gmacs" in r else "ERR",
                f"{r['tv_gmacs']:.3f}" if "tv_gmacs" in r else "",
                f"{100 * r['rel_err']:+.3f}" if "rel_err" in r else "",
                _yes(r.get("within_tol")),
                _yes(r.get("flop_counter_equal")),
                f"{-fc_diff / 1e6:+.1f}" if fc_diff else "",
                _yes(r.get("traced")),
                str(len(r.get("leaves", []))) if r.get("traced") else "",
                _yes(r.get("parity")),
                f"{r.get('wall_s', 0):.1f}",
            ]
        )
    width = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, width, strict=True))
        )

    return "\n".join([fmt(head), "  ".join("-" * w for w in width), *map(fmt, rows)])


def totals_text(s: dict[str, Any]) -> str:
    n = s["models"]
    lines = [
        f"traced:              {s['traced']}/{n}"
        f"  (failed: {', '.join(s['trace_failed']) or 'none'})",
        f"with leaves:         {len(s['with_leaves'])}"
        + (f"  ({', '.join(s['with_leaves'])})" if s["with_leaves"] else ""),
        f"parity ok:           {s['parity_ok']}/{n}  (bit-exact: {s['parity_bit_exact']};"
        f" failed: {', '.join(s['parity_failed']) or 'none'})",
        f"within 0.5% of tv:   {s['within_tol']}/{n}"
        + (
            f"  (outside: {', '.join(f'{k} {100 * v:+.2f}%' for k, v in s['outside_tol'].items())})"
            if s["outside_tol"]
            else ""
        ),
    ]
    lines.append(f"equal to tv at tv's 3 decimals: {s['matches_rounded']}/{n}")
    if s["outside_tol_but_matches_rounded"]:
        lines.append(
            "  outside 0.5% only through tv's rounding: "
            + ", ".join(s["outside_tol_but_matches_rounded"])
        )
    lines += [
        f"FlopCounter exact:   {s['flop_counter_equal']}/{n}"
        + (
            f"  (differs: {', '.join(s['flop_counter_differs'])})"
            if s["flop_counter_differs"]
            else ""
        ),
        "  explained (grad-mode counter + lrfx attention MACs == lrfx): "
        + (", ".join(s["flop_counter_differs_explained"]) or "none"),
        "  differs without attention: "
        + (", ".join(s["flop_counter_differs_without_attention"]) or "none"),
        f"errors:              {len(s['errors'])}"
        + "".join(f"\n  {k}: {v}" for k, v in s["errors"].items()),
        "max |rel err|:       "
        + (f"{100 * s['max_abs_rel_err']:.3f}%" if s["max_abs_rel_err"] is not None else "-"),
        f"total wall time:     {s['total_wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "rel_err" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.16 * len(recs) + 1)))
    y = range(len(recs))
    errs = [100 * r["rel_err"] for r in recs]
    colors = [
        "tab:green" if r["within_tol"] else ("tab:orange" if r["matches_rounded"] else "tab:red")
        for r in recs
    ]
    ax.barh(list(y), errs, color=colors)
    ax.axvspan(-100 * REL_TOL, 100 * REL_TOL, color="0.9", zorder=0)
    # torchvision publishes 3 decimals: anything within half a unit of the last digit is equal
    half_ulp = [100 * 0.0005 / r["tv_gmacs"] for r in recs]
    ax.scatter(half_ulp, list(y), marker="|", color="0.4", s=12, lw=0.8)
    ax.scatter([-h for h in half_ulp], list(y), marker="|", color="0.4", s=12, lw=0.8)
    for i, r in enumerate(recs):
        if r.get("flop_counter_equal") is False:
            ax.plot([0], [i], marker="x", color="k", ms=4)
    ax.set_yticks(list(y), [f"{r['model']} ({r['input_size']})" for r in recs], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("lrfx vs torchvision GMACs, relative error (%)")
    ax.set_title(
        "lrfx.count_macs on the torchvision zoo\n"
        "grey band: ±0.5 %; orange: equal at torchvision's 3 decimals; "
        "x: FlopCounterMode/2 differs; |: ±0.0005 G, tv's rounding",
        fontsize=8,
    )
    lim = max(1.0, *(abs(e) for e in errs)) * 1.1
    ax.set_xlim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, records: list[dict[str, Any]], info: dict[str, Any], args: Any) -> None:
    doc = {
        "benchmark": "zoo_macs",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {
            "rel_tol": REL_TOL,
            "parity_rtol": PARITY_RTOL,
            "parity_atol": PARITY_ATOL,
            "timeout_s": args.timeout,
            "weights": "random (seed 0), never downloaded",
            "input": "randn(1, 3, crop, crop), seed 0; crop from DEFAULT weights",
        },
        "summary": summarize(records),
        "models": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", help="comma-separated model names (default: the whole zoo)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (PNG next to it)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per model (default 3600)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep records already in --out and run only the missing models",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="rerun the --models given and merge them into the records already in --out",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="only print the table and redraw the PNG from the JSON at --out",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, args.worker_out, args.threads)

    if args.report:
        records = json.loads(args.out.read_text())["models"]
        report(records, args.out)
        return 0

    import torch
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in zoo]
        if unknown:
            p.error(f"not in the torchvision classification zoo: {', '.join(unknown)}")
    else:
        names = zoo

    done: dict[str, dict[str, Any]] = {}
    if (args.resume or args.update) and args.out.exists():
        done = {
            r["model"]: r for r in json.loads(args.out.read_text())["models"] if "error" not in r
        }
    if args.update:
        if not args.models:
            p.error("--update needs --models")
        for name in names:
            done.pop(name, None)
        names = [m for m in zoo if m in done or m in names]
    info = machine_info()
    records: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        if name in done:
            records.append(done[name])
            continue
        rec = run_one(name, args.timeout, args.threads)
        records.append(rec)
        status = (
            f"{rec['lrfx_gmacs']:.4f} G vs {rec['tv_gmacs']:.3f} G "
            f"({100 * rec['rel_err']:+.3f}%) FC={_yes(rec.get('flop_counter_equal'))} "
            f"parity={_yes(rec.get('parity'))}"
            if "rel_err" in rec
            else rec.get("error") or rec.get("lrfx_error") or "?"
        )
        print(f"[{i}/{len(names)}] {name}: {status}  [{rec.get('wall_s', 0):.1f} s]", flush=True)
        write(args.out, records, info, args)
        gc.collect()

    write(args.out, records, info, args)
    report(records, args.out)
    return 0


def report(records: list[dict[str, Any]], out: Path) -> None:
    plot(records, out.with_suffix(".png"))
    print()
    print(table(records))
    print()
    print(totals_text(summarize(records)))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    raise SystemExit(main())
