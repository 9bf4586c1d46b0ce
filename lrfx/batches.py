"""Batches as users have them: which part of a batch feeds the model, which part is the target.

A data loader yields tensors, tuples such as ``(images, labels)``, or dicts such as a tokenizer's
output with a ``labels`` key. lrfx needs the model's inputs from each batch (calibration, BN
recalibration, evaluation) and, for evaluation and fine-tuning, the targets. ``inputs`` says
which part is which:

* ``"auto"`` (the default): a tensor or a dict is all inputs; a tuple or list whose length
  exceeds what the model's ``forward`` takes positionally is split: the leading items that fit
  are inputs, the rest targets — so ``(images, labels)`` feeds ``forward(x)`` with the images. A
  tuple that fits is all inputs (``(input_ids, attention_mask)``). A dict's ``labels`` /
  ``label`` / ``targets`` / ``target`` / ``y`` entry is its target when the model's ``forward``
  does not take that keyword.
* an int ``k``: item ``k`` of a tuple is the input, the last item (if another) the target;
* a string or a tuple of strings: those keys of a dict are the inputs;
* a callable ``batch -> inputs``.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    >>> split_batch((x, y), model)[0] is x
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lrfx.errors import LrfxError

__all__ = ["InputSelector", "TARGET_KEYS", "check_selector", "model_inputs", "split_batch",
           "take_batches"]

#: How to pick a batch's model inputs (see the module docstring).
InputSelector = str | int | Sequence[str] | Callable[[Any], Any]

#: Dict keys read as the target of a batch when the model does not take them.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def check_selector(inputs: Any, argument: str = "calibration_inputs") -> None:
    """Refuse a selector that is none of the accepted forms (names ``argument``)."""
    ok = (callable(inputs) or inputs == "auto" or isinstance(inputs, str)
          or (isinstance(inputs, int) and not isinstance(inputs, bool))
          or (isinstance(inputs, (tuple, list)) and inputs
              and all(isinstance(k, str) for k in inputs)))
    if not ok:
        raise LrfxError(f"{argument} must be 'auto', an item index (0 for (inputs, targets) "
                        "pairs), a dict key or tuple of keys, or a callable batch -> inputs; "
                        f"got {inputs!r}")


def _positional_capacity(model: nn.Module | None) -> int | None:
    """How many positional inputs ``model.forward`` takes (``None``: any number, or unknown)."""
    if model is None:
        return None
    from lrfx.inputs import forward_signature

    try:
        sig = forward_signature(model)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def _keywords(model: nn.Module | None) -> set[str] | None:
    if model is None:
        return None
    from lrfx.inputs import forward_signature

    try:
        params = forward_signature(model).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def split_batch(batch: Any, model: nn.Module | None = None, inputs: InputSelector = "auto",
                where: str = "batch") -> tuple[Any, Any]:
    """``(model inputs, targets or None)`` of one batch.

    Args:
        batch: What the data loader yielded.
        model: The model the inputs are for (its ``forward`` signature guides ``"auto"``).
        inputs: Which part is the input (see the module docstring).
        where: Names the batch in errors ("calibration batch 3").

    Raises:
        LrfxError: The selector does not fit the batch (names ``where``).
    """
    if callable(inputs) and not isinstance(inputs, str):
        return inputs(batch), None
    if isinstance(inputs, int) and not isinstance(inputs, bool):
        if not isinstance(batch, (tuple, list)) or not -len(batch) <= inputs < len(batch):
            raise LrfxError(f"{where}: inputs={inputs} picks an item of a tuple batch, but the "
                            f"batch is {_describe(batch)}")
        rest = [b for i, b in enumerate(batch) if i != inputs % len(batch)]
        return batch[inputs], (rest[-1] if rest else None)
    if isinstance(inputs, (str, tuple, list)) and inputs != "auto":
        keys = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        if not isinstance(batch, Mapping):
            raise LrfxError(f"{where}: inputs={inputs!r} picks keys of a dict batch, but the "
                            f"batch is {_describe(batch)}")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise LrfxError(f"{where}: no key {missing[0]!r} in the batch (it has "
                            f"{sorted(map(str, batch))}); fix inputs=")
        target = next((batch[k] for k in TARGET_KEYS if k in batch and k not in keys), None)
        return {k: batch[k] for k in keys}, target
    # auto
    if isinstance(batch, Mapping):
        accepted = _keywords(model)
        targets = [k for k in TARGET_KEYS if k in batch
                   and accepted is not None and k not in accepted]
        if not targets:
            return batch, None
        return {k: v for k, v in batch.items() if k not in targets}, batch[targets[0]]
    if isinstance(batch, (tuple, list)) and not _is_args_kwargs(batch):
        capacity = _positional_capacity(model)
        if capacity is not None and 0 < capacity < len(batch):
            head, tail = batch[:capacity], batch[capacity:]
            x = head[0] if capacity == 1 else tuple(head)
            return x, (tail[0] if len(tail) == 1 else tuple(tail))
    return batch, None


def model_inputs(batch: Any, model: nn.Module | None = None, inputs: InputSelector = "auto",
                 where: str = "batch") -> Any:
    """The part of ``batch`` that feeds ``model`` (see :func:`split_batch`)."""
    return split_batch(batch, model, inputs, where)[0]


def take_batches(data: Iterable[Any], limit: int | None, argument: str = "calibration"
                 ) -> Iterator[Any]:
    """At most ``limit`` batches of ``data`` (all of them for ``None``); a lone tensor is one
    batch.

    Raises:
        LrfxError: ``data`` is not iterable, or ``limit`` is not a positive integer.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise LrfxError(f"{argument}: the batch limit must be a positive integer or None, got "
                        f"{limit!r}")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    try:
        it = iter(data)
    except TypeError:
        raise LrfxError(f"{argument} must be an iterable of batches (a list, a DataLoader...), "
                        f"got {type(data).__name__}") from None
    return it if limit is None else itertools.islice(it, limit)


def _is_args_kwargs(batch: Sequence[Any]) -> bool:
    return (len(batch) == 2 and isinstance(batch[0], (tuple, list))
            and isinstance(batch[1], Mapping))


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"

