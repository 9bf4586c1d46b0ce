"""Save, load and export rewritten models.

:func:`save` writes a directory with no pickled classes: ``plan.json`` (the resolved plan),
``weights.safetensors`` (every parameter and buffer), ``manifest.json`` (capture mode, inputs,
the model spec when known, the lrfx version) and ``model_code.py`` (the readable Python of the
rewritten graph; for a module-mode result, which keeps the model's own class and code, the
printed module tree instead). :func:`lrfx.load` rebuilds the result from the original
architecture plus the plan and assigns the weights. :func:`export` writes ``pt2``
(torch.export), ``onnx``, ``torchscript`` or ``python``.

Both kinds of result work the same: a ``GraphModule`` (FX mode) and a model that kept its own
class (module mode, see :mod:`lrfx.tracing`). Their facts are read with :func:`lrfx.facts_of`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lrfx._version import __version__
from lrfx.errors import LrfxError
from lrfx.facts import GraphFacts, facts_of
from lrfx.inputs import Inputs
from lrfx.plan import RankPlan
from lrfx.tracing import call_inputs, check_module

__all__ = ["EXPORT_FORMATS", "export", "read_manifest", "save", "verify_saved"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("pt2", "onnx", "torchscript", "python")

#: Models with more bytes of weights than this are exported to ONNX with external data.
ONNX_SINGLE_FILE_LIMIT = 1_800_000_000

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
CODE_FILE = "model_code.py"


def _plan_of(model: nn.Module) -> RankPlan:
    plan = facts_of(model).plan
    if not isinstance(plan, RankPlan):
        raise LrfxError(f"this {type(model).__name__} was not produced by lrfx.apply / "
                        "lrfx.compress / lrfx.load (it carries no lrfx plan: see "
                        "lrfx.facts_of); rewrite the model with lrfx first")
    return plan


def _inputs_record(facts: GraphFacts) -> list[dict[str, Any]]:
    """The graph inputs (names, shapes, dtypes), enough to make example inputs again."""
    names = facts.input_spec.names or tuple(f"input_{i}" for i in range(len(facts.input_shapes)))
    dtypes = facts.input_dtypes or ("float32",) * len(facts.input_shapes)
    keyword = facts.capture.mode == "module"
    return [{"name": n if keyword else None, "shape": list(s), "dtype": d}
            for n, s, d in zip(names, facts.input_shapes, dtypes, strict=False)]


def save(model: nn.Module, path: str | Path, *, model_spec: str | None = None) -> Path:
    """Write plan, weights, manifest and code of a rewritten model to directory ``path``.

    Args:
        model: A result of :func:`lrfx.apply`, :func:`lrfx.compress` or :func:`lrfx.load`
            (trained further or not): a graph module, or a model that kept its own class.
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

    check_module(model)
    plan = _plan_of(model)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LrfxError(f"lrfx.save writes a directory, and {str(out)!r} is a file: pass a new "
                        "or existing directory path (lrfx.export writes single files)")
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(plan.to_json() + "\n")
    save_model(model, str(out / WEIGHTS_FILE))
    facts = facts_of(model)
    report = facts.report
    manifest = {
        "format": "lrfx.saved",
        "lrfx_version": __version__,
        "model": model_spec,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "mode": facts.capture.mode,
        "training": model.training,  # lrfx.load returns it in this mode
        "input_shapes": [list(s) for s in facts.input_shapes],
        "inputs": _inputs_record(facts),
        "macs_before": None if report is None else report.macs_before,
        "macs_after": None if report is None else report.macs_after,
        # lrfx.load refuses weights that differ from what was written (a damaged copy);
        # plan.json may be edited by hand, so it is recorded but only reported when it differs.
        "sha256": {name: _sha256(out / name) for name in (WEIGHTS_FILE, PLAN_FILE)},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if isinstance(model, fx.GraphModule):
        (out / CODE_FILE).write_text(model.code)
    else:
        (out / CODE_FILE).write_text(
            f"# {type(model).__qualname__} compressed in module mode: it runs its own class's "
            f"code\n# ({type(model).__module__}); the factored layers in place:\n"
            + "".join(f"# {line}\n" for line in repr(model).splitlines()))
    return out


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a directory written by :func:`save`."""
    d = Path(path)
    if not d.is_dir():
        what = "is a file" if d.exists() else "does not exist"
        raise LrfxError(f"{str(path)!r} {what}, so it has no {MANIFEST_FILE}: pass a directory "
                        "written by lrfx.save or `lrfx compress ... -o DIR`")
    f = d / MANIFEST_FILE
    if not f.is_file():
        raise LrfxError(f"{str(path)!r} is not an lrfx output directory (no {MANIFEST_FILE}); "
                        "write one with lrfx.save or `lrfx apply ... -o DIR`")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LrfxError(f"{str(f)!r} is damaged (not valid JSON: {exc}); save the model "
                        "again") from exc
    if not isinstance(data, dict) or data.get("format") != "lrfx.saved":
        raise LrfxError(f"{str(f)!r} is not an lrfx manifest (no \"format\": \"lrfx.saved\")")
    return data


def verify_saved(path: str | Path) -> dict[str, Any]:
    """Check a directory written by :func:`save` before loading it: the files are there and the
    weights are byte for byte what was written (SHA-256 in the manifest). Returns the manifest.

    Raises:
        LrfxError: A file is missing, or the weights file differs from the one saved (damaged
            in a copy or edited). Directories saved before checksums were recorded are only
            checked for missing files; :func:`lrfx.load` also refuses non-finite weights.
    """
    d = Path(path)
    manifest = read_manifest(d)
    for name in (PLAN_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise LrfxError(f"{str(d)!r} has no {name}: the directory is incomplete; save the "
                            "model again (lrfx.save writes plan, weights and manifest together)")
    sums = manifest.get("sha256") or {}
    want = sums.get(WEIGHTS_FILE)
    if want is not None and _sha256(d / WEIGHTS_FILE) != want:
        raise LrfxError(f"{str(d / WEIGHTS_FILE)!r} is damaged: its SHA-256 differs from the one "
                        "recorded when it was saved (a truncated or corrupted copy?); copy it "
                        "again or save the model again")
    want = sums.get(PLAN_FILE)
    if want is not None and _sha256(d / PLAN_FILE) != want:
        log.warning("%s was edited after it was saved; the weights must still fit it",
                    d / PLAN_FILE)
    return manifest


def export(
    model: nn.Module, path: str | Path, example_inputs: Any, *, format: str = "pt2",
    dynamic: Any = None,
) -> Path:
    """Export a (rewritten) model, with static or dynamic input dimensions.

    Args:
        model: A graph module, or a model compressed in module mode (it keeps its own class).
        path: Output file.
        example_inputs: In any form the entry points accept (a tensor, a tuple, a mapping of
            keyword inputs, ``(args, kwargs)``).
        format: ``pt2`` (``torch.export``; reload with ``torch.export.load``), ``onnx``
            (inputs named ``input_0``, ``input_1``... when positional, by their keyword
            otherwise; weights over 1.8 GB go to ``<path>.data`` beside it), ``torchscript``
            (reload with ``torch.jit.load``) or ``python`` (the
            graph's code; graph modules only).
        dynamic: Which input dimensions may vary in the artifact (pt2 and onnx):

            * ``None`` / ``False``: none (the example's shapes are fixed);
            * ``True`` or ``"batch"``: dim 0 of every tensor input;
            * a sequence of names, ``("batch", "sequence")``: dim 0 of every tensor input is
              ``batch``, and dim 1 of every integer input of rank 2 or more (token ids,
              attention masks, position and token-type ids) is ``sequence``;
            * a mapping ``{input name: {dim: dim name}}`` for anything else (input names as
              ``lrfx.export`` names them for ONNX: the keyword, or ``input_0``...).

            Dims with one name are equal (``input_ids`` and ``attention_mask`` share
            ``batch`` and ``sequence``). An example of size 1 in a dynamic dim is widened to 2
            for the export (torch specializes size-1 dims). torchscript and python exports are
            traced and take no ``dynamic``.

    Raises:
        LrfxError: Unknown format; a ``dynamic`` that names no input or an absent dim; a
            dimension the model's code fixes (named, with what to do).

    Example:
        >>> import torch, torchvision, lrfx, tempfile, os
        >>> m, x = torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)
        >>> gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 32)}, x)
        >>> f = lrfx.export(gm, os.path.join(tempfile.mkdtemp(), "m.pt2"), x, format="pt2")
        >>> torch.export.load(f).module()(x).shape
        torch.Size([1, 1000])
    """
    check_module(model)
    if format not in EXPORT_FORMATS:
        raise LrfxError(f"unknown export format {format!r}; choose one of "
                        f"{', '.join(EXPORT_FORMATS)}")
    inputs = Inputs.of(example_inputs)
    bound: dict[str, Any] = {}
    if isinstance(model, fx.GraphModule):
        spec = facts_of(model).input_spec
        fed = spec.feed(inputs)  # checks names and fixed values; the graph's inputs in order
        if inputs.kwargs:  # keep the keywords: the graph's forward names its inputs
            inputs = Inputs((), dict(zip(spec.names, fed, strict=True)))
            names = list(spec.names)
        else:
            inputs = Inputs(fed)
            names = [f"input_{i}" for i in range(len(fed))]
    else:
        bound = {k: v for k, v in call_inputs(model, inputs).kwargs.items()
                 if k not in inputs.kwargs}
        names = [f"input_{i}" for i in range(len(inputs.args))] + list(inputs.kwargs)
    dims = _dynamic_dims(dynamic, inputs, names)
    if dims and format in ("torchscript", "python"):
        raise LrfxError(f"dynamic= applies to pt2 and onnx exports; format={format!r} is traced "
                        "at the example's shapes (export as pt2 or onnx for dynamic dims)")
    if dims:
        inputs = _widen(inputs, names, dims)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    target: nn.Module = model
    if not isinstance(model, fx.GraphModule) and bound:
        target = _Bound(model, bound, inputs).eval()  # takes exactly the caller's inputs
    try:
        if format == "python":
            if not isinstance(model, fx.GraphModule):
                raise LrfxError(
                    f"format='python' writes a graph's code; this {type(model).__name__} was "
                    "compressed in module mode and runs its own class's code (see "
                    "lrfx.facts_of(model).capture); export it as pt2 or onnx")
            out.write_text(model.code)
        elif format == "pt2":
            try:
                ep = torch.export.export(target, inputs.args, dict(inputs.kwargs),
                                         dynamic_shapes=_dynamic_shapes(target, inputs, names,
                                                                        dims))
            except Exception as exc:
                if dims:
                    raise _dynamic_error(model, dims, exc) from exc
                raise LrfxError(
                    f"torch.export cannot export {type(model).__name__} ({_first_line(exc)}); "
                    f"this comes from the model's own code{_suspects(model)}: the dense model "
                    "fails the same way. Rewrite that part with torch.cond, or export as "
                    "torchscript (which records the path the example inputs take)") from exc
            if dims:
                _check_dynamic(model, ep, inputs, names, dims)
            torch.export.save(ep, str(out))
        elif format == "torchscript":
            # TorchScript is deprecated upstream but still what many runtimes load; offer it
            # without the warnings (the deprecation is documented in the README)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                if inputs.kwargs:
                    scripted = torch.jit.trace(target, example_kwarg_inputs=dict(inputs.kwargs),
                                               strict=False)
                else:
                    scripted = torch.jit.trace(target, inputs.args, strict=False)
                torch.jit.save(scripted, str(out))
        else:
            _export_onnx(target, inputs, names, out, dims)
    finally:
        model.train(was_training)
    return out


class _Bound(nn.Module):
    """``model`` with keyword arguments bound (``use_cache=False``: a cache is no output an
    exported model can return), so that the exported artifact takes the caller's inputs."""

    def __init__(self, model: nn.Module, bound: dict[str, Any], inputs: Inputs | None = None
                 ) -> None:
        super().__init__()
        self.model = model
        self.bound = bound
        if inputs is not None:  # name the inputs: torch.export keys dynamic shapes by them
            params = [inspect.Parameter(f"input_{i}", inspect.Parameter.POSITIONAL_ONLY)
                      for i in range(len(inputs.args))]
            params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY)
                       for k in inputs.kwargs]

            def forward(*args: Any, **kwargs: Any) -> Any:
                return self.model(*args, **kwargs, **self.bound)

            forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
            self.forward = forward  # type: ignore[method-assign]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs, **self.bound)


def _dynamic_dims(dynamic: Any, inputs: Inputs, names: list[str]
                  ) -> dict[str, dict[int, str]]:
    """``{input name: {dim: dim name}}`` from ``export``'s ``dynamic`` (checked)."""
    if dynamic is None or dynamic is False:
        return {}
    tensors = dict(zip(names, [*inputs.args, *inputs.kwargs.values()], strict=False))
    tensors = {n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if dynamic is True or dynamic == "batch":
        dynamic = ("batch",)
    if isinstance(dynamic, str):
        raise LrfxError(f"dynamic={dynamic!r}: use True or 'batch', a sequence of dim names "
                        "such as ('batch', 'sequence'), or {input name: {dim: name}}")
    if isinstance(dynamic, Mapping):
        out: dict[str, dict[int, str]] = {}
        for name, given in dynamic.items():
            if name not in tensors:
                raise LrfxError(f"dynamic: no tensor input named {name!r}; the inputs are "
                                f"{sorted(tensors)}")
            if not isinstance(given, Mapping) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and isinstance(v, str)
                    for d, v in given.items()):
                raise LrfxError(f"dynamic[{name!r}] must map dims to names, e.g. {{0: 'batch'}}, "
                                f"got {given!r}")
            rank = tensors[name].dim()
            for d in given:
                if not -rank <= d < rank:
                    raise LrfxError(f"dynamic[{name!r}]: dim {d} does not exist (the example "
                                    f"has shape {tuple(tensors[name].shape)})")
            out[name] = {d % rank: v for d, v in given.items()}
        return out
    if not isinstance(dynamic, Sequence) or not dynamic or not all(
            isinstance(v, str) for v in dynamic):
        raise LrfxError(f"dynamic must be None, True, 'batch', a sequence of dim names or a "
                        f"mapping; got {dynamic!r}")
    unknown = [v for v in dynamic if v not in ("batch", "sequence")]
    if unknown:
        raise LrfxError(f"dynamic: {unknown[0]!r} is not 'batch' or 'sequence'; name other dims "
                        "with a mapping {input name: {dim: name}}")
    out = {}
    for name, t in tensors.items():
        spec: dict[int, str] = {}
        if "batch" in dynamic and t.dim() >= 1:
            spec[0] = "batch"
        if ("sequence" in dynamic and t.dim() >= 2 and not t.is_floating_point()
                and not t.is_complex()):
            spec[1] = "sequence"
        if spec:
            out[name] = spec
    return out


def _widen(inputs: Inputs, names: list[str], dims: Mapping[str, Mapping[int, str]]) -> Inputs:
    """Example inputs with every dynamic dim of size 0 or 1 repeated to size 2."""
    def widen(name: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        for d in dims.get(name, {}):
            if x.shape[d] < 2:
                x = x.narrow(d, 0, 1).expand(*(2 if i == d else -1 for i in range(x.dim())))
                x = x.contiguous()
        return x

    n_args = len(inputs.args)
    args = tuple(widen(n, a) for n, a in zip(names[:n_args], inputs.args, strict=False))
    kwargs = {k: widen(k, v) for k, v in inputs.kwargs.items()}
    return Inputs(args, kwargs)


def _dynamic_shapes(target: nn.Module, inputs: Inputs, names: list[str],
                    dims: Mapping[str, Mapping[int, str]]) -> Any:
    """``torch.export``'s ``dynamic_shapes`` for ``dims``, in the structure of the inputs."""
    if not dims:
        return None
    from torch.export import Dim

    def shape(name: str, x: Any) -> Any:
        # Dim.AUTO: torch infers ranges (a position table's length) and equalities (ids and
        # mask share their dims); _check_dynamic then makes sure nothing was specialized
        if not isinstance(x, torch.Tensor) or name not in dims:
            return None
        return dict.fromkeys(dims[name], Dim.AUTO)

    n_args = len(inputs.args)
    args = tuple(shape(n, a) for n, a in zip(names[:n_args], inputs.args, strict=False))
    kwargs = {k: shape(k, v) for k, v in inputs.kwargs.items()}
    if not kwargs:
        return args
    # a dict keyed by the parameters the inputs bind to (``*args`` / ``**kwargs`` included)
    sig = inspect.signature(target.forward)
    bound = sig.bind(*args, **kwargs).arguments
    return dict(bound)


def _check_dynamic(model: nn.Module, ep: Any, inputs: Inputs, names: list[str],
                   dims: Mapping[str, Mapping[int, str]]) -> None:
    """Refuse an exported program in which a dim asked to be dynamic was specialized."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    tensors = [n for n, x in zip(names, [*inputs.args, *inputs.kwargs.values()], strict=False)
               if isinstance(x, torch.Tensor)]
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [p for p in placeholders if p.name in set(ep.graph_signature.user_inputs)]
    fixed = []
    for name, node in zip(tensors, user, strict=False):
        val = node.meta.get("val")
        for d, label in dims.get(name, {}).items():
            if val is not None and is_concrete_int(val.shape[d]):  # specialized
                fixed.append(f"{name}[{d}] ({label}) = {int(val.shape[d])}")
    if fixed:
        raise LrfxError(f"cannot export {type(model).__name__} with dynamic {', '.join(fixed)}: "
                        "the model's code fixes that size (a reshape to a constant, a "
                        "size-specific branch). Export with fewer dynamic dims (e.g. "
                        "dynamic='batch'), or static (dynamic=None)")


def _check_onnx_dynamic(model: nn.Module, out: Path, dims: Mapping[str, Mapping[int, str]]
                        ) -> None:
    """Refuse an ONNX file whose inputs fix a dim asked to be dynamic."""
    import onnx

    graph = onnx.load(str(out), load_external_data=False).graph
    fixed = []
    for inp in graph.input:
        shape = inp.type.tensor_type.shape.dim
        for d, label in dims.get(inp.name, {}).items():
            if d < len(shape) and not shape[d].dim_param:
                fixed.append(f"{inp.name}[{d}] ({label}) = {shape[d].dim_value}")
    if fixed:
        out.unlink(missing_ok=True)
        raise LrfxError(f"cannot export {type(model).__name__} to ONNX with dynamic "
                        f"{', '.join(fixed)}: the model's code fixes that size. Export with fewer "
                        "dynamic dims (e.g. dynamic='batch'), or static (dynamic=None)")


def _dynamic_error(model: nn.Module, dims: Mapping[str, Mapping[int, str]],
                   exc: BaseException) -> LrfxError:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    wanted = ", ".join(f"{n}[{d}]={v}" for n, spec in dims.items() for d, v in spec.items())
    fixed = re.findall(r"[Nn]ot all values of (\w+)[^\n]*", text)
    which = (f" (torch: not all values of {', '.join(sorted(set(fixed)))} are valid)"
             if fixed else "")
    return LrfxError(
        f"cannot export {type(model).__name__} with dynamic dims {wanted}{which}: the model's "
        f"code fixes some of them ({_first_line(exc)}). Export with fewer dynamic dims (e.g. "
        "dynamic='batch'), or static (dynamic=None)")


def _export_onnx(model: nn.Module, inputs: Inputs, names: list[str], out: Path,
                 dims: Mapping[str, Mapping[int, str]] | None = None) -> None:
    """ONNX through ``torch.export`` (the dynamo exporter); where that fails in torch's own
    decomposition (T5's attention in torch 2.14, for one), through the TorchScript-based
    exporter, with a warning."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise LrfxError("ONNX export needs the onnx package: pip install 'lrfx[export]'") from exc
    outputs = ["output"] if isinstance(model, fx.GraphModule) else None
    kwargs = dict(inputs.kwargs) or None
    # protobuf caps one file at 2 GB: bigger models keep their weights in "<file>.data" beside it
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    external = size > ONNX_SINGLE_FILE_LIMIT
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)  # "Evaluation failed" notes of a best-effort optimizer
    source: Any = model
    if dims:  # export once, check that nothing was specialized, convert that program
        try:
            source = torch.export.export(model, inputs.args, kwargs or {},
                                         dynamic_shapes=_dynamic_shapes(model, inputs, names,
                                                                        dims))
        except Exception as exc:
            raise _dynamic_error(model, dims, exc) from exc
        _check_dynamic(model, source, inputs, names, dims)
    try:
        torch.onnx.export(source, inputs.args, str(out), kwargs=kwargs, input_names=names,
                          output_names=outputs, dynamo=True, external_data=external,
                          verbose=False)
        if dims:
            _check_onnx_dynamic(model, out, dims)
        return
    except Exception as exc:
        if dims and "onstraint" in str(exc):  # the model fixes a dim: no exporter will do
            raise _dynamic_error(model, dims, exc) from exc
        log.warning("torch.onnx's dynamo exporter failed on %s (%s); using the TorchScript-based "
                    "exporter, which records the path the example inputs take through any "
                    "data-dependent control flow%s", type(model).__name__, _first_line(exc),
                    _suspects(model))
    finally:
        folding.setLevel(level)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            axes: dict[str, Any] = {n: dict(d) for n, d in (dims or {}).items()}
            if axes and outputs and any(0 in d for d in axes.values()):
                axes[outputs[0]] = {0: "batch"}
            torch.onnx.export(model, inputs.args, str(out), kwargs=kwargs, input_names=names,
                              output_names=outputs, dynamo=False, dynamic_axes=axes or None)
        except Exception as exc:
            raise LrfxError(f"cannot export {type(model).__name__} to ONNX: both torch.onnx "
                            f"exporters failed (the last: {_first_line(exc)}); export as pt2 "
                            "instead") from exc


def _suspects(model: nn.Module) -> str:
    """The submodules that could not be traced (data-dependent control flow, usually), named
    with their reasons, for export errors."""
    try:
        leaves = facts_of(model).leaves
    except Exception:  # no facts: not an lrfx result
        return ""
    if not leaves:
        return " (data-dependent control flow, say)"
    named = "; ".join(f"{leaf.name!r} ({leaf.type}: {leaf.reason})" for leaf in leaves[:3])
    return f", most likely the submodule(s) lrfx could not trace either: {named}"


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch.onnx colors its messages
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]
