"""Fine-tune and evaluate: a reference training loop and an evaluation helper.

Neither is required — a compressed model is an ordinary ``nn.Module`` that trains in your own
loop — but both are here so that the common path takes three lines:

    >>> import torch, lrfx
    >>> from lrfx.training import evaluate, fit
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> dense = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> small = lrfx.compress(dense, x[:1], macs=0.5)
    >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> before = evaluate(small, data, reference=dense)
    >>> fit(small, data, epochs=1).steps
    4
    >>> 0 <= evaluate(small, data, reference=dense).agreement <= 1
    True

Batches are whatever your data yields — tensors, ``(inputs, targets)`` pairs, dicts with a
``labels`` entry — split by :func:`lrfx.batches.split_batch` (``inputs=`` selects the model's
part). Both helpers move batches to the model's device, and leave every model in the train/eval
mode it was in.

**Callbacks** are how training-time methods plug into :func:`fit` (and into your own loop, the
same way): any object with some of these methods —

* ``penalty(model) -> Tensor | None``: added to the loss before ``backward()``;
* ``after_backward(model)``: gradients are there, the step has not happened (subgradients,
  gradient masks);
* ``after_step(model)``: after ``optimizer.step()`` (projections, proximal steps, schedules);
* ``end_epoch(model, epoch)``: after each epoch;
* ``backward(model, inputs, targets) -> (loss, ...)``: replaces the loss, the penalties and
  ``backward()`` for methods that need several passes per batch (Decomposable-Net); its first
  returned value is the loss reported. At most one callback may have it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from lrfx.batches import InputSelector, check_selector, split_batch, take_batches
from lrfx.errors import LrfxError
from lrfx.inputs import Inputs
from lrfx.progress import progress_bar

__all__ = ["Evaluation", "FitResult", "evaluate", "fit", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a model's output: the tensor itself, a tuple's first tensor, or a
    dict's / ``ModelOutput``'s ``logits`` (else its first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        if "logits" in output:
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise LrfxError(f"cannot find the prediction tensor in a model output of type "
                    f"{type(output).__name__}: pass logits=callable(output) -> tensor")


def _device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(x: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True)
                    if isinstance(t, torch.Tensor) else t, x)


@contextlib.contextmanager
def _modes(models: Sequence[nn.Module], train: bool) -> Iterator[None]:
    """Set every module's mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        n: Samples seen.
        accuracy: Top-1 accuracy against the batches' targets (``None`` without targets).
        loss: Mean cross-entropy against class-index targets (``None`` without them).
        agreement: Fraction of samples whose top-1 prediction equals the reference's.
        cosine: Mean cosine similarity of each sample's output with the reference's.
        relative_error: ``||output - reference|| / ||reference||`` over all samples.
    """

    n: int
    accuracy: float | None = None
    loss: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    relative_error: float | None = None

    def __str__(self) -> str:
        parts = [f"{self.n} samples"]
        for name in ("accuracy", "loss", "agreement", "cosine", "relative_error"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name.replace('_', ' ')} {v:.4f}")
        return ", ".join(parts)


def _forward(model: nn.Module, x: Any, where: str) -> Any:
    try:
        return Inputs.of(x, where).call(model)
    except LrfxError:
        raise
    except (RuntimeError, TypeError, ValueError) as exc:
        raise LrfxError(f"{where} does not fit {type(model).__name__}: {exc}") from exc


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    reference: nn.Module | None = None,
    inputs: InputSelector = "auto",
    max_batches: int | None = None,
    device: Any = None,
    logits: Callable[[Any], torch.Tensor] | None = None,
) -> Evaluation:
    """Accuracy (and loss) on labelled batches, and agreement with a reference model.

    Args:
        model: The model to evaluate (a compressed one, say).
        data: Batches: a ``DataLoader`` or any iterable (see :mod:`lrfx.batches`).
        reference: The model to compare with (the original dense one): top-1 agreement,
            output cosine similarity and relative error.
        inputs: Which part of a batch feeds the model.
        max_batches: Read at most this many batches.
        device: Where to run (default: the model's parameters' device).
        logits: Picks the prediction tensor from an output (default :func:`logits_of`).

    Raises:
        LrfxError: No batch; a batch that does not fit (named ``batch k``).
    """
    check_selector(inputs, "inputs")
    pick = logits or logits_of
    dev = _device(model, device)
    models = [model] if reference is None else [model, reference]
    n = correct = agree = 0
    loss_sum = cos_sum = diff_sq = ref_sq = 0.0
    labelled = True
    with torch.no_grad(), _modes(models, train=False):
        for k, batch in enumerate(take_batches(data, max_batches, "evaluate")):
            x, y = split_batch(batch, model, inputs, f"batch {k}")
            x = _to(x, dev)
            out = pick(_forward(model, x, f"batch {k}")).float()
            b = out.shape[0]
            n += b
            pred = out.argmax(-1) if out.dim() > 1 else out
            if y is None or not isinstance(y, torch.Tensor):
                labelled = False
            else:
                y = y.to(dev)
                if y.dtype in (torch.int64, torch.int32) and out.dim() == 2:
                    correct += int((pred == y).sum())
                    loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                else:
                    labelled = False
            if reference is not None:
                ref = pick(_forward(reference, x, f"batch {k}")).float()
                agree += int((pred == (ref.argmax(-1) if ref.dim() > 1 else ref)).sum())
                a, r = out.reshape(b, -1), ref.reshape(b, -1)
                cos_sum += float(F.cosine_similarity(a, r, dim=1, eps=1e-12).sum())
                diff_sq += float((a - r).pow(2).sum())
                ref_sq += float(r.pow(2).sum())
    if n == 0:
        raise LrfxError("evaluate: data holds no batch")
    return Evaluation(
        n=n,
        accuracy=correct / n if labelled else None,
        loss=loss_sum / n if labelled else None,
        agreement=None if reference is None else agree / n,
        cosine=None if reference is None else cos_sum / n,
        relative_error=None if reference is None else math.sqrt(diff_sq / max(ref_sq, 1e-30)),
    )


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did: mean training loss per epoch, optimizer steps, wall time."""

    losses: tuple[float, ...]
    steps: int
    seconds: float
    history: tuple[float, ...] = field(default=(), repr=False)  # loss of every step


def _call(cb: Any, name: str, *args: Any) -> Any:
    fn = getattr(cb, name, None)
    return fn(*args) if callable(fn) else None


def fit(
    model: nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-4,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    inputs: InputSelector = "auto",
    max_batches: int | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = False,
    device: Any = None,
) -> FitResult:
    """Train ``model`` in place for ``epochs`` passes over ``data`` (a reference loop).

    Args:
        model: The model (a compressed one: its factors are ordinary parameters).
        data: Batches with targets: ``(inputs, targets)`` pairs, dicts with ``labels``...; a
            list is re-read every epoch, a ``DataLoader`` re-iterated (reshuffled if it shuffles).
        epochs: Passes over ``data``.
        optimizer: Yours; default Adam(lr) over the trainable parameters.
        lr: Learning rate of the default optimizer (1e-4: fine-tuning a compressed model,
            not training from scratch).
        loss: ``loss(output, targets) -> scalar``; default cross-entropy of the prediction
            tensor (:func:`logits_of`) against class indices.
        inputs: Which part of a batch feeds the model.
        max_batches: At most this many batches per epoch.
        callbacks: Objects with ``penalty`` / ``after_backward`` / ``after_step`` /
            ``end_epoch`` / ``backward`` methods (see the module docstring).
        progress: Show progress on stderr.
        device: Where to train (default: the model's parameters' device).

    Returns:
        A :class:`FitResult`. The model ends in the train/eval mode it started in.

    Raises:
        LrfxError: Bad ``epochs``; batches without targets for the default loss; a non-finite
            loss (names epoch and step).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LrfxError(f"epochs must be a positive integer, got {epochs!r}")
    check_selector(inputs, "inputs")
    dev = _device(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise LrfxError(f"{type(model).__name__} has no trainable parameter")
        optimizer = torch.optim.Adam(params, lr=lr)
    criterion = loss or (lambda out, y: F.cross_entropy(logits_of(out), y))
    owners = [cb for cb in callbacks if callable(getattr(cb, "backward", None))]
    if len(owners) > 1:
        raise LrfxError("fit: at most one callback may replace backward(); got "
                        + ", ".join(type(cb).__name__ for cb in owners))
    custom = owners[0] if owners else None
    losses: list[float] = []
    history: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    total = len(data) if hasattr(data, "__len__") else 0  # type: ignore[arg-type]
    if max_batches is not None and total:
        total = min(total, max_batches)
    with _modes([model], train=True):
        for epoch in range(epochs):
            running, count = 0.0, 0
            with progress_bar(f"epoch {epoch + 1}/{epochs}", total, enabled=progress) as advance:
                for k, batch in enumerate(take_batches(data, max_batches, "fit")):
                    x, y = split_batch(batch, model, inputs, f"epoch {epoch + 1}, batch {k}")
                    if y is None and loss is None:
                        raise LrfxError("fit: the batches have no targets; pass (inputs, "
                                        "targets) pairs (a DataLoader of them), dicts with "
                                        "'labels', or loss=callable(output, targets)")
                    x, y = _to(x, dev), _to(y, dev)
                    optimizer.zero_grad(set_to_none=True)
                    if custom is not None:
                        losses_out = custom.backward(model, x, y, criterion)
                        value = losses_out[0] if isinstance(losses_out, tuple) else losses_out
                    else:
                        out = _forward(model, x, f"epoch {epoch + 1}, batch {k}")
                        value = criterion(out, y)
                        for cb in callbacks:
                            extra = _call(cb, "penalty", model)
                            if extra is not None:
                                value = value + extra
                    scalar = float(value.detach())
                    if not math.isfinite(scalar):
                        raise LrfxError(f"fit: the loss is {scalar} at epoch {epoch + 1}, step "
                                        f"{k}: lower lr= (now {lr}) or check the data")
                    if custom is None:
                        value.backward()
                    for cb in callbacks:
                        _call(cb, "after_backward", model)
                    optimizer.step()
                    for cb in callbacks:
                        _call(cb, "after_step", model)
                    steps += 1
                    running += scalar
                    count += 1
                    history.append(scalar)
                    advance()
            if count == 0:
                raise LrfxError("fit: data holds no batch")
            losses.append(running / count)
            for cb in callbacks:
                _call(cb, "end_epoch", model, epoch)
    return FitResult(tuple(losses), steps, time.perf_counter() - t0, tuple(history))
