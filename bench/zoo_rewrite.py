"""Full-rank rewrite parity across the torchvision classification zoo.

For every model (random weights, BN statistics set from one random batch so outputs are not
degenerate), a plan factoring *every* factorable layer at full rank (svd for Linear, channel for
convs) is applied, and the rewritten graph's output is compared with the model's.

    .venv/bin/python bench/zoo_rewrite.py [--models resnet18,vit_b_16] [--size 112]

Writes ``bench/results/zoo_rewrite.json`` (per model: layers factored, relative error, time, or
the error message), updated after every model.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torchvision

import lrfx

OUT = Path(__file__).resolve().parent / "results" / "zoo_rewrite.json"


def one(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    fixed = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 299}  # models with fixed sizes
    s = next((v for k, v in fixed.items() if name.startswith(k)), size)
    x = torch.randn(2, 3, s, s)
    lrfx.recalibrate_bn(model, [x])
    model.eval()
    t0 = time.time()
    a = lrfx.analyze(model, x[:1], spectra=False)
    layers = {}
    for rec in a.factorable:
        scheme = "svd" if rec.kind == "linear" else "channel"
        layers[rec.name] = lrfx.LayerPlan(scheme, rec.max_rank(scheme))
    gm = lrfx.apply(model, lrfx.RankPlan(layers), x[:1])
    with torch.no_grad():
        y0, y1 = model(x[:1]), gm(x[:1])
    err = float((y1 - y0).norm() / y0.norm().clamp_min(1e-30))
    not_factorable = sorted({r.note for r in a.layers if r.calls and not r.factorable})
    return {"model": name, "input": s, "factored": len(layers),
            "left_dense_reasons": not_factorable, "rel_error": err, "ok": err < 1e-4,
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="")
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(
        module=torchvision.models)
    res = json.loads(OUT.read_text()) if OUT.exists() else {"models": {}}
    res.update(machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
               torch=torch.__version__)
    for name in names:
        try:
            rec = one(name, args.size)
        except Exception as exc:
            rec = {"model": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                   "trace": traceback.format_exc()[-1500:]}
        res["models"][name] = rec
        print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(res, indent=2) + "\n")
        gc.collect()
    ok = sum(r.get("ok", False) for r in res["models"].values())
    print(f"{ok}/{len(res['models'])} models at full-rank parity")


if __name__ == "__main__":
    main()
