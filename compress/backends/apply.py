"""Applying a bit plan's record with torchao: fold BatchNorm, then ``quantize_`` with one config per layer
(``FqnToConfig``), each asked of the backend of the device the model is on."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from compress.errors import CompressError
from compress.fold import fold_batchnorm
from compress.quiet import load_torchao

from .candidates import FLOAT, FLOAT8, Choice
from .registry import backend_for


def layer_choice(layer: Mapping[str, Any]) -> Choice:
    """The candidate a plan's layer entry (``BitPlan.to_dict()["layers"][name]``) chose."""
    return FLOAT8 if layer.get("float8") else layer["bits"]


def apply_quantization(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """Fold BN into a copy of ``model`` and quantize its layers as ``recipe`` (``BitPlan.to_dict()``) says, with the
    configs of the device the model is on."""
    load_torchao()
    from torchao.quantization import FqnToConfig, quantize_

    folded = fold_batchnorm(model)
    present = dict(folded.named_modules())
    first = next(folded.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    quantized_on = recipe.get("quantized_on", "cpu")
    if quantized_on != "cpu" and device.type != quantized_on:
        where = str(quantized_on).upper()
        raise CompressError(f"this model was quantized on {where} (GPU-only torchao configs); it is being rebuilt on the "
                            f"{device.type.upper()}",
                            f"rebuild it on a {where} machine (compress.load(path, device='{quantized_on}')), or quantize "
                            "the float model for the CPU")
    backend = backend_for(device)
    configs = {}
    for name, layer in recipe["layers"].items():
        if name not in present:
            raise CompressError(f"the bit plan names layer {name!r}, which this model lacks",
                                "make the plan on the same (pruned) model you quantize")
        choice = layer_choice(layer)
        if choice == FLOAT:
            continue
        chosen = backend.layer_config(present[name], choice, group_size=recipe.get("group_size"),
                                      mapping=recipe.get("mapping", "symmetric"))
        if not chosen.possible:
            raise CompressError(f"layer {name} at {choice} bits cannot be quantized on {device.type}: {chosen.reason}",
                                f"make the plan for this device: plan_bits(..., device='{device.type}')")
        if chosen.bfloat16:
            present[name].to(torch.bfloat16)
        configs[name] = chosen.config
    if configs:
        quantize_(folded, FqnToConfig(configs), filter_fn=None)
    return folded
