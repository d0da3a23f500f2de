"""``quantize``: apply a BitPlan with torchao (``quantize_`` with ``FqnToConfig``, one config per layer).

BatchNorm is folded first (compress.fold) so the quantized weights are exactly the ones that run; layers the
plan keeps in float are left alone. Which torchao config a layer gets depends on where the model runs
(:func:`layer_config`, a pure function of the layer, the candidate and the GPU's compute capability):

* CPU, and Conv2d on CUDA: ``IntxWeightOnlyConfig`` (int1..int8, per-axis or per-group).
* CUDA Linear: 8 bits -> ``Int8WeightOnlyConfig``; 4 bits -> ``Int4WeightOnlyConfig`` (tinygemm, bf16, group
  size from 32/64/128/256 dividing in_features; the layer is cast to bfloat16, the kernel casts activations);
  other widths have no CUDA kernel in torchao 0.18 (IntxWeightOnly Linear fails on CUDA: aten.addmm).
* ``"float8"`` (:data:`compress.plan.FLOAT8`): ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on CUDA
  with compute capability >= 8.9, Linear layers with in/out features multiples of 16 and bfloat16 weights.
  Conv2d is refused: torchao 0.18 float8 conv needs mslk and then finds no kernel (measured on an H100).

The plan, the device and the dtype are recorded in the model's spec, so ``compress.save``/``load`` rebuild a
quantized model without pickle (fold, quantize the fresh structure on the same kind of device, load the state_dict
with ``assign=True``); a model quantized on CUDA is rebuilt on a CUDA GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import CompressError
from .fold import fold_batchnorm
from .models import attach_spec, identify
from .plan import FLOAT, FLOAT8, BitPlan, Choice

INT4_GROUP_SIZES = (128, 64, 32, 256)  # Int4WeightOnlyConfig's group sizes, in the order tried by default
FLOAT8_MIN_CAPABILITY = (8, 9)
TINYGEMM_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class LayerConfig:
    """What quantize() does to one layer for one candidate: a torchao config, or ``reason`` why it cannot.

    ``spec`` is the integer quantizer whose error model predicts the config's weight error (None for float and
    float8); ``bfloat16``: cast the layer to bfloat16 before ``quantize_`` (tinygemm int4); ``zero_point_bytes``:
    the storage of one block's zero point (0 when symmetric; the data's own width in an ONNX DequantizeLinear on
    CPU; a bfloat16 beside the scale in tinygemm's ``scale_and_zero``).
    """

    config: Any = None
    reason: str = ""
    spec: Any = None
    bfloat16: bool = False
    zero_point_bytes: float = 0.0

    @property
    def possible(self) -> bool:
        return not self.reason


def layer_config(layer: nn.Module, choice: Choice, capability: tuple[int, int] | None, *,
                 group_size: int | None = None, mapping: str = "symmetric") -> LayerConfig:
    """The torchao config for ``layer`` at ``choice`` (bits 1..8, FLOAT or FLOAT8) on CPU (``capability=None``)
    or on a CUDA GPU of that compute capability; a LayerConfig with a reason when that combination is impossible."""
    from criteria.qnoise import TORCHAO_WEIGHT_DTYPES, QuantSpec, quantization_problems

    if choice == FLOAT:
        return LayerConfig()
    weight = layer.weight
    if weight.dtype not in TORCHAO_WEIGHT_DTYPES:
        return LayerConfig(reason=f"weight dtype {weight.dtype} (torchao quantizes float32/float16/bfloat16 only)")
    linear = isinstance(layer, nn.Linear)
    if choice == FLOAT8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        if capability is None:
            return LayerConfig(reason="float8 needs a CUDA GPU with compute capability >= 8.9")
        if tuple(capability) < FLOAT8_MIN_CAPABILITY:
            return LayerConfig(reason=f"float8 needs compute capability >= 8.9, this GPU has {capability[0]}.{capability[1]}")
        if not linear:
            return LayerConfig(reason="float8 conv does not run in torchao 0.18 (needs mslk, then no kernel for "
                                      "KernelPreference.AUTO on an H100)")
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            return LayerConfig(reason=f"float8 needs in/out features that are multiples of 16, got "
                                      f"{weight.shape[1]}->{weight.shape[0]}")
        if weight.dtype != torch.bfloat16:
            return LayerConfig(reason="float8 per-row scaling needs bfloat16 weights and activations "
                                      "(model.to(torch.bfloat16))")
        return LayerConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    bits = int(choice)
    spec = QuantSpec(bits=bits, group_size=group_size, mapping=mapping)
    if capability is not None and linear:
        return _cuda_linear_config(weight, bits, capability, group_size, mapping)
    problems = quantization_problems(layer, spec)
    if problems:
        return LayerConfig(reason=problems[0][1])
    return LayerConfig(spec.config(), spec=spec, zero_point_bytes=0.0 if spec.mapping.startswith("symmetric") else bits / 8)


def _cuda_linear_config(weight: torch.Tensor, bits: int, capability: tuple[int, int], group_size: int | None,
                        mapping: str) -> LayerConfig:
    from criteria.qnoise import QuantSpec
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerGroup, PerRow
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    in_features = weight.shape[1]
    if bits == 8:
        if mapping != "symmetric":
            return LayerConfig(reason=f"Int8WeightOnlyConfig (CUDA int8 Linear) is symmetric only, not {mapping}")
        if group_size is not None and in_features % group_size:
            return LayerConfig(reason=f"group size {group_size} does not divide the {in_features} input features")
        return LayerConfig(Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size)),
                           spec=QuantSpec(8, group_size, "symmetric"))
    if bits == 4:
        if tuple(capability) < TINYGEMM_MIN_CAPABILITY:
            return LayerConfig(reason=f"Int4WeightOnlyConfig (tinygemm) needs compute capability >= 8.0, this GPU has "
                                      f"{capability[0]}.{capability[1]}")
        sizes = INT4_GROUP_SIZES if group_size is None else (group_size,)
        if group_size is not None and group_size not in INT4_GROUP_SIZES:
            return LayerConfig(reason=f"Int4WeightOnlyConfig takes group sizes {sorted(INT4_GROUP_SIZES)}, not {group_size}")
        g = next((s for s in sizes if in_features % s == 0), None)
        if g is None:
            return LayerConfig(reason=f"no Int4WeightOnlyConfig group size ({'/'.join(map(str, sizes))}) divides the "
                                      f"{in_features} input features")
        config = Int4WeightOnlyConfig(group_size=g, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        return LayerConfig(config, spec=QuantSpec(4, g, "asymmetric"), bfloat16=True, zero_point_bytes=2.0)
    return LayerConfig(reason=f"torchao 0.18 has no CUDA kernel for int{bits} weight-only Linear (IntxWeightOnly "
                              "fails on CUDA: aten.addmm); use 4 or 8 bits")


def float8_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """Q(w) of the float8 config: torchao's per-row e4m3 Float8Tensor of the bfloat16 weight, dequantized."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    q = Float8Tensor.from_hp(weight.detach().to(torch.bfloat16), granularity=PerRow())
    return q.dequantize().to(weight.dtype)


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """None for CPU, else the CUDA compute capability of ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise CompressError(f"quantizing for device {device.type!r} is not supported", "use cpu or cuda")
    if not torch.cuda.is_available():
        raise CompressError("CUDA is not available here", "quantize for device='cpu', or run on a CUDA machine")
    return torch.cuda.get_device_capability(device)


def layer_choice(layer: dict[str, Any]) -> Choice:
    """The candidate a plan's layer entry (``BitPlan.to_dict()["layers"][name]``) chose."""
    return FLOAT8 if layer.get("float8") else layer["bits"]


def apply_quantization(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Fold BN into a copy of ``model`` and quantize its layers as ``recipe`` (``BitPlan.to_dict()``) says, with the
    configs of the device the model is on."""
    from torchao.quantization import FqnToConfig, quantize_

    folded = fold_batchnorm(model)
    present = dict(folded.named_modules())
    first = next(folded.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if recipe.get("quantized_on", "cpu") == "cuda" and device.type != "cuda":
        raise CompressError("this model was quantized on CUDA (GPU-only torchao configs); it is being rebuilt on the CPU",
                            "rebuild it on a CUDA machine (compress.load(path, device='cuda')), or quantize the float "
                            "model for the CPU")
    capability = device_capability(device)
    configs = {}
    for name, layer in recipe["layers"].items():
        if name not in present:
            raise CompressError(f"the bit plan names layer {name!r}, which this model lacks",
                                "make the plan on the same (pruned) model you quantize")
        choice = layer_choice(layer)
        if choice == FLOAT:
            continue
        chosen = layer_config(present[name], choice, capability, group_size=recipe.get("group_size"),
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


def quantize(model: nn.Module, plan: BitPlan) -> nn.Module:
    """A quantized copy of ``model`` following ``plan``, with the torchao configs of the model's device (see above)."""
    recipe = plan.to_dict()
    quantized = apply_quantization(model, recipe)
    first = next(model.parameters(), None)
    recipe["quantized_on"] = "cuda" if first is not None and first.device.type == "cuda" else "cpu"
    recipe["dtype"] = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    spec = identify(model)
    if spec is not None:
        attach_spec(quantized, replace(spec, quantization=recipe))
    return quantized
