"""Counting multiply-accumulates: per weight layer (for BOPs budgets and per-MAC criteria) and for the whole model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .batches import call, first_rows, is_named
from .nn_helpers import eval_mode, weight_layers


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
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
            call(model, first_rows(example_inputs, 1))
    finally:
        for h in hooks:
            h.remove()
    return macs


class _PositionalCall(nn.Module):
    """``model`` called with named inputs handed over positionally: torch-pruning's counter reads the batch size
    from the first positional input of the counted module and prints a warning when there is none."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *values: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, values)))


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, parameters) of the whole model for one sample, as torch-pruning counts them (its Linear and conv
    layers; an attention's score products are not counted)."""
    import torch_pruning as tp

    if is_named(example_inputs):
        names = sorted(example_inputs)
        model, example_inputs = _PositionalCall(model, names), tuple(example_inputs[n] for n in names)
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)
