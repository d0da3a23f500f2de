"""Mean replacement: a removed channel is replaced by its mean, folded into the next layers' biases.

When pruning removes input channel c of a conv/linear layer, the layer loses Σ_k W[:, c, k]·x_c. Replacing x_c by
its mean μ_c over the calibration samples and positions keeps the layer's mean output: the layer's output shifts
by δ = Σ_k W[:, c, k]·μ_c, added to its bias, or, for a bias-free conv that feeds only a BatchNorm, subtracted from
that BatchNorm's running mean (the same function in eval mode, and no new parameter); a layer with neither
(Llama's bias-free projections) is left as it is and named in the result, since a new bias would not fit the
architecture a checkpoint is rebuilt from. Only the fluctuation
x_c − μ_c is lost, which is what the centred JBR score (``jbr-centred``) measures. Zero padding makes the fold
approximate at the borders of a feature map.

Reference: U. Evci, N. Le Roux, P. Castro, L. Bottou, "Mean Replacement Pruning", 2018 (openreview BJxRVnC5Fm).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from criteria.jbr import norm_after

from .batches import call
from .data import inputs_of
from .nn_helpers import channel_sums, eval_mode, on_model
from .quiet import quiet_third_party


def _foldable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


@torch.no_grad()
def input_means(model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
    """μ per input channel of every (ungrouped) conv and linear layer of ``model``: its input's mean over the
    samples of ``data`` and the positions, float64 on the CPU."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            total, count = channel_sums(module, inputs[0])
            sums[name] = sums.get(name, 0) + total
            counts[name] = counts.get(name, 0) + count
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if _foldable(m)]
    try:
        with eval_mode(model):
            for batch in data:
                call(model, on_model(inputs_of(batch), model))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def fold_removed_inputs(group: Any, means: dict[str, Tensor], graph: tp.DependencyGraph) -> list[str]:
    """Before ``group`` is pruned: for every conv/linear whose input channels it removes, add the removed channels'
    mean contribution δ = Σ_{c removed} Σ_k W[:, c, k]·μ_c to the layer's output (see the module docstring).
    Returns the names of the layers it could not fold into (no bias, no BatchNorm after)."""
    names = graph._module2name
    unfolded = []
    for item in group:
        layer = item.dep.target.module
        if getattr(item.dep.handler, "__name__", "") != "prune_in_channels" or not _foldable(layer):
            continue
        mu = means.get(names.get(layer, ""))
        if mu is None or len(mu) != layer.weight.shape[1]:
            continue  # not run on the calibration data (a layer the forward pass never reached)
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        weight = layer.weight[:, idxs].double().reshape(layer.weight.shape[0], len(idxs), -1).sum(2)
        shift = (weight @ mu[idxs].to(weight.device)).to(layer.weight.dtype)
        norm = norm_after(graph, layer) if layer.bias is None else None
        if norm is not None and norm.running_mean is not None:
            norm.running_mean -= shift.to(norm.running_mean.dtype)
        elif layer.bias is not None:
            layer.bias += shift
        else:
            unfolded.append(names.get(layer, ""))
    return unfolded


def pruner_step(pruner: tp.pruner.BasePruner, means: dict[str, Tensor] | None) -> list[str]:
    """One step of a torch-pruning pruner; with ``means`` (:func:`input_means` of the model before the step) each
    group's removed channels are folded into the next layers first. Returns the layers it could not fold into."""
    unfolded: list[str] = []
    with quiet_third_party():
        if means is None:
            pruner.step()
            return unfolded
        for group in pruner.step(interactive=True):
            unfolded += fold_removed_inputs(group, means, pruner.DG)
            group.prune()
    return unfolded
