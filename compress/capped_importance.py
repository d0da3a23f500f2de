"""A per-layer cap on one pruning step, enforced through the scores.

In global ranking torch-pruning removes every channel of a group whose score is under the global threshold; its
``max_pruning_ratio`` only stops a group at the *next* step, and a group whose every channel is under the threshold
is skipped altogether. With a criterion that scores whole layers low (JBR on a GoogLeNet branch), raising the
channel ratio then removes *fewer* channels (57 groups pruned at ratio 0.17, 15 at 0.90): the search for a MACs
target cannot converge. Giving each group's best ⌈(1 − r)·n⌉ channels an infinite score caps every group at the
ratio r within the step and keeps the number removed monotone in the channel ratio.
"""

from __future__ import annotations

import math

import torch
import torch_pruning as tp


class CappedImportance(tp.importance.Importance):
    """``importance`` with the highest-scored ⌈(1 − max_ratio)·n⌉ (at least one) of a group's n scores set to +inf;
    a group whose scores are all equal is left as it is."""

    def __init__(self, importance: tp.importance.Importance, max_ratio: float) -> None:
        self.importance = importance
        self.max_ratio = max_ratio

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        scores = self.importance(group)
        if scores is None or scores.numel() == 0 or bool(scores.max() == scores.min()):
            return scores  # nothing to rank (prune reports a criterion that ties every channel)
        keep = max(1, math.ceil((1.0 - self.max_ratio) * scores.numel()))
        capped = scores.clone().float()
        capped[torch.topk(capped, keep).indices] = math.inf
        return capped
