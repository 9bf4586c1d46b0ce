"""The ``lrfx`` command line.

Example:
    $ lrfx analyze torchvision:resnet18
    $ lrfx analyze torchvision:vit_b_16 --json vit.json
    $ lrfx analyze mypkg.models:build --input 1x3x32x32
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lrfx.errors import LrfxError
from lrfx.progress import step

__all__ = ["main"]

_ANALYZE_EPILOG = """\
examples:
  lrfx analyze torchvision:resnet18
  lrfx analyze torchvision:vit_b_16 --json vit.json
  lrfx analyze torchvision:resnet50 --input 8x3x160x160 --no-spectra
  lrfx analyze mypkg.models:build_net --input 1x3x32x32
  lrfx analyze saved_model.pt --input 1x1x28x28
  lrfx analyze mypkg.bert:make_encoder --input input_ids=1x128:int64
"""


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from lrfx.api import analyze
    from lrfx.contrib.models import load_model

    model, default = load_model(args.model)
    inputs = _inputs_for(args.model, args.input, default)
    progress = not args.no_progress
    if args.latency:
        from lrfx.api import profile_latency

        with torch.no_grad():
            profile = profile_latency(model, inputs)
        if args.json is not None:
            text = json.dumps(profile.to_dict(), indent=2)
            if args.json == "-":
                print(text)
                return 0
            Path(args.json).write_text(text + "\n")
        print(profile.table())
        if args.json is not None:
            print(f"wrote {args.json}")
        return 0
    with torch.no_grad():
        result = analyze(model, inputs, spectra=not args.no_spectra, progress=progress)
    if args.json is not None:
        text = result.to_json(spectra=args.singular_values)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    _print_table(result)
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


def _inputs_for(model_spec: str, specs: Sequence[str] | None, default: Any) -> Any:
    """Example inputs: from ``--input`` specs, else the model's default ones."""
    from lrfx.contrib.models import parse_inputs

    if specs:
        return parse_inputs(specs)
    if default is not None:
        return default
    raise LrfxError(f"model {model_spec!r} has no default inputs; pass --input, e.g. "
                    "--input 1x3x224x224 or --input input_ids=1x128:int64, or make its "
                    "factory return (model, example_inputs)")


def _apply(args: argparse.Namespace) -> int:
    from lrfx.api import apply, as_plan
    from lrfx.contrib.models import load_model
    from lrfx.io import save

    plan = as_plan(args.plan)
    out = _prepare_output(args.output, args.force)
    model, default = load_model(args.model)
    inputs = _inputs_for(args.model, args.input, default)
    result = apply(model, plan, inputs)
    save(result, out, model_spec=args.model)
    report = _report_of(result)
    written = _write_report(report, out)
    print(report.table())
    print(f"wrote {out}/ (plan.json, weights.safetensors, manifest.json, model_code.py, "
          f"{', '.join(written)})")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from lrfx.api import apply, channel_plan
    from lrfx.contrib.models import load_model
    from lrfx.io import save

    given = [k for k in ("macs", "params", "percent") if getattr(args, k) is not None]
    if len(given) != 1:
        raise LrfxError("lrfx prune: give one of --macs, --params, --percent")
    out = _prepare_output(args.output, args.force)
    model, default = load_model(args.model)
    inputs = _inputs_for(args.model, args.input, default)
    plan = channel_plan(model, inputs, macs=args.macs, params=args.params, percent=args.percent,
                        min_channels=args.min_channels)
    result = apply(model, plan, inputs)
    save(result, out, model_spec=args.model)
    report = _report_of(result)
    written = _write_report(report, out)
    width = max((len(r["layer"]) for r in report.pruned), default=5)
    print(f"{'group':<{width}}  channels")
    for r in report.pruned:
        print(f"{r['layer']:<{width}}  {r['channels_before']:>5} -> {r['channels_after']}")
    unscored = plan.settings.get("unscored") or []
    if unscored:
        print(f"kept whole (no BatchNorm scale): {', '.join(unscored)}")
    print(f"MACs {report.macs_before:,} -> {report.macs_after:,} ({report.macs_ratio:.3f}x), "
          f"params {report.params_before:,} -> {report.params_after:,}")
    print(f"wrote {out}/ (plan.json, weights.safetensors, manifest.json, model_code.py, "
          f"{', '.join(written)})")
    return 0


def _report_of(result: Any) -> Any:
    from lrfx.facts import facts_of

    report = facts_of(result).report
    assert report is not None
    return report


def _manifest_inputs(manifest: Mapping[str, Any]) -> list[str]:
    """``--input`` specs that remake the saved example inputs (names, shapes, dtypes)."""
    records = manifest.get("inputs")
    if not records:
        return ["x".join(map(str, s)) for s in manifest.get("input_shapes", [])]
    specs = []
    for r in records:
        text = "x".join(map(str, r["shape"])) + f":{r.get('dtype', 'float32')}"
        specs.append(f"{r['name']}={text}" if r.get("name") else text)
    return specs


def _export(args: argparse.Namespace) -> int:
    from lrfx.api import load
    from lrfx.contrib.models import load_model
    from lrfx.io import export, read_manifest

    manifest = read_manifest(args.directory)
    spec = args.model or manifest.get("model")
    if not spec:
        raise LrfxError(f"{args.directory!r} does not record which model it was made from; "
                        "pass --model SPEC (the MODEL given to lrfx apply)")
    model, _ = load_model(spec)
    inputs = _inputs_for(spec, args.input or _manifest_inputs(manifest), None)
    gm = load(args.directory, model, inputs)
    suffix = {"pt2": "pt2", "onnx": "onnx", "torchscript": "ts", "python": "py"}[args.format]
    target = Path(args.output) if args.output else Path(args.directory) / f"model.{suffix}"
    export(gm, target, inputs, format=args.format, dynamic=_dynamic(args.dynamic))
    print(f"wrote {target}")
    return 0


#: Files lrfx writes into an output folder (``--force`` removes these and nothing else).
OWN_FILES = ("plan.json", "weights.safetensors", "manifest.json", "model_code.py", "model.pt2",
             "model.onnx", "model.onnx.data", "model.ts", "model.py", "report.json",
             "report.md", "report.html")
OWN_GLOBS = ("report_*.png", "report-*.png")


def _own(path: Path) -> bool:
    return path.name in OWN_FILES or any(path.match(g) for g in OWN_GLOBS)


def _prepare_output(directory: str, force: bool) -> Path:
    """Refuse a folder holding files unless ``force``; with it, remove lrfx's own files only
    (a stale plan or weights of another model must never survive next to new ones)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise LrfxError(f"output {directory!r} is a file; give a directory")
    present = sorted(out.iterdir()) if out.is_dir() else []
    if not present:
        return out
    if not force:
        names = ", ".join(p.name for p in present[:5]) + (" ..." if len(present) > 5 else "")
        raise LrfxError(f"output folder {directory!r} is not empty ({names}): choose another "
                        "folder, or pass --force to replace lrfx's files there (other files are "
                        "kept)")
    for p in present:
        if p.is_file() and _own(p):
            p.unlink()
    kept = [p.name for p in present if p.exists()]
    if kept:
        print(f"--force: kept files lrfx did not write in {directory}: {', '.join(kept[:5])}",
              file=sys.stderr)
    return out


_CALIBRATION_HELP = ("fashion-mnist, digits, an image folder, or a .pt/.npz file (a tensor, an "
                     "(inputs, targets) pair, or keyword input tensors)")


def _dynamic(spec: str | None) -> Any:
    """``--dynamic batch`` / ``--dynamic batch,sequence`` as ``lrfx.export``'s ``dynamic``."""
    if not spec:
        return None
    return tuple(v.strip() for v in spec.split(",") if v.strip())


_DYNAMIC_HELP = ("dynamic input dims of the pt2/onnx export: batch (dim 0 of every input) or "
                 "batch,sequence (also dim 1 of integer inputs: token ids, masks); default "
                 "static")


def _dataset(spec: str, example: Any, model_spec: str, limit: int | None = None
             ) -> tuple[Any, Any]:
    """``(inputs, targets or None)`` of ``--calibration`` data (``N`` first)."""
    import torch

    from lrfx.contrib.data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        load_digits_tensors,
        load_fashion_mnist,
        load_image_folder,
        load_tensor_file,
    )

    y: torch.Tensor | None
    if spec == "fashion-mnist":
        x, y = load_fashion_mnist("train")
    elif spec == "digits":
        x, y = load_digits_tensors()
    elif Path(spec).is_dir():
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise LrfxError("an image folder calibrates models that take one (N, C, H, W) "
                            "image tensor; this model's example inputs are not one (use a .pt "
                            "file instead)")
        c, h, w = example.shape[1:]
        imagenet = model_spec.startswith("torchvision:") and c == 3
        x = load_image_folder(spec, (h, w), channels=c, limit=limit,
                              mean=IMAGENET_MEAN if imagenet else None,
                              std=IMAGENET_STD if imagenet else None)
        y = None
    elif Path(spec).is_file():
        x, y = load_tensor_file(spec)
    else:
        raise LrfxError(f"unknown calibration data {spec!r}: use {_CALIBRATION_HELP}")
    return x, y


def _finetune(args: argparse.Namespace, dense: Any, gm: Any, x: Any, y: Any) -> None:
    """``--finetune N``: N epochs on the labelled calibration source, then the test accuracy of
    the dense, compressed and fine-tuned models where a test split is known."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lrfx.training import evaluate, fit

    if y is None or isinstance(x, dict):
        raise LrfxError("--finetune needs labelled image data: --calibration fashion-mnist, "
                        "digits, a .pt holding (inputs, targets) or an .npz with x and y; or "
                        "fine-tune in Python (README: Fine-tune and evaluate)")
    test = None
    if args.calibration == "fashion-mnist":
        from lrfx.contrib.data import load_fashion_mnist

        xt, yt = load_fashion_mnist("test")
        test = DataLoader(TensorDataset(xt, yt), batch_size=256)
    before = None if test is None else evaluate(gm, test, reference=dense)
    train = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    result = fit(gm, train, epochs=args.finetune, lr=args.lr, progress=not args.no_progress)
    print(f"fine-tuned {args.finetune} epoch(s) on {len(x):,} samples in {result.seconds:.1f} s "
          f"(Adam, lr {args.lr}); training loss per epoch: "
          + ", ".join(f"{v:.4f}" for v in result.losses))
    if test is None:
        print("no test split is known for this data: evaluate in Python with lrfx.evaluate")
        return
    dense_acc = evaluate(dense, test)
    after = evaluate(gm, test, reference=dense)
    assert before is not None
    print(f"test accuracy ({after.n:,} images): dense {dense_acc.accuracy:.4f}, compressed "
          f"{before.accuracy:.4f}, fine-tuned {after.accuracy:.4f} (top-1 agreement with dense "
          f"{before.agreement:.4f} -> {after.agreement:.4f})")


def _rank_setting(values: Sequence[str] | None, argument: str, kind: type) -> Any:
    """``--min-rank 8`` (every layer) or ``--min-rank fc=16`` (repeatable) as a config value."""
    if not values:
        return None
    plain = [v for v in values if "=" not in v]
    per = dict(v.split("=", 1) for v in values if "=" in v)
    try:
        if plain and not per and len(plain) == 1:
            return kind(plain[0])
        if plain:
            raise ValueError
        return {k: kind(v) for k, v in per.items()}
    except ValueError:
        raise LrfxError(f"--{argument.replace('_', '-')} takes one number for every layer, or "
                        f"LAYER=NUMBER (repeatable); got {list(values)}") from None


def _batch_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise LrfxError(f"--latency-batch-sizes takes integers separated by commas (1,32), got "
                        f"{text!r}") from None


def _compress(args: argparse.Namespace) -> int:
    import torch

    from lrfx.api import compress
    from lrfx.config import CompressConfig
    from lrfx.contrib.models import load_model
    from lrfx.io import export, save

    def budget(v: float | None) -> float | int | None:
        return None if v is None else int(v) if v > 1 and float(v).is_integer() else v

    cfg = CompressConfig.of(
        args.config, macs=budget(args.macs), params=budget(args.params), latency=args.latency,
        latency_batch_sizes=_batch_sizes(args.latency_batch_sizes),
        allocator=args.allocator, scheme=args.scheme, round_to=args.round_to,
        exclude=tuple(args.exclude) if args.exclude else None,
        min_rank=_rank_setting(args.min_rank, "min_rank", int),
        max_rank=_rank_setting(args.max_rank, "max_rank", int),
        max_error=_rank_setting(args.max_error, "max_error", float),
        sequential=False if args.no_sequential else None)
    if cfg.macs is None and cfg.params is None and cfg.latency is None:
        raise LrfxError("give a budget: --macs 0.5, --params 0.5 or --latency 0.6 (or in "
                        "--config)")
    out = _prepare_output(args.output, args.force)
    progress = not args.no_progress
    model, default = load_model(args.model)
    inputs = _inputs_for(args.model, args.input, default)
    calibration = data = None
    if args.calibration is not None:
        from lrfx.contrib.data import split_batches

        data = _dataset(args.calibration, inputs, args.model,
                        None if args.finetune else args.calibration_size)
        calibration = split_batches(*data, args.calibration_size, 128)
    elif args.finetune:
        raise LrfxError("--finetune needs --calibration with labelled data (fashion-mnist, "
                        "digits, a .pt of (inputs, targets) or an .npz with x and y)")
    with torch.no_grad():
        gm = compress(model, inputs, cfg, calibration=calibration, progress=progress)
    if args.finetune:
        assert data is not None
        _finetune(args, model, gm, *data)
    suffix = {"pt2": "pt2", "onnx": "onnx", "torchscript": "ts", "python": "py"}[args.format]
    save(gm, out, model_spec=args.model)
    with step(f"export ({args.format})", progress):
        export(gm, out / f"model.{suffix}", inputs, format=args.format,
               dynamic=_dynamic(args.dynamic))
    report = _report_of(gm)
    written = _write_report(report, out)
    print(report.table())
    print(f"wrote {out}/ (plan.json, weights.safetensors, model.{suffix}, manifest.json, "
          f"model_code.py, {', '.join(written)})")
    return 0


def _write_report(report: Any, out: Path) -> list[str]:
    """report.json always; report.md and its figures where the report can render them."""
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    names = ["report.json"]
    write = getattr(report, "write", None)
    if callable(write):
        names = sorted({*names, *(Path(p).name for p in write(out))})
    return names


def _print_table(result: Any) -> None:
    if not sys.stdout.isatty():
        print(result.table())  # plain text: nothing truncated when piped or logged
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result.model} at input {', '.join(map(str, result.input_shapes))}")
    cols = ["layer", "kind", "shape", "MACs", "params", "%", "max r", "r90", "r95", "r99"]
    for c in cols:  # names wrap, never truncate
        table.add_column(c, justify="left" if c in ("layer", "kind", "shape") else "right",
                         overflow="fold")
    for row in result.rows():
        table.add_row(*(row[c] for c in cols))
    console.print(table)
    console.print(
        f"total: {result.total_macs:,} MACs ({result.total_macs / 1e9:.3f} G), "
        f"{result.total_params:,} parameters, {len(result.factorable)} factorable layers"
    )
    for line in result.footer():
        console.print(line, markup=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrfx",
        description="Low-rank compression of PyTorch models as torch.fx graph passes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `lrfx COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what lrfx does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "analyze",
        help="per-layer MACs, parameters and singular-value spectra of a model",
        description="Trace a model and print, per layer: kind, weight shape, MACs, parameters, "
        "share of total MACs, and the rank that keeps 90/95/99% of the singular-value energy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_ANALYZE_EPILOG,
    )
    p.add_argument("model", metavar="MODEL",
                   help="torchvision:NAME, package.module:factory, or a torch.save'd nn.Module")
    p.add_argument("--input", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1x3x224x224 or 1x128:int64, or a keyword "
                   "input NAME=SHAPE[:dtype] such as input_ids=1x128:int64 (repeat for several "
                   "inputs; default: the model's documented input size)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the analysis as JSON to PATH (stdout when no PATH is given)")
    p.add_argument("--singular-values", action="store_true",
                   help="include every singular value in the JSON")
    p.add_argument("--no-spectra", action="store_true", help="skip the singular values")
    p.add_argument("--latency", action="store_true",
                   help="measure where the time goes instead: the model's latency and each "
                   "conv/linear layer's, timed on this machine at the --input shapes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_analyze)

    p = sub.add_parser(
        "compress",
        help="compress a model to a MACs or parameter budget in one call",
        description="Analyze, allocate ranks for the budget, rewrite, (with calibration data) "
        "whiten the factorization and recalibrate BatchNorm; write plan, weights, the exported "
        "graph and a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lrfx compress torchvision:resnet18 --macs 0.5 -o out/\n"
        "  lrfx compress torchvision:resnet50 --macs 0.5 --allocator energy --scheme channel "
        "-o out/\n"
        "  lrfx compress mypkg.nets:fmnist_net --macs 0.3 --calibration fashion-mnist "
        "--input 1x1x28x28 -o out/\n"
        "  lrfx compress torchvision:mobilenet_v2 --params 0.6 --round-to 8 -o out/\n"
        "  lrfx compress torchvision:resnet50 --latency 0.6 --input 32x3x224x224 -o out/\n",
    )
    p.add_argument("model", metavar="MODEL", help="as for lrfx analyze")
    p.add_argument("--macs", type=float, metavar="B",
                   help="MACs budget: a fraction in (0, 1] or an absolute count")
    p.add_argument("--params", type=float, metavar="B",
                   help="parameter budget: a fraction in (0, 1] or an absolute count")
    p.add_argument("--latency", type=float, metavar="F",
                   help="latency budget: a fraction in (0, 1] of the dense model's latency "
                   "measured on this machine at the --input shapes (layers timed and cached; "
                   "no layer is made slower)")
    p.add_argument("--latency-batch-sizes", metavar="B,B",
                   help="with --latency, also time at these batch sizes (e.g. 1,32): no layer "
                   "is made slower at any of them; the budget is their mean latency ratio")
    p.add_argument("--config", metavar="FILE",
                   help="a JSON lrfx.CompressConfig (budget, allocator, exclusions, rank "
                   "bounds...); the flags below override its fields")
    p.add_argument("--allocator", choices=["lc", "energy", "global_sigma", "uniform"],
                   help="rank allocator (default lc)")
    p.add_argument("--scheme", choices=["auto", "channel", "spatial", "tucker2", "cp"],
                   help="decomposition of the convs (default auto: the best per layer); cp is "
                   "plan-only (write it in a plan for lrfx apply); Linear layers use svd")
    p.add_argument("--exclude", action="append", metavar="LAYER",
                   help="leave a layer dense: a name (covers the layers under it), a glob such "
                   "as 'layer4.*', or type:Linear; repeatable")
    p.add_argument("--min-rank", action="append", metavar="R|LAYER=R",
                   help="smallest rank, for every layer or one (repeatable)")
    p.add_argument("--max-rank", action="append", metavar="R|LAYER=R",
                   help="largest rank, for every layer or one (repeatable)")
    p.add_argument("--max-error", action="append", metavar="E|LAYER=E",
                   help="largest predicted relative error a layer may get (0..1)")
    p.add_argument("--calibration", metavar="DATA",
                   help=f"{_CALIBRATION_HELP}: whitened (data-aware) factors and BN "
                   "recalibration")
    p.add_argument("--calibration-size", type=int, default=1024, metavar="N",
                   help="how many calibration samples (default 1024)")
    p.add_argument("--no-sequential", action="store_true",
                   help="with --calibration: whiten every layer by the original model's "
                   "statistics only, instead of fitting each layer to what the compressed layers "
                   "before it output (sequential calibration, the default)")
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="fine-tune the compressed model for EPOCHS epochs on the (labelled) "
                   "--calibration data before saving; with fashion-mnist, report the test "
                   "accuracy of the dense, compressed and fine-tuned models")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate of --finetune (default 1e-4)")
    p.add_argument("--round-to", type=int, metavar="K", help="round ranks to multiples of K")
    p.add_argument("--format", choices=["pt2", "onnx", "torchscript", "python"], default="pt2",
                   help="format of the exported graph (default pt2)")
    p.add_argument("--dynamic", metavar="DIMS", help=_DYNAMIC_HELP)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty output folder, replacing lrfx's own files")
    p.add_argument("--input", action="append", metavar="SHAPE", help="as for lrfx analyze")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: bars on a terminal, lines elsewhere)")
    p.set_defaults(run=_compress)

    p = sub.add_parser(
        "apply",
        help="rewrite a model according to a rank plan (JSON) and save the result",
        description="Replace the layers a plan names by their factored subgraphs; write the "
        "resolved plan, the weights (safetensors), a manifest and the graph's Python code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lrfx apply torchvision:resnet18 plan.json -o out/\n"
        "  lrfx apply mypkg.models:build plan.json -o out/ --input 1x3x32x32\n",
    )
    p.add_argument("model", metavar="MODEL", help="as for lrfx analyze")
    p.add_argument("plan", metavar="PLAN.json", help="a plan written by RankPlan.to_json()")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty output folder, replacing lrfx's own files")
    p.add_argument("--input", action="append", metavar="SHAPE", help="as for lrfx analyze")
    p.set_defaults(run=_apply)

    p = sub.add_parser(
        "prune",
        help="prune channels structurally by BatchNorm scale (network slimming's criterion)",
        description="Rank every prunable channel by |BatchNorm scale| (averaged over the "
        "channels that must go together: residual sums, concatenations, grouped convs...), "
        "remove the lowest ones globally for the budget, and save the pruned model like lrfx "
        "apply. Train with lrfx.Slimming first to make the scales sparse.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lrfx prune torchvision:resnet18 --macs 0.5 -o out/\n"
        "  lrfx prune mypkg.models:build --percent 0.3 -o out/ --input 1x3x32x32\n",
    )
    p.add_argument("model", metavar="MODEL", help="as for lrfx analyze")
    p.add_argument("--macs", type=float, metavar="F", help="keep at most this fraction of MACs")
    p.add_argument("--params", type=float, metavar="F",
                   help="keep at most this fraction of parameters")
    p.add_argument("--percent", type=float, metavar="P",
                   help="prune this fraction of the scored channels (the paper's rule)")
    p.add_argument("--min-channels", type=int, default=1, metavar="N",
                   help="channels every group keeps at least (default 1)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty output folder, replacing lrfx's own files")
    p.add_argument("--input", action="append", metavar="SHAPE", help="as for lrfx analyze")
    p.set_defaults(run=_prune)

    p = sub.add_parser(
        "export",
        help="export a directory written by lrfx apply to pt2, onnx, torchscript or python",
        description="Rebuild the rewritten model from DIR (original architecture + plan + "
        "weights) and export it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lrfx export out/ --format onnx\n"
        "  lrfx export out/ --format pt2 -o resnet18_lowrank.pt2\n",
    )
    p.add_argument("directory", metavar="DIR", help="a directory written by lrfx apply")
    p.add_argument("--format", choices=["pt2", "onnx", "torchscript", "python"], default="pt2")
    p.add_argument("--dynamic", metavar="DIMS", help=_DYNAMIC_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: DIR/model.*)")
    p.add_argument("--model", metavar="SPEC", help="the original model, if DIR does not say")
    p.add_argument("--input", action="append", metavar="SHAPE", help="override input shapes")
    p.set_defaults(run=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lrfx`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except LrfxError as exc:
        print(f"lrfx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
