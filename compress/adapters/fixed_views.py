"""Channel splits and slices of fixed size: the channels that flow into them are not pruned.

A forward pass that cuts a tensor into equal pieces (``x.split(self.expand_chs // 2, dim=1)``, timm's CSPNet) or
slices off a fixed number of channels (``x[:, :self.num_1x1_c]``, timm's DPN) reads the sizes from plain
attributes that torch-pruning cannot see, and equal pieces cannot stay equal once the pruner removes channels
from each by their scores. The pruned model then breaks (747 channels where the next conv expects 1024). The
channel groups that reach such a view are left unpruned (found on torch-pruning's graph); the layers inside each
piece's path are pruned as usual. A slice that keeps every channel is no constraint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..quiet import quiet_third_party

_INT64_MAX = 2 ** 63 - 1


def _channel_dim(grad_fn: Any) -> int | None:
    """The dimension a split/slice autograd node cuts, when it is the channel one (1 of (N, C, H, W), the last of a
    (N, L, C) sequence), else None."""
    sizes, dim = getattr(grad_fn, "_saved_self_sym_sizes", None), getattr(grad_fn, "_saved_dim", None)
    if sizes is None or not isinstance(dim, int) or not -len(sizes) <= dim < len(sizes):
        return None
    dim %= len(sizes)
    return dim if dim == (2 if len(sizes) == 3 else 1) else None  # torch-pruning's convention (a ViT's x[:, 1:] cuts tokens)


def is_fixed_channel_view(grad_fn: Any) -> bool:
    """Whether an autograd node cuts channels into pieces whose sizes pruning cannot keep: a split into equal
    pieces, or a slice that drops some channels."""
    name = type(grad_fn).__name__
    if not name.startswith(("SplitBackward", "SliceBackward")):
        return False
    dim = _channel_dim(grad_fn)
    if dim is None:
        return False
    if name.startswith("SplitBackward"):  # equal pieces (torch.split with an int, torch.chunk)
        return True
    width = int(grad_fn._saved_self_sym_sizes[dim])  # a slice: fixed unless it keeps every channel
    start, end = int(grad_fn._saved_start or 0), grad_fn._saved_end
    end = width if end is None or int(end) >= _INT64_MAX else int(end)
    return start % width != 0 or (end % width if end < 0 else min(end, width)) != width


def has_fixed_channel_views(model: nn.Module, example_inputs: Any) -> bool:
    """Whether one forward of ``example_inputs`` makes a fixed channel view (a walk of its autograd graph)."""
    with torch.enable_grad():
        output = model(example_inputs)
    roots = [t.grad_fn for t in (output if isinstance(output, (tuple, list)) else [output])
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen, stack = set(), roots
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if is_fixed_channel_view(fn):
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def layers_into_fixed_views(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The layers whose output channels belong to a group that reaches a fixed channel view (they stay unpruned)."""
    views = {node for node in graph.module2node.values()
             if node.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE) and is_fixed_channel_view(node.grad_fn)}
    kept: list[nn.Module] = []
    with quiet_third_party():
        groups = list(graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)))
    for group in groups:
        if any(dep.target in views for dep, _ in group):
            kept += [dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                     and graph.is_out_channel_pruning_fn(dep.handler)]
    return list({id(m): m for m in kept}.values())
