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

from .jbr import jacobian, jbr, jbr_batch, jbr_per_mac

_REGISTRY: dict[str, tuple[Callable[..., tp.importance.Importance], str]] = {
    "jbr": (jbr, "exact per-sample JBR: E_x[(m(x)ᵀ J_g w_g)²], m = dense model's predicted class"),
    "jbr-mac": (jbr_per_mac, "JBR divided by the MACs the removal saves"),
    "jbr-batch": (jbr_batch, "batch-gradient JBR on confident pseudo-labels (reference implementation)"),
    "jacobian": (jacobian, "E_x[(∂CE(f, y)/∂γ_g)²] with true labels"),
    "l1": (lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw), "group L1 norm of weights"),
    "l2": (lambda **kw: tp.importance.GroupMagnitudeImportance(p=2, **kw), "group L2 norm of weights"),
    "taylor": (lambda **kw: TaylorImportance(**kw), "|w·∇L| on the model's own predictions"),
    "hessian": (lambda **kw: HessianImportance(**kw), "OBD: w²·E[(∇L)²] (Fisher diagonal)"),
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


class _CachedGradients:
    """Gradient statistics per parameter name, recomputed only when the model's structure changes, so the trial
    copies a pruning step makes reuse one calibration pass (as the gate criteria do)."""

    def _cached(self, model: nn.Module, data: Iterable[Any]) -> dict[str, torch.Tensor]:
        from .jbr import _fingerprint

        fingerprint = _fingerprint(model)
        if getattr(self, "_grad_fingerprint", None) != fingerprint:
            was_training = model.training
            model.eval()
            try:
                self._grad_cache = self._statistics(model, data)
            finally:
                model.train(was_training)
            self._grad_fingerprint = fingerprint
        return self._grad_cache


class TaylorImportance(_CachedGradients, tp.importance.GroupTaylorImportance):
    """torch-pruning's group Taylor |w·∇L| with L the cross-entropy against the model's own predictions."""

    def _statistics(self, model: nn.Module, data: Iterable[Any]) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        batches = 0
        for batch in data:
            grads = torch.autograd.grad(_own_prediction_loss(model, batch), list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += g
            batches += 1
        if batches == 0:
            raise CompressError("the taylor criterion got no calibration batches", "pass a non-empty calibration set")
        return sums

    def prepare(self, model: nn.Module, data: Iterable[Any]) -> None:
        for n, p in model.named_parameters():
            p.grad = self._cached(model, data)[n].clone()


class HessianImportance(_CachedGradients, tp.importance.GroupHessianImportance):
    """torch-pruning's OBD score w²·E[(∇ℓ)²] with per-sample losses on the model's own predictions.

    torch-pruning 1.6.1's ``accumulate_grad`` keys by name but stores by parameter, so it keeps only the last
    sample; the squared gradients are accumulated over all samples here instead."""

    def _statistics(self, model: nn.Module, data: Iterable[Any]) -> dict[str, torch.Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        squares = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for batch in data:
            for loss in _own_prediction_loss(model, batch, reduction="none"):
                grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        squares[n] += g * g
                count += 1
        if count == 0:
            raise CompressError("the hessian criterion got no calibration batches", "pass a non-empty calibration set")
        return {n: s / count for n, s in squares.items()}

    def prepare(self, model: nn.Module, data: Iterable[Any]) -> None:
        cache = self._cached(model, data)
        params = dict(model.named_parameters())
        self._accu_grad = {params[n]: s.clone() for n, s in cache.items()}
        self._counter = {params[n]: 1 for n in cache}
        for n in cache:  # its __call__ writes the mean into p.grad, which must exist
            params[n].grad = torch.zeros_like(params[n])


def prepare(importance: tp.importance.Importance, model: nn.Module, data: Iterable[Any]) -> None:
    """Run the calibration passes ``importance`` needs on ``model`` (call before every ``pruner.step()``)."""
    if hasattr(importance, "prepare"):
        importance.prepare(model, data)
