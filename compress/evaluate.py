"""Accuracy on labelled data and agreement between two models (labels not needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .batches import describe, rows
from .data import inputs_of, labels_of
from .errors import CompressError
from .nn_helpers import eval_mode


@dataclass(frozen=True)
class Accuracy:
    top1: float
    correct: int
    total: int


def check_input(model: nn.Module, x: Any) -> None:
    """Raise a one-line error when ``x`` does not fit the model's recorded inputs (its adapter decides)."""
    adapter_for(model).check_inputs(model, x)


def predict(model: nn.Module, x: Any) -> torch.Tensor:
    """The prediction tensor of ``model`` on inputs ``x`` (moved to the model's device and floating dtype by its
    adapter), turning a shape mismatch into a one-line error."""
    adapter = adapter_for(model)
    adapter.check_inputs(model, x)
    try:
        return adapter.forward(model, x)
    except RuntimeError as err:
        if "shape" in str(err) or "size" in str(err):
            raise CompressError(f"model rejected inputs of shape {describe(x)}: {str(err).splitlines()[0][:160]}",
                                "pass inputs of the shape the model was built for") from err
        raise


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[Any], progress: bool = True) -> Accuracy:
    """Top-1 of ``model`` on ``(input, label)`` batches."""
    correct = total = 0
    with eval_mode(model):
        for batch in tqdm(data, desc="evaluate", unit="batch", disable=not progress, leave=False):
            labels = labels_of(batch)
            if labels is None:
                raise CompressError("accuracy needs (input, label) batches", "pass labelled data, or use agreement()")
            pred = predict(model, inputs_of(batch)).argmax(1).cpu()
            correct += int((pred == labels).sum())
            total += len(labels)
    return Accuracy(correct / max(total, 1), correct, total)


@torch.no_grad()
def agreement(model: nn.Module, reference: nn.Module, data: Iterable[Any]) -> float:
    """Fraction of inputs on which ``model`` and ``reference`` predict the same class (label-free)."""
    same = total = 0
    for batch in data:
        x = inputs_of(batch)
        same += int((predict(model, x).argmax(1).cpu() == predict(reference, x).argmax(1).cpu()).sum())
        total += rows(x)
    return same / max(total, 1)


@dataclass(frozen=True)
class Comparison:
    """A model against a reference on the same inputs: top-1 (if labelled), agreement, KL(ref || model), output MSE."""

    top1: float | None
    agreement: float
    kl: float
    mse: float  # E_x ||f(x) − f_ref(x)||²: the measured TPV of the change
    total: int


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module, data: Iterable[Any], progress: bool = False) -> Comparison:
    """One pass over ``data`` comparing ``model``'s logits with ``reference``'s."""
    correct = same = total = 0
    kl = mse = 0.0
    labelled = True
    for batch in tqdm(data, desc="compare", unit="batch", disable=not progress, leave=False):
        x, labels = inputs_of(batch), labels_of(batch)
        out, ref = predict(model, x).float().cpu(), predict(reference, x).float().cpu()
        pred = out.argmax(1)
        same += int((pred == ref.argmax(1)).sum())
        kl += float(torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="sum"))
        mse += float(((out - ref).double() ** 2).sum())
        if labels is None:
            labelled = False
        else:
            correct += int((pred == labels).sum())
        total += rows(x)
    if total == 0:
        raise CompressError("comparison got no data", "pass a non-empty data iterable")
    return Comparison(correct / total if labelled else None, same / total, kl / total, mse / total, total)
