"""torchao on a CUDA GPU: Linear layers take ``Int8WeightOnlyConfig`` (int8), ``Int4WeightOnlyConfig`` (tinygemm
int4, bfloat16, sm >= 8.0) or float8 per-row (sm >= 8.9); Conv2d layers take ``IntxWeightOnlyConfig`` as on the CPU.

Other Linear widths have no CUDA kernel in torchao 0.18 (IntxWeightOnly Linear fails on CUDA: aten.addmm), and
float8 conv finds none either. A model quantized here is rebuilt on a CUDA GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compress.errors import CompressError
from compress.quiet import load_torchao

from .base import Capability, LayerConfig, parse_device
from .candidates import FLOAT, FLOAT8, Choice
from .intx import IntxBackend, QuantSpec, dtype_reason, intx_config
from .registry import register

INT4_GROUP_SIZES = (128, 64, 32, 256)  # Int4WeightOnlyConfig's group sizes, in the order tried by default
FLOAT8_MIN_CAPABILITY = (8, 9)
TINYGEMM_MIN_CAPABILITY = (8, 0)


def float8_config(weight: Tensor, linear: bool, capability: Capability | None) -> LayerConfig:
    """``Float8DynamicActivationFloat8WeightConfig(PerRow())`` (e4m3 weights, one scale per row), or why not."""
    load_torchao()
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


def cuda_linear_config(weight: Tensor, bits: int, capability: Capability, group_size: int | None,
                       mapping: str) -> LayerConfig:
    """int8 -> ``Int8WeightOnlyConfig`` (symmetric, per row or per group); int4 -> tinygemm ``Int4WeightOnlyConfig``
    (asymmetric, bfloat16 scale and zero point per group of 128/64/32/256 input features); other widths: a reason."""
    load_torchao()
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


def float8_dequantized(weight: Tensor) -> Tensor:
    """Q(w) of the float8 config: torchao's per-row e4m3 Float8Tensor of the bfloat16 weight, dequantized."""
    load_torchao()
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    q = Float8Tensor.from_hp(weight.detach().to(torch.bfloat16), granularity=PerRow())
    return q.dequantize().to(weight.dtype)


@register
class CudaBackend(IntxBackend):
    """A CUDA GPU of compute capability ``capability``: the Linear kernels above, Conv2d through IntxWeightOnly."""

    name = "torchao-cuda"
    device_type = "cuda"

    @classmethod
    def handles(cls, capability: Capability | None) -> bool:
        return capability is not None

    def layer_config(self, layer: nn.Module, choice: Choice, *, group_size: int | None = None,
                     mapping: str = "symmetric") -> LayerConfig:
        if choice == FLOAT:
            return LayerConfig()
        weight = layer.weight
        reason = dtype_reason(weight.dtype)
        if reason:
            return LayerConfig(reason=reason)
        linear = isinstance(layer, nn.Linear)
        if choice == FLOAT8:
            return float8_config(weight, linear, self.capability)
        if linear:
            return cuda_linear_config(weight, int(choice), self.capability, group_size, mapping)  # type: ignore[arg-type]
        return intx_config(layer, int(choice), group_size, mapping)

    def dequantized(self, weight: Tensor, choice: Choice, config: LayerConfig | None) -> Tensor:
        return float8_dequantized(weight) if choice == FLOAT8 else super().dequantized(weight, choice, config)

    @classmethod
    def reload_device(cls, requested: str | torch.device | None, source: str) -> torch.device:
        """CUDA-only configs: default CUDA, and nothing but CUDA."""
        target = parse_device(requested, "cuda")
        if target.type == "cuda" and not torch.cuda.is_available():
            raise CompressError(f"{source} was quantized with CUDA-only torchao configs, and this machine has no CUDA GPU",
                                "load it on a CUDA machine, or quantize the float model for the CPU")
        if target.type != "cuda":
            raise CompressError(f"{source} was quantized with CUDA-only torchao configs; it cannot be rebuilt on {target.type}",
                                "load it with device='cuda', or quantize the float model for the CPU")
        return target
