"""torchvision's Swin: its patch merging as one opaque node while torch-pruning traces the model.

Patch merging slices a channels-last map into its four 2x2 phases and concatenates them on the channel axis
(C -> 4C). torch-pruning reads the concatenation's dimension (-1) as an unsigned integer, takes it for the channel
axis of a channels-first map, and in deep Swins (swin_s, swin_b) fails while building the graph when it cannot
infer the widths of the slices. The channels it touches are the embedding width, which is never pruned in a model
with hand-written attention (see :mod:`.mlp_scope`), so while tracing the merge is one autograd node of its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _PatchMerge(torch.autograd.Function):
    """torchvision's ``_patch_merging_pad`` (pad to even, four 2x2 phases concatenated on channels) as one node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return _ORIGINAL[0](x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.enable_grad():
            x = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (dx,) = torch.autograd.grad(_ORIGINAL[0](x), x, grad)
        return dx


_ORIGINAL: list = []  # torchvision's function, kept while it is patched


def _uses_patch_merging(model: nn.Module) -> bool:
    try:
        from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2
    except ImportError:  # torchvision is a dependency, but a user model never needs it here
        return False
    return any(isinstance(m, (PatchMerging, PatchMergingV2)) for m in model.modules())


@contextlib.contextmanager
def opaque_patch_merging(model: nn.Module) -> Iterator[None]:
    """While torch-pruning traces ``model``: each Swin patch merging as one opaque autograd node."""
    if not _uses_patch_merging(model):
        yield
        return
    from torchvision.models import swin_transformer

    _ORIGINAL[:] = [swin_transformer._patch_merging_pad]
    swin_transformer._patch_merging_pad = _PatchMerge.apply
    try:
        yield
    finally:
        swin_transformer._patch_merging_pad = _ORIGINAL[0]
