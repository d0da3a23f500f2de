"""Fold each BatchNorm into the convolution (or linear layer) that feeds it: W' = W·γ/σ, b' = (b − μ)·γ/σ + β.

Needed before weight quantization so that the quantized weights are the ones that run (in PyTorch and in ONNX).
Pairs are found by tracing with torch.fx (a BN whose only input is a conv/linear output used nowhere else); the
conv keeps its name, the BN becomes ``nn.Identity``, so layer names in a bit plan stay valid.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .errors import CompressError

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every BN fed only by a Conv2d/Linear whose output nothing else uses."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for untraceable control flow
        raise CompressError(f"cannot trace {type(model).__name__} to find Conv-BN pairs ({type(err).__name__})",
                            "fold BatchNorm yourself before quantizing") from err
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), BATCHNORMS):
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(modules.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))):
                pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every foldable BatchNorm folded into its producer."""
    folded = copy.deepcopy(model).eval()
    for layer_name, norm_name in foldable_pairs(folded):
        layer, norm = folded.get_submodule(layer_name), folded.get_submodule(norm_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        set_module(folded, layer_name, fuse(layer, norm))
        set_module(folded, norm_name, nn.Identity())
    return folded
