"""One criterion decides how many channels each group keeps, another which ones.

Global pruning ranks every group's (normalised) scores together: the scores' spread within each group decides how
many channels the group loses (allocation), their order which channels (selection). The two can be had from
different criteria: :class:`AllocatedImportance` gives each channel the allocation criterion's score of the same
rank within the group, ordered by the selection criterion, i.e. score'[argsort(s)] = sort(a). Every group then
holds exactly the allocation criterion's values, so a global threshold removes as many of its channels as the
allocation criterion alone would, and those are the ones the selection criterion ranks lowest. A group the
allocation criterion cannot score (``bn`` on a layer without BatchNorm) or scores all alike (``bn`` before
training, every γ = 1) keeps the selection criterion's own normalised scores.
(``python -m compress.bench allocation`` measures the two parts separately: on the benchmark models JBR chooses
channels within a layer better than magnitude criteria but allocates worse; BENCHMARKS.md.)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .calibrated import CalibratedImportance


class AllocatedImportance(CalibratedImportance):
    """Channels chosen by ``select`` (its order within a group), how many per group by ``allocate`` (its values);
    ``select``'s own (normalised) scores where ``allocate`` has none or ties them all. Either may be any
    torch-pruning Importance; calibration passes go to both."""

    def __init__(self, select: tp.importance.Importance, allocate: tp.importance.Importance,
                 data: Iterable[Any] | None = None) -> None:
        super().__init__(data)
        self.select = select
        self.allocate = allocate

    def prepare(self, model: nn.Module, data: Iterable[Any] | None = None,
                graph: tp.DependencyGraph | None = None) -> None:
        if data is not None:
            self.data = data
        for part in (self.select, self.allocate):
            if isinstance(part, CalibratedImportance):
                part.prepare(model, data, graph)

    def invalidate(self) -> None:
        super().invalidate()
        for part in (self.select, self.allocate):
            if isinstance(part, CalibratedImportance):
                part.invalidate()

    def __call__(self, group: Any) -> Tensor | None:
        return self.score(group)

    @property
    def state_bytes(self) -> int:
        """What the two parts keep between calibration passes (a normalised part reads it from its criterion)."""
        return sum(getattr(part, "state_bytes", 0) for part in (self.select, self.allocate))

    @torch.no_grad()
    def score(self, group: Any) -> Tensor | None:
        values = self.allocate(group)
        order = self.select(group)
        if order is None:
            return values
        if values is None or values.numel() != order.numel() or bool((values == values.flatten()[0]).all()):
            return order  # nothing to allocate by: the selection's own scores
        scores = torch.empty_like(values)
        scores[order.argsort(stable=True)] = values.sort(stable=True).values
        return scores
