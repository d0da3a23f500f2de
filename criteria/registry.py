"""One registry of pruning criteria by name; each is a torch-pruning Importance, so every pruner can use it.

``prepare(importance, model, data)`` runs the passes a criterion needs before ``pruner.step()``: the gate pass for
``jbr``/``jbr-batch``/``jacobian``; the gradient of the cross-entropy against the model's own predictions for
``taylor`` (label-free); per-sample squared gradients for ``hessian`` (torch-pruning's OBD approximation).
Magnitude criteria need nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress.data import inputs_of, labels_of
from compress.errors import CompressError

from .jbr import GateImportance, jacobian, jbr, jbr_batch

_REGISTRY: dict[str, tuple[Callable[..., tp.importance.Importance], str]] = {
    "jbr": (jbr, "exact per-sample JBR: E_x[(m(x)ᵀ J_g w_g)²], m = dense model's predicted class"),
    "jbr-batch": (jbr_batch, "batch-gradient JBR on confident pseudo-labels (reference implementation)"),
    "jacobian": (jacobian, "E_x[(∂CE(f, y)/∂γ_g)²] with true labels"),
    "l1": (lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw), "group L1 norm of weights"),
    "l2": (lambda **kw: tp.importance.GroupMagnitudeImportance(p=2, **kw), "group L2 norm of weights"),
    "taylor": (lambda **kw: tp.importance.GroupTaylorImportance(**kw), "|w·∇L| on the model's own predictions"),
    "hessian": (lambda **kw: tp.importance.GroupHessianImportance(**kw), "OBD: w²·E[(∇L)²] (Fisher diagonal)"),
    "bn": (lambda **kw: tp.importance.BNScaleImportance(**kw), "|γ| of BatchNorm"),
    "fpgm": (lambda **kw: tp.importance.FPGMImportance(**kw), "filter pruning via geometric median"),
    "lamp": (lambda **kw: tp.importance.LAMPImportance(**kw), "layer-adaptive magnitude pruning"),
    "random": (lambda **kw: tp.importance.RandomImportance(), "uniformly random scores"),
}
NEEDS_LABELS = {"jacobian"}


def names() -> list[str]:
    """All criterion names."""
    return list(_REGISTRY)


def describe() -> dict[str, str]:
    return {n: d for n, (_, d) in _REGISTRY.items()}


def get(name: str, **options: Any) -> tp.importance.Importance:
    """The torch-pruning Importance registered as ``name`` (options go to its constructor)."""
    if name not in _REGISTRY:
        raise CompressError(f"unknown criterion {name!r}", f"use one of {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[name][0](**options)
    except TypeError as err:
        raise CompressError(f"bad options for criterion {name}: {err}", "check the criterion options") from err


def _own_prediction_loss(model: nn.Module, batch: Any, reduction: str = "mean") -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(inputs_of(batch).to(device))
    return F.cross_entropy(logits, logits.detach().argmax(1), reduction=reduction)


def prepare(importance: tp.importance.Importance, model: nn.Module, data: Iterable[Any]) -> None:
    """Run the calibration passes ``importance`` needs on ``model`` (call before every ``pruner.step()``)."""
    if isinstance(importance, GateImportance):
        importance.prepare(model, data)
        return
    if isinstance(importance, tp.importance.GroupHessianImportance):
        # torch-pruning 1.6.1's accumulate_grad keys by name but stores by parameter, so it keeps only the last
        # sample; accumulate E[(∇ℓ)²] over all samples here instead.
        params = [p for p in model.parameters() if p.requires_grad]
        squares = [torch.zeros_like(p) for p in params]
        count = 0
        for batch in data:
            for loss in _own_prediction_loss(model, batch, reduction="none"):
                grads = torch.autograd.grad(loss, params, retain_graph=True)
                for s, g in zip(squares, grads):
                    s += g * g
                count += 1
        importance._accu_grad = {p: s for p, s in zip(params, squares)}
        importance._counter = {p: count for p in params}
        for p in params:  # its __call__ writes the mean into p.grad, which must exist
            p.grad = torch.zeros_like(p)
        return
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        model.zero_grad(set_to_none=True)
        was_training = model.training
        model.eval()
        batches = 0
        for batch in data:
            _own_prediction_loss(model, batch).backward()
            batches += 1
        model.train(was_training)
        if batches == 0:
            raise CompressError("the taylor criterion got no calibration batches", "pass a non-empty calibration set")
