"""Transformers whose attention the adapter cannot prune: prune local channel groups only (MLP hidden channels).

torch-pruning prunes ``nn.MultiheadAttention`` head-consistently, but an attention written out by hand (timm's
``Attention``, torchvision's Swin ``ShiftedWindowAttention`` and MaxViT attention) reshapes its ``qkv`` output into
heads and windows. torch-pruning then maps channel indices through those reshapes as if they were flattens (wrong
widths, and lists of millions of indices: Swin's embedding group takes hours to build). In such models only the
standard transformer width is pruned: the hidden channels of each MLP, ``fc1`` -> activation -> ``fc2``, which no
reshape touches (and, in hybrids such as MaxViT, the expansion of each inverted-residual block). The embedding
width and the attention are kept.
"""

from __future__ import annotations

from typing import Any

import torch_pruning as tp
from torch import nn

from ..nn_helpers import per_sample_outputs, weight_layers

# node types that keep channel c at channel c: activations and other element-wise ops, BatchNorm, depthwise convs,
# and views that keep the last dimension (a channels-last tensor flattened or split into windows; checked below)
_CHANNELWISE = (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.RESHAPE)
GROUP_NODE_LIMIT = 64  # an MLP or an inverted-residual block is a few dozen nodes; the embedding width, thousands


def unprunable_attention(model: nn.Module) -> list[str]:
    """Names of the attention modules torch-pruning cannot prune structurally: any module whose class name says
    attention, other than ``nn.MultiheadAttention`` and the modules that wrap one."""
    return [name for name, module in model.named_modules()
            if "attention" in type(module).__name__.lower() and not isinstance(module, nn.MultiheadAttention)
            and not any(isinstance(m, nn.MultiheadAttention) for m in module.modules())]


def _width_in(module: nn.Module) -> int | None:
    """The input width of a layer whose input channels can be pruned (Linear, ungrouped conv), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    return None


def _width_out(module: nn.Module) -> int | None:
    """The output width of a Linear or an ungrouped conv, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.out_channels
    return None


def _keeps_channels(node: tp.dependency.Node, width: int) -> bool:
    """Whether a non-layer node maps channel c to channel c in a group of ``width`` channels."""
    if node.type not in _CHANNELWISE:
        return False
    if node.type != tp.ops.OPTYPE.RESHAPE:
        return True
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)  # the view's input shape
    return sizes is not None and int(sizes[-1]) == width


def is_local_group(root: tp.dependency.Node, limit: int = GROUP_NODE_LIMIT) -> bool:
    """Whether the channels ``root`` outputs stay among a few per-channel nodes until layers read them: the
    closure over shared channels (forward through outputs, and back into the other inputs of element-wise ops
    such as a squeeze-excitation product) meets only per-channel nodes and layers of the same width, within
    ``limit`` nodes, and some layer reads them (a classifier's outputs are no group). torch-pruning prunes such a
    group without touching a reshape it cannot follow."""
    width = _width_out(root.module)
    read = False
    seen: set[tuple[int, bool]] = {(id(root), True)}
    frontier: list[tuple[tp.dependency.Node, bool]] = [(root, True)]  # (node, whether its output is in the group)
    while frontier:
        node, output_side = frontier.pop()
        neighbours = [(n, True) for n in node.outputs] + ([] if output_side and _width_out(node.module) else
                                                          [(n, False) for n in node.inputs])
        for other, downstream in neighbours:
            reads = downstream and _width_in(other.module) is not None  # a layer reading the group: stop there
            if reads and _width_in(other.module) != width or not reads and _width_out(other.module) not in (None, width):
                return False
            read = read or reads
            key = (id(other), not reads)
            if key in seen:
                continue
            seen.add(key)
            if len(seen) > limit or not (reads or _width_out(other.module) or _keeps_channels(other, width)):
                return False
            if not reads:
                frontier.append((other, True))
    return read


def mlp_expansions(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The layers whose output channels form a local group (:func:`is_local_group`): each MLP's ``fc1``, the
    expansion conv of an inverted-residual block. Pruning them touches no reshape across heads or windows."""
    return [module for module, node in graph.module2node.items()
            if _width_out(module) is not None and is_local_group(node)]


def views_as_channelwise(graph: tp.DependencyGraph) -> tp.DependencyGraph:
    """Let torch-pruning pass channel indices through every view unchanged. Right for the groups pruned here (their
    views keep the channels last, see :func:`is_local_group`); the others are never pruned. It spares the
    shape inference torch-pruning redoes for every reshape each time it forms a group (most of Swin's pruning
    time)."""
    for node in graph.module2node.values():
        if node.type == tp.ops.OPTYPE.RESHAPE:
            node.type = tp.ops.OPTYPE.ELEMENTWISE
    return graph


def per_sample_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """The Linear and conv layers whose output has one row per sample (found on a batch of two copies of
    ``example_inputs``). Others compute from buffers, e.g. Swin V2's position-bias MLP on its coordinate table:
    criteria that score channels per sample cannot score them, and they are left unpruned."""
    layers = weight_layers(model)
    return [layers[name] for name, per_sample in per_sample_outputs(model, example_inputs, layers).items() if per_sample]


def layers_outside_mlps(model: nn.Module, graph: tp.DependencyGraph, example_inputs: Any) -> list[nn.Module]:
    """Every Linear and conv layer but the first of each MLP (or inverted-residual block, :func:`mlp_expansions`)
    that runs per sample (:func:`per_sample_layers`): the layers left unpruned in this scope."""
    kept = set(mlp_expansions(graph)) & set(per_sample_layers(model, example_inputs))
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in kept]
