"""Fold each BatchNorm into the convolution (or linear layer) that feeds it: W' = W·γ/σ, b' = (b − μ)·γ/σ + β.

Needed before weight quantization so that the quantized weights are the ones that run (in PyTorch and in ONNX).
Pairs are found by tracing with torch.fx, every BatchNorm (subclasses included, e.g. timm's fused
``BatchNormAct2d``) kept as one traced module, then a BN whose only input is a conv/linear output used nowhere
else. The conv keeps its name, so layer names in a bit plan stay valid. A folded torch BatchNorm becomes
``nn.Identity``; a subclass keeps what its forward does besides normalising (timm: dropout and the activation),
with its normalisation made the identity (μ = 0, σ² = 1 − ε, γ = 1, β = 0).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .errors import CompressError
from .nn_helpers import set_module

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
__all__ = ["BATCHNORMS", "fold_batchnorm", "fold_pair", "foldable_pairs", "folded_norm", "set_module"]


class _NormLeafTracer(fx.Tracer):
    """fx's tracer, with every BatchNorm subclass kept as a module call (fx would trace into timm's)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, BATCHNORMS) or super().is_leaf_module(m, module_qualified_name)


def _foldable_norm(module: nn.Module | None) -> bool:
    return (isinstance(module, BATCHNORMS) and module.running_mean is not None and module.running_var is not None)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every BN (with running statistics) fed only by a Conv/Linear whose output
    nothing else uses (none, without tracing, in a model without such a BN: a transformer)."""
    if not any(_foldable_norm(m) for m in model.modules()):
        return []
    try:
        graph = _NormLeafTracer().trace(model)
    except Exception as err:  # fx raises many types for untraceable control flow
        raise CompressError(f"cannot trace {type(model).__name__} to find Conv-BN pairs ({type(err).__name__})",
                            "fold BatchNorm yourself before quantizing") from err
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and _foldable_norm(modules.get(node.target)):
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(modules.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))):
                pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def folded_norm(norm: nn.Module) -> nn.Module:
    """What takes a BatchNorm's place once folded into its producer: ``nn.Identity`` for torch's own classes, else a
    copy whose normalisation is the identity, so the rest of the subclass's forward (an activation) still runs."""
    if type(norm) in BATCHNORMS:
        return nn.Identity()
    neutral = copy.deepcopy(norm)
    neutral.running_mean.zero_()
    neutral.running_var.fill_(1.0 - neutral.eps)
    if neutral.affine:
        neutral.weight.fill_(1.0)
        neutral.bias.zero_()
    return neutral


@torch.no_grad()
def fold_pair(model: nn.Module, layer_name: str, norm_name: str) -> tuple[nn.Module, nn.Module]:
    """Fold BatchNorm ``norm_name`` into ``layer_name`` in place; returns (the fused layer, the BatchNorm it absorbed)."""
    layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    fused = fuse(layer, norm)
    set_module(model, layer_name, fused)
    set_module(model, norm_name, folded_norm(norm))
    return fused, norm


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every foldable BatchNorm folded into its producer."""
    folded = copy.deepcopy(model).eval()
    for layer_name, norm_name in foldable_pairs(folded):
        fold_pair(folded, layer_name, norm_name)
    return folded
