"""Mixed (split) convolutions: one channel split into groups, each group convolved by its own layer.

timm's ``MixedConv2d`` (MixNet, MixConv arXiv 1907.09595) holds one conv per group and splits its input by a
plain list ``splits``; torch-pruning prunes each group's conv and maps indices through the split, but cannot see
the list, so the next forward pass splits by the old sizes. After pruning, the sizes are read back from the convs.
"""

from __future__ import annotations

from torch import nn


def split_convs(model: nn.Module) -> list[nn.ModuleDict]:
    """Modules holding one conv per channel group and the group sizes in ``splits`` (timm's ``MixedConv2d``)."""
    return [m for m in model.modules() if isinstance(m, nn.ModuleDict) and isinstance(getattr(m, "splits", None), list)
            and len(m) == len(m.splits) and all(isinstance(c, nn.Conv2d) for c in m.values())]


def sync_split_sizes(mixed: nn.ModuleDict) -> None:
    """Set ``mixed``'s split sizes and channel counts to those of its (pruned) group convs."""
    mixed.splits = [conv.in_channels for conv in mixed.values()]
    mixed.in_channels = sum(mixed.splits)
    mixed.out_channels = sum(conv.out_channels for conv in mixed.values())
