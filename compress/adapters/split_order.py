"""torch-pruning's split nodes, mapped to the right pieces at the right offsets.

Two faults of torch-pruning 1.6 break models that split a tensor along channels (timm's MixNet):
- it lists a ``torch.split`` node's outputs in the order its graph walk meets their consumers, which is not always
  the order of the split (two 1x1 convs on the halves of one tensor were listed last first), and then gives each
  output the channel offsets of the wrong piece. Each consumer's autograd node names the piece it reads
  (``output_nr`` in ``next_functions``): the outputs are sorted by it.
- after pruning a group it updates the split's sizes but not the offsets it maps the next group's indices with
  (its ``SplitPruner`` stores them on itself), so a second group through the same split is pruned at stale
  offsets. Here the offsets are always computed from the current sizes.
"""

from __future__ import annotations

import itertools

import torch_pruning as tp
from torch_pruning.dependency.index_mapping import update_split_index_mapping


class _SplitOpLiveOffsets(tp.ops._SplitOp):
    """torch-pruning's split node whose offsets follow its (pruned) split sizes."""

    @property
    def offsets(self) -> list[int] | None:
        if self.split_sizes is None:
            return None
        return [0] + list(itertools.accumulate(self.split_sizes))

    @offsets.setter
    def offsets(self, value: list[int] | None) -> None:  # torch-pruning sets them from the sizes it also sets
        pass


def _piece_read(split: tp.dependency.Node, consumer: tp.dependency.Node) -> int | None:
    """Which output of ``split``'s autograd node ``consumer`` reads, or None when its autograd node does not say."""
    for fn, output_nr in getattr(consumer.grad_fn, "next_functions", ()):
        if fn is not None and fn is split.grad_fn:
            return output_nr
    return None


def split_outputs_in_order(graph: tp.DependencyGraph) -> tp.DependencyGraph:
    """``graph`` with every split node's outputs sorted by the piece each reads and its offsets following its sizes
    (in place; returned)."""
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        if type(node.module) is tp.ops._SplitOp:
            node.module.__class__ = _SplitOpLiveOffsets
            node.module.__dict__.pop("offsets", None)
        pieces = [_piece_read(node, out) for out in node.outputs]
        if None not in pieces and len(set(pieces)) == len(pieces) and pieces != sorted(pieces):
            node.outputs = [out for _, out in sorted(zip(pieces, node.outputs), key=lambda pair: pair[0])]
        update_split_index_mapping(graph, node)
    return graph
