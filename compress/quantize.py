"""``quantize``: apply a BitPlan with torchao (``quantize_`` with ``FqnToConfig``, one config per layer).

BatchNorm is folded first (compress.fold) so the quantized weights are exactly the ones that run; layers the
plan keeps in float are left alone. Which torchao config a layer gets is the business of the quantization
backend of the device the model is on (:mod:`compress.backends`: the CPU's IntxWeightOnly, CUDA's int8 / tinygemm
int4 / float8 Linear kernels).

The plan, the device and the dtype are recorded in the model's spec, so ``compress.save``/``load`` rebuild a
quantized model without pickle (fold, quantize the fresh structure on the same kind of device, load the state_dict
with ``assign=True``); a model quantized on CUDA is rebuilt on a CUDA GPU.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .adapters import adapter_for, identify
from .adapters.spec import attach_spec, user_spec
from .backends import (LayerConfig, apply_quantization, backend_for, device_capability, float8_dequantized,
                       layer_choice, layer_config)
from .backends.cuda import FLOAT8_MIN_CAPABILITY, INT4_GROUP_SIZES, TINYGEMM_MIN_CAPABILITY
from .planning.types import BitPlan

__all__ = ["FLOAT8_MIN_CAPABILITY", "INT4_GROUP_SIZES", "TINYGEMM_MIN_CAPABILITY", "LayerConfig", "apply_quantization",
           "device_capability", "float8_dequantized", "layer_choice", "layer_config", "quantize"]


def quantize(model: nn.Module, plan: BitPlan) -> nn.Module:
    """A quantized copy of ``model`` following ``plan``, with the torchao configs of the model's device (see above)."""
    recipe = plan.to_dict()
    model = adapter_for(model).prepared(model)
    quantized = apply_quantization(model, recipe)
    first = next(model.parameters(), None)
    recipe["quantized_on"] = backend_for(first.device).device_type if first is not None else "cpu"
    recipe["dtype"] = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    spec = identify(model)
    if spec is None:  # a user's own class: its input shape is unknown, and reload needs none without pruning
        spec = user_spec(model, (), adapter_for(model).name)
    attach_spec(quantized, replace(spec, quantization=recipe))
    return quantized
