"""torchvision's ShuffleNetV2: prune inside its branches, never across the channel shuffle.

A block's output is ``channel_shuffle(cat(branch1, branch2), 2)``, a fixed interleaving of the two halves that
torch-pruning's reshape index mapping cannot follow (it divides by zero while building the graph). Its standard
pruning keeps every block's output width and prunes the channels inside each branch (the 1x1 conv -> depthwise conv
-> 1x1 conv middle), plus the stem and the last conv: :func:`shuffle_outputs` are the convs to leave unpruned, and
:func:`opaque_shuffle` lets torch-pruning trace the model by making a block's split, concatenation and shuffle
opaque nodes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _HalfOf(torch.autograd.Function):
    """``x.chunk(2, dim=1)[which]`` as one autograd node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, which: int) -> torch.Tensor:  # type: ignore[override]
        ctx.which = which
        return x.chunk(2, dim=1)[which].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        zero = torch.zeros_like(grad)
        return torch.cat((zero, grad) if ctx.which else (grad, zero), dim=1), None


class _CatShuffle(torch.autograd.Function):
    """``channel_shuffle(cat(a, b), 2)`` as one autograd node."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.split = a.shape[1]
        return _interleave(torch.cat((a, b), dim=1), 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        joined = _interleave(grad, grad.shape[1] // 2)  # the inverse of a 2 x (c/2) transpose
        return joined[:, :ctx.split], joined[:, ctx.split:]


def _interleave(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, *rest = x.shape
    return x.reshape(n, groups, c // groups, *rest).transpose(1, 2).reshape(n, c, *rest)


def _traceable_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """InvertedResidual.forward with the split, concatenation and shuffle as opaque nodes."""
    if self.stride == 1:
        return _CatShuffle.apply(_HalfOf.apply(x, 0), self.branch2(_HalfOf.apply(x, 1)))
    return _CatShuffle.apply(self.branch1(x), self.branch2(x))


def _blocks(model: nn.Module) -> list[nn.Module]:
    try:
        from torchvision.models.shufflenetv2 import InvertedResidual
    except ImportError:  # torchvision is a dependency, but a user model never needs it here
        return []
    return [m for m in model.modules() if isinstance(m, InvertedResidual)]


def shuffle_outputs(model: nn.Module) -> list[nn.Module]:
    """The last conv of every ShuffleNetV2 branch: its channels go through the shuffle, so they are kept."""
    return [conv for block in _blocks(model) for branch in (block.branch1, block.branch2)
            for conv in [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1:]]


@contextlib.contextmanager
def opaque_shuffle(model: nn.Module) -> Iterator[None]:
    """While torch-pruning traces ``model``: each ShuffleNetV2 block's split, concatenation and channel shuffle as
    opaque autograd nodes (torch-pruning treats unknown nodes as element-wise ops; the channels they touch are
    never pruned, see :func:`shuffle_outputs`)."""
    blocks = _blocks(model)
    if not blocks:
        yield
        return
    block_type = type(blocks[0])
    original = block_type.forward
    block_type.forward = _traceable_forward
    try:
        yield
    finally:
        block_type.forward = original
