"""Coverage: does lrfx capture, reproduce, compress and export every model it is handed?

    .venv/bin/python bench/coverage.py                       # custom + transformers + zoo
    .venv/bin/python bench/coverage.py --suite hf            # the 12 transformers models, ~2 min
    .venv/bin/python bench/coverage.py --suite torchvision --models resnet18,vit_b_16
    .venv/bin/python bench/coverage.py --resume              # finish an interrupted sweep
    .venv/bin/python bench/coverage.py --report              # table + PNG from the JSON

A run replaces the records of the models it runs and keeps the others (``--fresh`` starts a new
file). Options: ``--out PATH`` (default ``bench/results/coverage.json``, PNG next to it),
``--threads N`` (default 2), ``--timeout S`` per model (default 1800), ``--capture-reps N``
(default 3), ``--no-export``.

Models: three models of the kinds users write (a CNN whose ``forward(x, embed=False)`` branches on
a flag, the same with a data-dependent input check, a weight-standardized CNN), the Hugging Face
transformers 5.x architectures of :mod:`lrfx.contrib.hf` (BERT, RoBERTa,
DistilBERT, GPT-2 and GPT-2 LM head, Llama, ViT, Whisper encoder, T5 encoder, ConvNeXt, CLIP
text and vision; small configs, random weights, keyword inputs with padding), and every
classification model of torchvision (random weights, seed 0, eval mode, one
``randn(1, 3, s, s)`` at the crop size of its DEFAULT weights; the ViTs' zero-initialized heads
get seeded ``0.02 * randn`` weights so that their output is not identically zero; ConvNeXt,
GoogLeNet and ShuffleNet are revived as :func:`_revive` says). Nothing is downloaded.

Per model, each stage recording its failure reason on its own:

* **capture**: ``lrfx.analyze(model, x, spectra=False)``: the mode (``fx`` or ``module``) and
  why, leaves, factorable layers, total MACs;
* **capture time, FX vs torch.export**: the value-carrying FX capture lrfx uses
  (``lrfx.tracing.capture``) against ``torch.export.export`` of the same model and inputs,
  interleaved, ``--capture-reps`` times each, medians — the measurement behind the choice
  written in ``lrfx/tracing.py``;
* **full rank**: ``lrfx.apply`` of a plan with every factorable layer at its maximum rank (svd for
  linear layers, channel for convs); relative error ``||y - y_ref|| / ||y_ref||`` of the first
  output tensor in float32, pass below 1e-4; whether the result keeps the model's class;
* **compress**: ``lrfx.compress(model, x, macs=0.5)``: MACs ratio from the report (pass at or
  below 0.5), finite outputs, time;
* **export**: the compressed model to pt2 (``torch.export``; reloaded and compared) and ONNX
  (run in onnxruntime and compared), max abs difference against the compressed model.

Each model runs in its own subprocess; the JSON (per-model records, summary, machine info) is
rewritten after each model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "coverage.json"
FULL_RANK_TOL = 1e-4


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    msg = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return msg[:400]


# --- models -------------------------------------------------------------------------------------


def hf_names() -> list[str]:
    from lrfx.contrib.hf import TINY

    return list(TINY)


def tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def custom_names() -> list[str]:
    return list(_CUSTOM)


def _custom_models() -> dict[str, Any]:
    """Models of the kinds users bring that are neither library: a flag argument, a
    data-dependent check, weight standardization, an untraceable submodule."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class FlagCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(128, 100)

        def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
            h = self.features(x).mean(dim=(2, 3))
            return h if embed else self.head(h)

    class CheckedCNN(FlagCNN):
        def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
            if x.abs().amax() > 1e4:  # data-dependent: neither FX nor torch.export traces it
                raise ValueError("unnormalized input")
            return super().forward(x, embed)

    class StdConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v, m = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (self.weight - m) / torch.sqrt(v + 1e-6)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    class StdConvNet(nn.Module):  # BiT / NFNet style
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(StdConv2d(3, 64, 3, padding=1), nn.GELU(),
                                      StdConv2d(64, 128, 3, padding=1, stride=2), nn.GELU(),
                                      StdConv2d(128, 128, 3, padding=1), nn.GELU())
            self.head = nn.Linear(128, 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).mean(dim=(2, 3)))

    return {"flag_cnn": FlagCNN, "checked_cnn": CheckedCNN, "stdconv_net": StdConvNet}


_CUSTOM = ("flag_cnn", "checked_cnn", "stdconv_net")


def build(suite: str, name: str) -> tuple[Any, Any]:
    """The model (eval mode) and its example inputs."""
    import torch

    if suite == "custom":
        torch.manual_seed(0)
        model = _custom_models()[name]()
        return model.eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if suite == "hf":
        from lrfx.contrib.hf import tiny

        return tiny(name)
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    weights = torchvision.models.get_model_weights(name).DEFAULT
    crop = weights.transforms.keywords["crop_size"]
    size = int(crop if isinstance(crop, int) else crop[0])
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    if isinstance(model, VisionTransformer) and model.image_size != size:
        torch.manual_seed(0)  # vit_h_14's DEFAULT weights are 518 px SWAG ones
        model = torchvision.models.get_model(name, weights=None, image_size=size)
    _revive(name, model, size)
    if isinstance(model, VisionTransformer):
        # torchvision zero-initializes the ViT head, so the output would be identically zero
        # and every relative error 0/0: give it seeded random weights like every other layer.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.heads.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model.eval(), x


def _revive(name: str, model: Any, size: int) -> None:
    """Make a randomly initialized model's output depend on its layers, or every check on it
    would be vacuous (measured: a half-MACs compression changed the output of googlenet by
    exactly 0, of the ConvNeXts by ~3e-6, of the ShuffleNets by ~2e-4). ConvNeXt blocks start
    with layer scale 1e-6: set it to 0.5. GoogLeNet's and ShuffleNet's activations die out with
    their init: re-estimate BatchNorm statistics on 4 seeded random batches."""
    import torch

    import lrfx

    if name.startswith("convnext"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("layer_scale"):
                    p.fill_(0.5)
    elif name.startswith(("googlenet", "shufflenet")):
        g = torch.Generator().manual_seed(2)
        lrfx.recalibrate_bn(model, [torch.randn(2, 3, size, size, generator=g) for _ in range(4)])


def _call(model: Any, x: Any) -> Any:
    from lrfx.inputs import Inputs

    return Inputs.of(x).call(model)


def _first(out: Any) -> Any:
    import torch
    from torch.utils._pytree import tree_leaves

    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- worker ---------------------------------------------------------------------------------------


def measure(suite: str, name: str, reps: int, export: bool) -> dict[str, Any]:
    import torch

    import lrfx
    from lrfx.tracing import capture

    rec: dict[str, Any] = {"suite": suite, "model": name}
    times: dict[str, float] = {}
    rec["times_s"] = times
    t0 = time.perf_counter()
    model, x = build(suite, name)
    times["build"] = time.perf_counter() - t0
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    with torch.no_grad():
        ref = _first(_call(model, x))

    # capture + analysis
    t = time.perf_counter()
    try:
        with torch.no_grad():
            a = lrfx.analyze(model, x, spectra=False)
        rec.update(analyzed=True, mode=a.mode, mode_reason=a.mode_reason,
                   leaves={leaf.name: leaf.reason for leaf in a.leaves},
                   factorable=len(a.factorable), layers=len(a), total_macs=a.total_macs,
                   factorable_share=sum(r.macs for r in a.factorable) / max(a.total_macs, 1),
                   folded=sum(r.folded for r in a.layers), notes=list(a.notes)[:5])
    except Exception as exc:
        rec.update(analyzed=False, analyze_error=_reason(exc),
                   analyze_traceback=traceback.format_exc()[-2000:])
        return rec
    times["analyze"] = time.perf_counter() - t

    # capture time: lrfx (FX, or value-carrying FX in module mode) vs torch.export
    ours, theirs = [], []
    from lrfx.inputs import Inputs
    from lrfx.tracing import call_inputs

    inputs = call_inputs(model, Inputs.of(x))
    for _ in range(reps):
        t = time.perf_counter()
        try:
            capture(model, x)
            ours.append(time.perf_counter() - t)
        except Exception as exc:
            rec["capture_error"] = _reason(exc)
        gc.collect()
        t = time.perf_counter()
        try:
            torch.export.export(model, inputs.args, dict(inputs.kwargs))
            theirs.append(time.perf_counter() - t)
        except Exception as exc:
            rec["torch_export_capture_error"] = _reason(exc)
            break
        gc.collect()
    if ours:
        times["capture_lrfx_median"] = statistics.median(ours)
    if theirs:
        times["capture_torch_export_median"] = statistics.median(theirs)

    # full rank
    t = time.perf_counter()
    try:
        plan = {}
        for r in a.factorable:
            scheme = "svd" if r.kind == "linear" else "channel"
            plan[r.name] = lrfx.LayerPlan(scheme, r.max_rank(scheme))
        full = lrfx.apply(model, plan, x)
        with torch.no_grad():
            err = _rel(_first(_call(full, x)), ref)
        rec.update(full_rank_error=err, full_rank_ok=err < FULL_RANK_TOL,
                   full_rank_class=type(full).__name__)
        del full
    except Exception as exc:
        rec.update(full_rank_ok=False, full_rank_error_reason=_reason(exc),
                   full_rank_traceback=traceback.format_exc()[-2000:])
    times["full_rank"] = time.perf_counter() - t
    gc.collect()

    # compress to half the MACs
    t = time.perf_counter()
    out = None
    try:
        out = lrfx.compress(model, x, macs=0.5)
        report = lrfx.facts_of(out).report
        assert report is not None
        with torch.no_grad():
            y = _first(_call(out, x))
        rec.update(compress_macs_ratio=report.macs_ratio, keeps_class=type(out) is type(model),
                   result_class=type(out).__name__, factored_layers=len(report),
                   compress_finite=bool(torch.isfinite(y).all()),
                   compress_error=_rel(y, ref))
        rec["compress_ok"] = report.macs_ratio <= 0.5 + 1e-9 and rec["compress_finite"]
    except Exception as exc:
        rec.update(compress_ok=False, compress_error_reason=_reason(exc),
                   compress_traceback=traceback.format_exc()[-2000:])
    times["compress"] = time.perf_counter() - t

    if export and out is not None:
        _export(rec, times, out, x)
    times["total"] = time.perf_counter() - t0
    return rec


def _export(rec: dict[str, Any], times: dict[str, float], out: Any, x: Any) -> None:
    import torch

    import lrfx
    from lrfx.inputs import Inputs

    with torch.no_grad():
        y = _first(_call(out, x))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        try:
            f = lrfx.export(out, Path(tmp) / "m.pt2", x, format="pt2")
            got = _first(_call(torch.export.load(str(f)).module(), x))
            rec["pt2_max_abs_diff"] = float((got - y).abs().max())
            rec["pt2_ok"] = bool(torch.allclose(got, y, rtol=1e-4, atol=1e-4))
        except Exception as exc:
            rec.update(pt2_ok=False, pt2_error=_reason(exc))
        times["export_pt2"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            import onnxruntime as ort

            f = lrfx.export(out, Path(tmp) / "m.onnx", x, format="onnx")
            sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
            inputs = Inputs.of(x)
            values = [*inputs.args, *inputs.kwargs.values()]
            feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), values, strict=False)}
            got = torch.from_numpy(sess.run(None, feeds)[0])
            rec["onnx_max_abs_diff"] = float((got - y).abs().max())
            rec["onnx_ok"] = bool(torch.allclose(got, y, rtol=1e-3, atol=1e-4))
        except Exception as exc:
            rec.update(onnx_ok=False, onnx_error=_reason(exc))
        times["export_onnx"] = time.perf_counter() - t


def worker_main(args: argparse.Namespace) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    suite, name = args.worker.split(":", 1)
    rec = measure(suite, name, args.capture_reps, not args.no_export)
    Path(args.worker_out).write_text(json.dumps(rec))
    return 0


# --- driver ---------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import torchvision

    import lrfx

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lrfx": lrfx.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout.strip()
    return info


def run_one(key: str, args: argparse.Namespace) -> dict[str, Any]:
    suite, name = key.split(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key,
               "--worker-out", str(out), "--threads", str(args.threads),
               "--capture-reps", str(args.capture_reps)]
        if args.no_export:
            cmd.append("--no-export")
        load = list(os.getloadavg())
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"suite": suite, "model": name, "error": f"timed out after {args.timeout} s"}
        if proc.returncode != 0 or not out.exists():
            return {"suite": suite, "model": name, "error": f"worker exited {proc.returncode}",
                    "stderr_tail": proc.stderr[-3000:]}
        rec: dict[str, Any] = json.loads(out.read_text())
        rec["wall_s"] = time.perf_counter() - t
        rec["load_average_before"] = load
        return rec


def _ok(r: dict[str, Any]) -> bool:
    return bool(r.get("analyzed") and r.get("full_rank_ok") and r.get("compress_ok")
                and r.get("pt2_ok", True) and r.get("onnx_ok", True))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for suite in ("custom", "hf", "torchvision"):
        rs = [r for r in records if r["suite"] == suite]
        if not rs:
            continue
        ratios = [r["times_s"]["capture_torch_export_median"] / r["times_s"]["capture_lrfx_median"]
                  for r in rs if "capture_torch_export_median" in r.get("times_s", {})
                  and "capture_lrfx_median" in r.get("times_s", {})]
        misses = {}
        for r in rs:
            if _ok(r):
                continue
            why = [r.get(k) for k in ("error", "analyze_error", "full_rank_error_reason",
                                      "compress_error_reason", "pt2_error", "onnx_error")
                   if r.get(k)]
            if r.get("analyzed") and "full_rank_error" in r and not r.get("full_rank_ok"):
                why.append(f"full-rank relative error {r['full_rank_error']:.2e}")
            misses[r["model"]] = "; ".join(map(str, why)) or "see record"
        out[suite] = {
            "models": len(rs),
            "analyzed": sum(bool(r.get("analyzed")) for r in rs),
            "module_mode": [r["model"] for r in rs if r.get("mode") == "module"],
            "full_rank_ok": sum(bool(r.get("full_rank_ok")) for r in rs),
            "compress_ok": sum(bool(r.get("compress_ok")) for r in rs),
            "keeps_class": sum(bool(r.get("keeps_class")) for r in rs if r.get("mode") == "module"),
            "pt2_ok": sum(bool(r.get("pt2_ok")) for r in rs),
            "onnx_ok": sum(bool(r.get("onnx_ok")) for r in rs),
            "all_ok": sum(_ok(r) for r in rs),
            "misses": misses,
            # the full-rank check means little where compressing to half the MACs hardly moves
            # the output (a dead random init): such models are listed, to be revived
            "insensitive": sorted(r["model"] for r in rs if r.get("compress_error", 1.0) < 1e-3),
            "max_full_rank_error": max((r["full_rank_error"] for r in rs
                                        if "full_rank_error" in r), default=None),
            "torch_export_over_lrfx_capture_time": {
                "median": statistics.median(ratios) if ratios else None,
                "min": min(ratios, default=None), "max": max(ratios, default=None),
            },
        }
    return out


def table(records: list[dict[str, Any]]) -> str:
    head = ["model", "mode", "layers", "full-rank err", "MACs", "class kept", "pt2", "onnx",
            "capture ms (lrfx / export)"]
    rows = []
    for r in records:
        tm = r.get("times_s", {})
        cap = (f"{1e3 * tm['capture_lrfx_median']:.0f} / "
               f"{1e3 * tm['capture_torch_export_median']:.0f}"
               if "capture_lrfx_median" in tm and "capture_torch_export_median" in tm else "-")
        rows.append([
            r["model"], r.get("mode", "FAIL"), str(r.get("factorable", "-")),
            f"{r['full_rank_error']:.1e}" if "full_rank_error" in r else "FAIL",
            f"{r['compress_macs_ratio']:.3f}" if "compress_macs_ratio" in r else "FAIL",
            "yes" if r.get("keeps_class") else ("GM" if r.get("mode") == "fx" else "no"),
            "ok" if r.get("pt2_ok") else ("-" if "pt2_ok" not in r else "FAIL"),
            "ok" if r.get("onnx_ok") else ("-" if "onnx_ok" not in r else "FAIL"),
            cap,
        ])
    width = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, width, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in rows]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in records if "capture_lrfx_median" in r.get("times_s", {})
          and "capture_torch_export_median" in r.get("times_s", {})]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for suite, color in (("custom", "tab:green"), ("hf", "tab:orange"),
                         ("torchvision", "tab:blue")):
        pts = [r for r in rs if r["suite"] == suite]
        ax.scatter([r["times_s"]["capture_lrfx_median"] for r in pts],
                   [r["times_s"]["capture_torch_export_median"] for r in pts],
                   label=suite, color=color, s=14)
    lo = min(r["times_s"]["capture_lrfx_median"] for r in rs)
    hi = max(r["times_s"]["capture_torch_export_median"] for r in rs)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lrfx capture (FX / value-carrying FX), s")
    ax.set_ylabel("torch.export.export, s")
    ax.set_title("Capture time per model (median of reps, 2 threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=["all", "custom", "hf", "torchvision"], default="all")
    p.add_argument("--models", help="comma-separated names (within the suite)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--capture-reps", type=int, default=3)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    p.add_argument("--report", action="store_true", help="only print/plot the existing JSON")
    p.add_argument("--fresh", action="store_true",
                   help="start a new JSON (default: keep the records of models not run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    data: dict[str, Any] = {"records": []}
    if args.out.exists() and not args.fresh:  # a run replaces only the models it runs
        data = json.loads(args.out.read_text())
    if args.report:
        print(table(data["records"]))
        print(json.dumps(data.get("summary", {}), indent=2))
        plot(data["records"], args.out.with_suffix(".png"))
        return 0
    keys = []
    if args.suite in ("all", "custom"):
        keys += [f"custom:{n}" for n in custom_names()]
    if args.suite in ("all", "hf"):
        keys += [f"hf:{n}" for n in hf_names()]
    if args.suite in ("all", "torchvision"):
        keys += [f"torchvision:{n}" for n in tv_names()]
    if args.models:
        wanted = set(args.models.split(","))
        keys = [k for k in keys if k.split(":", 1)[1] in wanted]
    done = {f"{r['suite']}:{r['model']}" for r in data["records"]}
    if args.resume:
        keys = [k for k in keys if k not in done]
    data["machine"] = machine_info(args.threads)
    started = time.perf_counter()
    for i, key in enumerate(keys):
        rec = run_one(key, args)
        data["records"] = [r for r in data["records"]
                           if f"{r['suite']}:{r['model']}" != key] + [rec]
        data["summary"] = summarize(data["records"])
        data["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        status = "ok" if _ok(rec) else "MISS"
        print(f"[{i + 1}/{len(keys)}] {key}: {status} mode={rec.get('mode')} "
              f"full={rec.get('full_rank_error', '-')} macs={rec.get('compress_macs_ratio', '-')} "
              f"pt2={rec.get('pt2_ok')} onnx={rec.get('onnx_ok')} "
              f"({rec.get('wall_s', 0):.0f} s, {time.perf_counter() - started:.0f} s total)",
              flush=True)
    print(table(data["records"]))
    plot(data["records"], args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
