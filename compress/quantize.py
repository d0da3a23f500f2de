"""``quantize``: apply a BitPlan with torchao (``quantize_`` with one ``IntxWeightOnlyConfig`` per layer).

BatchNorm is folded first (compress.fold) so the quantized weights are exactly the ones that run; layers the
plan keeps in float are left alone. The plan is recorded in the model's spec, so ``compress.save``/``load``
rebuild the quantized model without pickle (fold, quantize the fresh structure, load the state_dict with
``assign=True``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from .errors import CompressError
from .fold import fold_batchnorm
from .models import attach_spec, identify
from .plan import FLOAT, BitPlan


def apply_quantization(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Fold BN into a copy of ``model`` and quantize its layers as ``recipe`` (``BitPlan.to_dict()``) says."""
    from torchao.quantization import FqnToConfig, quantize_

    from criteria.qnoise import QuantSpec

    folded = fold_batchnorm(model)
    present = dict(folded.named_modules())
    configs = {}
    for name, layer in recipe["layers"].items():
        if name not in present:
            raise CompressError(f"the bit plan names layer {name!r}, which this model lacks",
                                "make the plan on the same (pruned) model you quantize")
        if layer["bits"] != FLOAT:
            configs[name] = QuantSpec(bits=layer["bits"], group_size=recipe.get("group_size"),
                                      mapping=recipe.get("mapping", "symmetric")).config()
    if configs:
        quantize_(folded, FqnToConfig(configs), filter_fn=None)
    return folded


def quantize(model: nn.Module, plan: BitPlan) -> nn.Module:
    """A quantized copy of ``model`` following ``plan`` (weights only; torchao IntxWeightOnly on CPU)."""
    recipe = plan.to_dict()
    quantized = apply_quantization(model, recipe)
    spec = identify(model)
    if spec is not None:
        attach_spec(quantized, replace(spec, quantization=recipe))
    return quantized
