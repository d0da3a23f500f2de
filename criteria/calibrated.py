"""The base class of the criteria that learn from calibration data: passes over the data, cached per model structure.

:class:`CalibratedImportance` is a torch-pruning ``Importance``; a subclass implements ``_calibrate`` (the passes),
``score`` (one group) and optionally ``_apply``. Scoring a group of a model whose structure (parameter names and
shapes, :func:`compress.nn_helpers.fingerprint`) changed since the last pass runs the passes again, so a pruner
re-scores every step without further calls. JBR's gate criteria (:mod:`criteria.jbr`) and the label-free gradient
baselines (:mod:`criteria.registry`) build on it; so can a user criterion registered with
:func:`criteria.register` (``uses_data=True``).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from compress.errors import CompressError
from compress.nn_helpers import fingerprint


class CalibratedImportance(tp.importance.Importance):
    """An Importance whose statistics come from passes over calibration ``data``, cached per model structure.

    ``imp(group)`` takes the model from the group's dependency graph (``group._DG.model``, set by torch-pruning on
    every group) and recomputes the statistics only when that model's :func:`fingerprint` differs from the last
    pass. ``prepare(model, data)`` binds ``data`` (if not given at construction) and runs the pass now.
    Subclasses implement ``_calibrate`` (the passes), ``score`` (one group) and optionally ``_apply`` (hand the
    statistics to a model object, e.g. as ``.grad``; run again for a structurally equal copy).
    """

    def __init__(self, data: Iterable[Any] | None = None) -> None:
        self.data = data
        self._fingerprint: tuple | None = None
        self._model: weakref.ref | None = None  # the last model prepared or scored
        self._applied: weakref.ref | None = None  # the model _apply last ran on

    def prepare(self, model: nn.Module, data: Iterable[Any] | None = None,
                graph: tp.DependencyGraph | None = None) -> None:
        """Run the calibration passes on ``model`` now, unless its structure is unchanged since the last pass."""
        if data is not None and data is not self.data:
            self.data, self._fingerprint = data, None
        self._refresh(model, graph)

    def invalidate(self) -> None:
        """Recompute at the next scoring even if the structure is unchanged (e.g. after fine-tuning)."""
        self._fingerprint = None

    def __call__(self, group: Any) -> Tensor | None:
        graph = getattr(group, "_DG", None)
        model = getattr(graph, "model", None)
        if model is None and self._model is not None:
            model = self._model()
        if model is None:
            raise CompressError(f"{type(self).__name__} cannot tell which model this group belongs to",
                                "score groups from a tp.DependencyGraph, or call criteria.prepare(importance, model, data)")
        self._refresh(model, graph)
        return self.score(group)

    def _refresh(self, model: nn.Module, graph: tp.DependencyGraph | None) -> None:
        self._model = weakref.ref(model)
        current = fingerprint(model)
        if current != self._fingerprint:
            if self.data is None:
                raise CompressError(f"{type(self).__name__} has no calibration data",
                                    "construct it with data=..., or call criteria.prepare(importance, model, data) "
                                    "before pruner.step()")
            was_training = model.training
            model.eval()
            try:
                with torch.enable_grad():
                    self._calibrate(model, self.data, graph)
            finally:
                model.train(was_training)
            self._fingerprint, self._applied = current, None
        if self._applied is None or self._applied() is not model:
            self._apply(model)
            self._applied = weakref.ref(model)

    def module_names(self, group: Any) -> dict[nn.Module, str]:
        """Module -> name in the model of ``group`` (its dependency graph's, else the last model scored)."""
        graph = getattr(group, "_DG", None)
        if graph is not None:
            return graph._module2name
        model = self._model() if self._model is not None else None
        return {m: n for n, m in model.named_modules()} if model is not None else {}

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        raise NotImplementedError

    def _apply(self, model: nn.Module) -> None:
        """Hand the cached statistics to ``model`` (nothing to hand over by default)."""

    def score(self, group: Any) -> Tensor | None:
        raise NotImplementedError
