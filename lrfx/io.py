"""Save, load and export rewritten graphs.

:func:`save` writes a directory with no pickled classes: ``plan.json`` (the resolved plan),
``weights.safetensors`` (every parameter and buffer), ``manifest.json`` (input shapes, the model
spec when known, the lrfx version) and ``model_code.py`` (the readable Python of the rewritten
graph). :func:`lrfx.load` rebuilds the graph from the original architecture plus the plan and
loads the weights. :func:`export` writes ``pt2`` (torch.export), ``onnx``, ``torchscript`` or
``python``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from lrfx._version import __version__
from lrfx.errors import LrfxError
from lrfx.facts import get_graph_facts
from lrfx.plan import RankPlan
from lrfx.tracing import as_input_tuple

__all__ = ["EXPORT_FORMATS", "export", "read_manifest", "save"]

EXPORT_FORMATS = ("pt2", "onnx", "torchscript", "python")

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
CODE_FILE = "model_code.py"


def _plan_of(gm: fx.GraphModule) -> RankPlan:
    plan = get_graph_facts(gm).plan
    if not isinstance(plan, RankPlan):
        raise LrfxError("this graph module was not produced by lrfx.apply / lrfx.compress (it "
                        "carries no plan in gm.meta['lrfx']); rewrite the model with lrfx first")
    return plan


def save(gm: fx.GraphModule, path: str | Path, *, model_spec: str | None = None) -> Path:
    """Write plan, weights, manifest and code of a rewritten graph module to directory ``path``.

    Args:
        gm: A graph module returned by :func:`lrfx.apply` (trained further or not).
        path: Output directory (created if needed).
        model_spec: How to rebuild the original model (e.g. ``torchvision:resnet18``), recorded
            so that ``lrfx export`` can rebuild it from the directory alone.

    Example:
        >>> import torch, torchvision, lrfx, tempfile
        >>> m, x = torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)
        >>> gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 32)}, x)
        >>> out = lrfx.save(gm, tempfile.mkdtemp())
        >>> sorted(p.name for p in out.iterdir())
        ['manifest.json', 'model_code.py', 'plan.json', 'weights.safetensors']
    """
    from safetensors.torch import save_model

    plan = _plan_of(gm)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(plan.to_json() + "\n")
    save_model(gm, str(out / WEIGHTS_FILE))
    facts = get_graph_facts(gm)
    report = facts.report
    manifest = {
        "format": "lrfx.saved",
        "lrfx_version": __version__,
        "model": model_spec,
        "model_class": type(gm).__name__,
        "input_shapes": [list(s) for s in facts.input_shapes],
        "macs_before": None if report is None else report.macs_before,
        "macs_after": None if report is None else report.macs_after,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / CODE_FILE).write_text(gm.code)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a directory written by :func:`save`."""
    f = Path(path) / MANIFEST_FILE
    if not f.is_file():
        raise LrfxError(f"{str(path)!r} is not an lrfx output directory (no {MANIFEST_FILE}); "
                        "write one with lrfx.save or `lrfx apply ... -o DIR`")
    data: dict[str, Any] = json.loads(f.read_text())
    return data


def export(
    gm: fx.GraphModule, path: str | Path, example_inputs: Any, *, format: str = "pt2"
) -> Path:
    """Export a (rewritten) graph module.

    Args:
        gm: The graph module.
        path: Output file.
        example_inputs: A tensor or tuple of positional inputs.
        format: ``pt2`` (``torch.export``; reload with ``torch.export.load``), ``onnx``,
            ``torchscript`` (reload with ``torch.jit.load``) or ``python`` (the graph's code).

    Example:
        >>> import torch, torchvision, lrfx, tempfile, os
        >>> m, x = torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)
        >>> gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 32)}, x)
        >>> f = lrfx.export(gm, os.path.join(tempfile.mkdtemp(), "m.pt2"), x, format="pt2")
        >>> torch.export.load(f).module()(x).shape
        torch.Size([1, 1000])
    """
    if format not in EXPORT_FORMATS:
        raise LrfxError(f"unknown export format {format!r}; choose one of "
                        f"{', '.join(EXPORT_FORMATS)}")
    inputs = as_input_tuple(example_inputs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = gm.training
    gm.eval()
    try:
        if format == "python":
            out.write_text(gm.code)
        elif format == "pt2":
            ep = torch.export.export(gm, inputs)
            torch.export.save(ep, str(out))
        elif format == "torchscript":
            # TorchScript is deprecated upstream but still what many runtimes load; offer it
            # without the warnings (the deprecation is documented in the README)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.trace(gm, inputs)
                torch.jit.save(scripted, str(out))
        else:
            _export_onnx(gm, inputs, out)
    finally:
        gm.train(was_training)
    return out


def _export_onnx(gm: fx.GraphModule, inputs: tuple[Any, ...], out: Path) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise LrfxError("ONNX export needs the onnx package: pip install 'lrfx[export]'") from exc
    names = [f"input_{i}" for i in range(len(inputs))]
    torch.onnx.export(gm, inputs, str(out), input_names=names, output_names=["output"],
                      dynamo=True, external_data=False, verbose=False)
