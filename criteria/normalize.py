"""Normalisation of a criterion's scores, one option for every criterion (``criteria.get(name, normalizer=...)``).

Global pruning ranks the channels of all groups together, so the scale of each group's scores decides how much
each layer loses. Every criterion returns raw scores; :class:`NormalizedImportance` rescales them per group:

* ``"none"``: raw scores (the TPV paper's protocol);
* ``"mean"``, ``"max"``, ``"sum"``: divided by the group's mean, max or sum (torch-pruning's normalisers), so
  every group's scores are on a common scale and the ranking is within-group relative;
* ``"macs"``: divided by the MACs (per sample) each channel's removal saves, so a global ranking weighs damage
  against cost (the per-MAC division of ``jbr-mac``).

A group whose divisor is 0 (all scores 0) keeps its raw scores.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from compress.batches import first_rows
from compress.data import inputs_of
from compress.errors import CompressError
from compress.macs import layer_macs

from .calibrated import CalibratedImportance
from .jbr import is_out_channel_pruning

NORMALIZERS = ("none", "mean", "max", "sum", "macs")
DEFAULT_NORMALIZER = "mean"

_REDUCTIONS = {"mean": torch.mean, "max": torch.max, "sum": torch.sum}


def check_normalizer(normalizer: str) -> str:
    """``normalizer`` if it is one of :data:`NORMALIZERS`, else a one-line CompressError."""
    if normalizer not in NORMALIZERS:
        raise CompressError(f"unknown normalizer {normalizer!r}", f"use one of {', '.join(NORMALIZERS)}")
    return normalizer


def macs_saved(group: Any, macs: dict[str, int], names: dict[nn.Module, str]) -> Tensor:
    """MACs (per sample) removed with each root channel of ``group``: its share of every conv/linear whose output or
    input channels the group prunes (Cout·Cin/groups·k·HW_out split evenly over the pruned dimension); ``macs``
    per layer name (:func:`compress.macs.layer_macs`), ``names`` the module names of the group's model."""
    saved = torch.zeros(len(group[0].idxs), dtype=torch.float64)
    seen = set()
    for item in group:
        layer, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
        name = names.get(layer)
        if name not in macs or (name, handler) in seen:
            continue
        seen.add((name, handler))
        conv = isinstance(layer, nn.modules.conv._ConvNd)
        out_dim = layer.out_channels if conv else layer.out_features
        in_dim = layer.in_channels if conv else layer.in_features
        if conv and layer.groups > 1 and layer.groups == in_dim:
            in_dim = out_dim = layer.groups  # depthwise: one channel removes one filter either way
        per_channel = macs[name] / (out_dim if is_out_channel_pruning(item.dep) else in_dim)
        roots = [r for r in item.root_idxs if r is not None]
        saved[roots] += per_channel
    return saved


class NormalizedImportance(CalibratedImportance):
    """``importance`` with each group's scores divided per ``normalizer`` (see the module docstring).

    Attributes not found here are read from the wrapped importance (``imp.columns`` of a JBR criterion).
    ``"macs"`` needs one input of the model (the first row of ``data``, or of the data ``criteria.prepare``
    hands over) to count the MACs of each layer, once per model structure."""

    def __init__(self, importance: tp.importance.Importance, normalizer: str = DEFAULT_NORMALIZER,
                 data: Iterable[Any] | None = None) -> None:
        super().__init__(data)
        self.importance = importance
        self.normalizer = check_normalizer(normalizer)
        self.layer_macs: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("importance")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def prepare(self, model: nn.Module, data: Iterable[Any] | None = None,
                graph: tp.DependencyGraph | None = None) -> None:
        """Run the wrapped criterion's calibration passes (and, for ``"macs"``, count the layers' MACs) now."""
        if self.normalizer == "macs":
            super().prepare(model, data, graph)
        elif data is not None:
            self.data = data
        if isinstance(self.importance, CalibratedImportance):
            self.importance.prepare(model, data, graph)

    def invalidate(self) -> None:
        super().invalidate()
        if isinstance(self.importance, CalibratedImportance):
            self.importance.invalidate()

    def __call__(self, group: Any) -> Tensor | None:
        if self.normalizer == "macs":
            return super().__call__(group)  # counts the layers' MACs when the structure changed, then score()
        return self.score(group)

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        example = first_rows(inputs_of(next(iter(data))), 1)
        self.layer_macs = layer_macs(model, example)

    def macs_saved(self, group: Any) -> Tensor:
        """MACs per sample each root channel's removal saves (``"macs"`` only)."""
        return macs_saved(group, self.layer_macs, self.module_names(group))

    @torch.no_grad()
    def score(self, group: Any) -> Tensor | None:
        scores = self.importance(group)
        if scores is None or self.normalizer == "none" or scores.numel() == 0:
            return scores
        if self.normalizer == "macs":
            return (scores.double() / self.macs_saved(group).clamp(min=1.0)).to(scores.dtype)
        divisor = _REDUCTIONS[self.normalizer](scores)
        return scores / divisor if bool(divisor > 0) else scores
