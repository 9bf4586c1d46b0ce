"""The ``lrfx`` command line.

Example:
    $ lrfx analyze torchvision:resnet18
    $ lrfx analyze torchvision:vit_b_16 --json vit.json
    $ lrfx analyze mypkg.models:build --input 1x3x32x32
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lrfx.errors import LrfxError

__all__ = ["main"]

_ANALYZE_EPILOG = """\
examples:
  lrfx analyze torchvision:resnet18
  lrfx analyze torchvision:vit_b_16 --json vit.json
  lrfx analyze torchvision:resnet50 --input 8x3x160x160 --no-spectra
  lrfx analyze mypkg.models:build_net --input 1x3x32x32
  lrfx analyze saved_model.pt --input 1x1x28x28
  lrfx analyze mypkg.bert:make_encoder --input 1x128:int64
"""


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from lrfx.analysis import analyze
    from lrfx.models import load_model, parse_input_spec

    model, default_shape = load_model(args.model)
    if args.input:
        inputs = tuple(parse_input_spec(s) for s in args.input)
    elif default_shape is not None:
        inputs = (parse_input_spec("x".join(map(str, default_shape))),)
    else:
        raise LrfxError(f"model {args.model!r} has no default input shape; pass --input, "
                        "e.g. --input 1x3x224x224")
    progress = not args.no_progress and sys.stderr.isatty()
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


def _print_table(result: Any) -> None:
    if not sys.stdout.isatty():
        print(result.table())  # plain text: nothing truncated when piped or logged
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result.model} at input {', '.join(map(str, result.input_shapes))}")
    cols = ["layer", "kind", "shape", "MACs", "params", "%", "max r", "r90", "r95", "r99"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("layer", "kind", "shape") else "right")
    for row in result.rows():
        table.add_row(*(row[c] for c in cols))
    console.print(table)
    console.print(
        f"total: {result.total_macs:,} MACs ({result.total_macs / 1e9:.3f} G), "
        f"{result.total_params:,} parameters, {len(result.factorable)} factorable layers"
    )
    for leaf in result.leaves:
        console.print(f"leaf module {leaf.name} ({leaf.type}): {leaf.reason}", markup=False)


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
        "share of total MACs, and the rank that keeps 90/95/99%% of the singular-value energy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_ANALYZE_EPILOG,
    )
    p.add_argument("model", metavar="MODEL",
                   help="torchvision:NAME, package.module:factory, or a torch.save'd nn.Module")
    p.add_argument("--input", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1x3x224x224 or 1x128:int64 (repeat for "
                   "several inputs; default: the model's documented input size)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the analysis as JSON to PATH (stdout when no PATH is given)")
    p.add_argument("--singular-values", action="store_true",
                   help="include every singular value in the JSON")
    p.add_argument("--no-spectra", action="store_true", help="skip the singular values")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_analyze)
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
