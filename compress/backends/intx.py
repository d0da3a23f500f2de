"""torchao ``IntxWeightOnlyConfig``: int1..int8 weight-only, per-axis or per-group, on the CPU (and for Conv2d on
CUDA), and its exact error model Q(w).

Per block of g input channels, torchao picks a step Δ (its scale) and a zero point z; the layer then computes with
Q(w) = (clamp(round(w/Δ) + z, qmin, qmax) − z)·Δ. :func:`fake_quantize` reproduces that bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from compress.errors import CompressError
from compress.nn_helpers import weight_layers
from compress.quiet import load_torchao

from .base import Capability, LayerConfig, QuantBackend
from .candidates import FLOAT, FLOAT8, Choice
from .registry import register

MappingName = Literal["symmetric", "asymmetric", "symmetric_no_clipping_err"]
TORCHAO_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# nn.MultiheadAttention's output projection stays in float: torch's attention function multiplies by its weight
# itself (aten.t, then addmm)
MHA_OUT_PROJ = ("nn.MultiheadAttention's out_proj: torch's attention function transposes its weight itself "
                "(aten.t), which torchao's integer weight tensors do not implement")


@dataclass(frozen=True)
class QuantSpec:
    """torchao 0.18 ``IntxWeightOnlyConfig(weight_dtype=int<bits>, granularity, mapping_type, scale_dtype)``.

    ``group_size=None`` is ``PerAxis(0)`` (one block spans all input channels: (1, Cin) for Linear,
    (1, Cin, 1, 1) for Conv2d, so a conv has one scale per (out channel, kh, kw)); an int g is ``PerGroup(g)``.
    ``scale_dtype=None`` keeps the weight's dtype; the scale is clamped below at finfo(weight dtype).smallest_normal.
    """

    bits: int = 8
    group_size: int | None = None
    mapping: MappingName = "symmetric"
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise CompressError(f"torchao IntxWeightOnly supports 1..8 bits, got {self.bits}", "pick bits in 1..8")
        if self.mapping not in ("symmetric", "asymmetric", "symmetric_no_clipping_err"):
            raise CompressError(f"unknown mapping {self.mapping!r}", "use symmetric, asymmetric or symmetric_no_clipping_err")

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def config(self) -> Any:
        """The equivalent torchao ``IntxWeightOnlyConfig``."""
        load_torchao()
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.bits}"),
                                    granularity=PerAxis(0) if self.group_size is None else PerGroup(self.group_size),
                                    mapping_type=MappingType[self.mapping.upper()], scale_dtype=self.scale_dtype)


def block_length(weight: Tensor, spec: QuantSpec) -> int:
    """Number of input channels (dim 1) that share one scale: Cin for PerAxis(0), g for PerGroup(g)."""
    return weight.shape[1] if spec.group_size is None else spec.group_size


def quant_params(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale Δ, zero point) exactly as torchao's ``choose_qparams_affine`` for this spec, in torchao's shapes:
    (Cout, Cin/g) for Linear, (Cout, Cin/g, kh, kw) for Conv2d."""
    g = block_length(weight, spec)
    if weight.dim() not in (2, 4) or weight.shape[1] % g:
        raise CompressError(f"cannot split a weight of shape {tuple(weight.shape)} into blocks of {g} input channels",
                            "use a group size that divides the input channels (see quantization_problems)")
    qmin, qmax = spec.qrange
    blocks = weight.unflatten(1, (weight.shape[1] // g, g))
    min_neg = blocks.amin(2).clamp(max=0)
    max_pos = blocks.amax(2).clamp(min=0)
    eps = torch.finfo(weight.dtype).smallest_normal
    if spec.mapping == "asymmetric":
        scale = ((max_pos - min_neg) / float(qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax)
    else:
        if spec.mapping == "symmetric":
            scale = torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2)
        else:
            smin, smax = min_neg / float(qmin), max_pos / float(qmax)
            scale = torch.where(smin > smax, smin, smax)
        scale, zero = scale.clamp(min=eps), torch.full_like(scale, int((qmax + qmin + 1) / 2))
    return scale.to(spec.scale_dtype or weight.dtype), zero


def _per_weight(t: Tensor, weight: Tensor, spec: QuantSpec) -> Tensor:
    """A per-block tensor (torchao scale shape) repeated to the weight's shape."""
    return t.repeat_interleave(block_length(weight, spec), dim=1)


def quant_step(weight: Tensor, spec: QuantSpec, *, per_weight: bool = False) -> Tensor:
    """The quantizer step Δ (torchao's scale) per block, or repeated to every weight with ``per_weight``."""
    scale = quant_params(weight, spec)[0]
    return _per_weight(scale, weight, spec) if per_weight else scale


def fake_quantize(weight: Tensor, spec: QuantSpec) -> Tensor:
    """Q(w): torchao's dequantized weight, (clamp(round(w·(1/Δ)) + z, qmin, qmax) − z)·Δ, same ops and dtypes."""
    scale, zero = (_per_weight(t, weight, spec) for t in quant_params(weight, spec))
    qmin, qmax = spec.qrange
    q = torch.clamp(torch.round(weight * (1.0 / scale)) + zero, qmin, qmax)
    return ((q - zero) * scale).to(weight.dtype)


def quantization_problems(model: nn.Module, spec: QuantSpec) -> list[tuple[str, str]]:
    """(layer, reason) for every Conv2d/Linear layer torchao's IntxWeightOnlyConfig cannot quantize with ``spec``."""
    problems = []
    for name, m in weight_layers(model).items():
        w, g = m.weight, block_length(m.weight, spec)
        if w.dtype not in TORCHAO_WEIGHT_DTYPES:
            problems.append((name, dtype_reason(w.dtype)))
        elif w.shape[1] % g:
            problems.append((name, f"group size {g} does not divide the {w.shape[1]} input channels"))
        elif g == 1:
            problems.append((name, "blocks of 1 input channel (torchao's reduction fails on them, e.g. a conv with "
                                   "Cin=1 or a depthwise conv)"))
    return problems


def dtype_reason(dtype: torch.dtype) -> str:
    """Why torchao refuses a weight of ``dtype`` ('' when it takes it)."""
    if dtype in TORCHAO_WEIGHT_DTYPES:
        return ""
    return f"weight dtype {dtype} (torchao quantizes float32/float16/bfloat16 only)"


def intx_config(layer: nn.Module, bits: int, group_size: int | None, mapping: str) -> LayerConfig:
    """``IntxWeightOnlyConfig`` at ``bits`` for ``layer``, or the reason torchao cannot quantize it. Asymmetric
    zero points are stored at the data's own width (b/8 bytes per block, as in an ONNX DequantizeLinear)."""
    spec = QuantSpec(bits=bits, group_size=group_size, mapping=mapping)  # type: ignore[arg-type]
    problems = quantization_problems(layer, spec)
    if problems:
        return LayerConfig(reason=problems[0][1])
    return LayerConfig(spec.config(), spec=spec, zero_point_bytes=0.0 if spec.mapping.startswith("symmetric") else bits / 8)


def torchao_bits(weight: Tensor) -> int | None:
    """The bit-width b of a torchao integer weight tensor (its ``target_dtype`` int1..int8; Int8Tensor: 8), or None
    when it holds another kind of number."""
    name = str(getattr(weight, "target_dtype", torch.int8)).removeprefix("torch.")
    if not name.startswith("int") or not name[3:].isdigit() or not 1 <= int(name[3:]) <= 8:
        return None
    return int(name[3:])


@register
class IntxBackend(QuantBackend):
    """The CPU: every Conv2d/Linear whose blocks torchao can reduce takes int1..int8; float8 has no CPU kernel."""

    name = "torchao-intx"
    device_type = "cpu"

    @classmethod
    def handles(cls, capability: Capability | None) -> bool:
        return capability is None

    def layer_config(self, layer: nn.Module, choice: Choice, *, group_size: int | None = None,
                     mapping: str = "symmetric") -> LayerConfig:
        if choice == FLOAT:
            return LayerConfig()
        reason = dtype_reason(layer.weight.dtype)
        if reason:
            return LayerConfig(reason=reason)
        if isinstance(layer, NonDynamicallyQuantizableLinear):
            return LayerConfig(reason=MHA_OUT_PROJ)
        if choice == FLOAT8:
            return LayerConfig(reason="float8 needs a CUDA GPU with compute capability >= 8.9")
        return intx_config(layer, int(choice), group_size, mapping)

    def dequantized(self, weight: Tensor, choice: Choice, config: LayerConfig | None) -> Tensor:
        if choice == FLOAT:
            return weight
        spec = config.spec if config is not None and config.spec is not None else QuantSpec(int(choice))
        return fake_quantize(weight, spec)
