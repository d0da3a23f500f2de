"""Counting multiply-accumulates: per weight layer (for BOPs budgets and per-MAC criteria) and for the whole model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .nn_helpers import eval_mode, weight_layers


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """MACs per Conv2d/Linear layer for one sample: output elements × (Cin/groups · kh · kw) or in_features."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in weight_layers(model).items():
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            per_output = (mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                          if isinstance(mod, nn.Conv2d) else mod.in_features)
            macs[name] = int(out[:1].numel() * per_output)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of the whole model for one sample, as torch-pruning counts them."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)
