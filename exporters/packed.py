"""Weight-only packing of torchao weights into ONNX: integers q, scales s (and zero points z) feeding a blocked
``DequantizeLinear`` that computes (q − z)·s, exactly torchao's dequantized weight.

Weights are stored as int8 / ``ml_dtypes.int4`` (uint8 / uint4 when torchao's zero points are not all zero);
bit-widths below 4 go in 4-bit containers, 5..7 in 8-bit ones. A BatchNorm after a quantized layer (quantized
before folding) is folded into that layer's scales: (q − z)·(s·γ/σ), the integers stay torchao's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from compress.backends import torchao_bits
from compress.errors import CompressError
from compress.fold import fold_pair, foldable_pairs

from .result import LAYER_TYPES, Container, PackedLayer

_CONTAINERS: dict[str, Any] = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}


@dataclass(frozen=True)
class QuantizedWeight:
    """A torchao weight as ONNX DequantizeLinear inputs: integer data, scale (+ zero point), axis and block size."""

    bits: int
    container: Container
    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int
    dequantized: torch.Tensor

    def layer(self, name: str) -> PackedLayer:
        return PackedLayer(name, self.bits, self.container, self.axis, self.block_size, self.zero_point is not None,
                           tuple(self.data.shape))

    def transposed(self) -> "QuantizedWeight":
        """The same 2-D weight stored as Wᵀ (what the exporter folds a Linear on channels-last inputs into: MatMul
        with Wᵀ): data, scales and zero points transposed, the blocking axis swapped."""
        if self.data.ndim != 2:
            raise CompressError(f"only 2-D weights can be stored transposed, got shape {self.data.shape}",
                                "report this model to the toolkit maintainers")
        flip = (lambda a: a.T.copy()) if self.block_size else (lambda a: a)  # per-tensor scale: a scalar
        return replace(self, data=self.data.T.copy(), scale=flip(self.scale),
                       zero_point=None if self.zero_point is None else flip(self.zero_point),
                       axis=1 - self.axis if self.block_size else 0, dequantized=self.dequantized.T.contiguous())


def weight_bits(weight: torch.Tensor) -> int:
    """The bit-width of a torchao integer weight (asked of the backend), or a CompressError."""
    bits = torchao_bits(weight)
    if bits is None:
        raise CompressError(f"cannot pack torchao weights of dtype {getattr(weight, 'target_dtype', torch.int8)}",
                            "quantize with IntxWeightOnlyConfig(weight_dtype=torch.int1..int8)")
    return bits


def is_quantized(weight: Any) -> bool:
    """Whether ``weight`` is a torchao tensor subclass (not a plain Tensor or Parameter)."""
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter)


def _block_axis(shape: tuple[int, ...], block: tuple[int, ...], name: str) -> tuple[int, int] | None:
    """(axis, block_size) of a block that spans several elements along one axis; None for one scale per tensor."""
    if tuple(block) == tuple(shape):
        return None
    spans = [d for d, b in enumerate(block) if b != 1]
    if len(spans) > 1:
        raise CompressError(f"layer {name}: torchao block {tuple(block)} spans several axes, which DequantizeLinear cannot express",
                            "quantize with PerAxis(0) or PerGroup(g)")
    axis = spans[0] if spans else 1
    return axis, int(block[axis])


def quantized_weight(name: str, weight: torch.Tensor) -> QuantizedWeight:
    """Pack one torchao weight (IntxUnpackedToInt8Tensor or Int8Tensor, weight-only) into ONNX-ready arrays."""
    for attr in ("activation_quantization", "act_quant_kwargs"):
        if getattr(weight, attr, None) is not None:
            raise CompressError(f"layer {name} quantizes activations inside torchao ({type(weight).__name__})",
                                "export weight-only models (IntxWeightOnlyConfig) and ask for activations='int8' instead")
    if not all(hasattr(weight, a) for a in ("qdata", "scale", "block_size", "dequantize")):
        raise CompressError(f"layer {name} holds a {type(weight).__name__} weight, which the ONNX exporter cannot pack",
                            "quantize with torchao IntxWeightOnlyConfig (int1..int8, PerAxis(0) or PerGroup(g))")
    bits = weight_bits(weight)
    qdata = weight.qdata.detach().to(torch.int32)
    shape = tuple(qdata.shape)
    block = tuple(int(b) for b in weight.block_size)
    blocking = _block_axis(shape, block, name)
    counts = [s // b for s, b in zip(shape, block)]
    scale = weight.scale.detach().float().reshape(counts)
    zero = getattr(weight, "zero_point", None)
    zero = None if zero is None else zero.detach().reshape(counts)
    if zero is not None and zero.is_floating_point():
        if not torch.equal(zero, zero.round()):
            raise CompressError(f"layer {name} has fractional zero points", "quantize with integer zero points (the default)")
        zero = zero.to(torch.int32)
    if zero is not None and not bool(zero.any()):
        zero = None
    container_bits = 4 if bits <= 4 else 8
    if zero is None:
        container = f"int{container_bits}"
        data, zero_data = qdata, None
    else:  # shift into the unsigned type: (q + o) − (z + o) = q − z exactly
        container, offset = f"uint{container_bits}", 2 ** (container_bits - 1)
        data, zero_data = qdata + offset, zero.to(torch.int32) + offset
    low, high = (0, 2**container_bits - 1) if zero is not None else (-(2 ** (container_bits - 1)), 2 ** (container_bits - 1) - 1)
    for values in (data, zero_data):
        if values is not None and (int(values.min()) < low or int(values.max()) > high):
            raise CompressError(f"layer {name}: torchao values fall outside {bits}-bit range", "re-quantize the model with torchao")
    np_type = _CONTAINERS[container]
    packed = QuantizedWeight(
        bits=bits, container=container,  # type: ignore[arg-type]
        data=data.numpy().astype(np_type),
        scale=scale.numpy().astype(np.float32) if blocking else scale.reshape(()).numpy().astype(np.float32),
        zero_point=None if zero_data is None else (zero_data.numpy() if blocking else zero_data.reshape(())).astype(np_type),
        axis=blocking[0] if blocking else 0, block_size=blocking[1] if blocking else 0,
        dequantized=weight.dequantize().detach().float())
    expected = dequantize_numpy(packed)
    if not np.array_equal(expected, packed.dequantized.numpy()):
        raise CompressError(f"layer {name}: packed weights do not reproduce torchao's dequantized weights",
                            "report this model and torchao version to the toolkit maintainers")
    return packed


def dequantize_numpy(packed: QuantizedWeight) -> np.ndarray:
    """What ONNX DequantizeLinear computes from the packed arrays: (q − z) · s, the scale repeated over each block."""
    q = packed.data.astype(np.int32)
    z = 0 if packed.zero_point is None else packed.zero_point.astype(np.int32)
    s = packed.scale
    if packed.block_size:
        z = z if np.isscalar(z) else np.repeat(z, packed.block_size, axis=packed.axis)
        s = np.repeat(s, packed.block_size, axis=packed.axis)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers of ``model`` whose ``weight`` is a torchao tensor subclass (quantized), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and is_quantized(module.weight)}


def float_reason(module: nn.Module) -> str:
    """Why a layer of a packed file stayed in float."""
    if isinstance(module, LAYER_TYPES[:3]) and module.weight.shape[1] == 1:
        return "torchao IntxWeightOnly cannot quantize a conv with one input channel per group (1-channel stem, depthwise)"
    return "not quantized in the source model (left in float by the quantization config)"


def float_copy(model: nn.Module) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """A float32 eval-mode copy of ``model`` with each torchao weight replaced by its dequantized values, and the
    packed form of each of those weights by layer name."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters() if not is_quantized(p)):
        raise CompressError("ONNX export needs a float32 model", "call model.float() before exporting")
    float_model = copy.deepcopy(model).eval()
    packs = {}
    for name, module in quantized_layers(float_model).items():
        packs[name] = quantized_weight(name, module.weight)
        module.weight = nn.Parameter(packs[name].dequantized.clone(), requires_grad=False)
    return float_model, packs


def _rescaled(packed: QuantizedWeight, factor: torch.Tensor, name: str) -> QuantizedWeight:
    """``packed`` with its scales multiplied by a per-output-channel ``factor`` (a BatchNorm folded after quantizing):
    (q − z)·(s·f) is the folded weight, and the integers stay torchao's."""
    if not packed.block_size or packed.axis == 0:
        raise CompressError(f"layer {name} shares one scale across output channels, so the BatchNorm after it cannot be folded into its scales",
                            "fold BatchNorm before quantizing: exporters.fold_batchnorm(model), then quantize_")
    shape = (-1,) + (1,) * (packed.scale.ndim - 1)
    scale = (torch.from_numpy(packed.scale) * factor.reshape(shape)).numpy().astype(np.float32)
    rescaled = replace(packed, scale=scale)
    return replace(rescaled, dequantized=torch.from_numpy(dequantize_numpy(rescaled)))


@torch.no_grad()
def fold_batchnorm_in_place(model: nn.Module, packs: dict[str, QuantizedWeight]) -> list[str]:
    """Fold every foldable BatchNorm into its producer; for a packed producer scale its scales (``packs`` updated).

    Returns the BatchNorms folded into packed scales (those layers' scales then differ from torchao's by γ/σ).
    """
    into_scales = []
    for layer_name, norm_name in foldable_pairs(model):
        fused, norm = fold_pair(model, layer_name, norm_name)
        if layer_name in packs:
            packs[layer_name] = _rescaled(packs[layer_name], norm.weight * torch.rsqrt(norm.running_var + norm.eps), layer_name)
            fused.weight = nn.Parameter(packs[layer_name].dequantized.clone(), requires_grad=False)
            into_scales.append(norm_name)
    return into_scales


TRANSPOSED_SUFFIX = ".weight_transposed"  # initializer name given to a Linear's constant-folded Wᵀ


def transposed_initializer(graph: ir.Graph, layer: str, weight: torch.Tensor) -> ir.Value:
    """A Linear applied to channels-last or (batch, sequence, features) inputs (ConvNeXt's blocks, transformers) is
    exported as MatMul with a constant-folded Wᵀ under a generated name: the one initializer holding exactly Wᵀ."""
    if weight.dim() == 2:
        target = weight.detach().T.numpy()
        found = [v for v in graph.initializers.values() if v.const_value is not None
                 and tuple(v.const_value.shape) == target.shape and np.array_equal(v.const_value.numpy(), target)]
        if len(found) == 1:
            return found[0]
    raise CompressError(f"the exported graph has no initializer {layer + '.weight'!r} (nor its transpose) for "
                        f"layer {layer}", "report this model to the toolkit maintainers")


def name_transposed_weights(model: ir.Model, layers: Mapping[str, nn.Module]) -> None:
    """Rename each of ``layers``' constant-folded Wᵀ initializers ``<layer>.weight_transposed`` (in place), so
    later passes (static QDQ) find them by name."""
    graph = model.graph
    for layer, module in layers.items():
        if f"{layer}.weight" not in graph.initializers:
            value = transposed_initializer(graph, layer, module.weight)
            graph.initializers.pop(value.name)
            value.name = layer + TRANSPOSED_SUFFIX
            graph.register_initializer(value)


def pack_initializers(model: ir.Model, packs: Mapping[str, QuantizedWeight]) -> None:
    """Replace each packed layer's float weight initializer by integers -> DequantizeLinear (in place)."""
    graph = model.graph
    first = graph.node(0)
    for layer, packed in packs.items():
        name = f"{layer}.weight"
        old = graph.initializers.get(name)
        if old is None:
            old, packed, name = transposed_initializer(graph, layer, packed.dequantized), packed.transposed(), layer + TRANSPOSED_SUFFIX
        if old.const_value is None or not np.array_equal(old.const_value.numpy(), packed.dequantized.numpy()):
            raise CompressError(f"the ONNX exporter changed the weight of quantized layer {layer} (fused an op into it)",
                                "fold BatchNorm before quantizing: exporters.fold_batchnorm(model), then quantize_")
        graph.initializers.pop(old.name)
        old.name = f"{name}.float"
        inputs = [ir.Value(name=f"{name}_quantized", const_value=ir.Tensor(packed.data, name=f"{name}_quantized")),
                  ir.Value(name=f"{name}_scale", const_value=ir.Tensor(packed.scale, name=f"{name}_scale"))]
        if packed.zero_point is not None:
            inputs.append(ir.Value(name=f"{name}_zero_point", const_value=ir.Tensor(packed.zero_point, name=f"{name}_zero_point")))
        for value in inputs:
            value.shape = ir.Shape(value.const_value.shape)
            value.type = ir.TensorType(value.const_value.dtype)
            graph.register_initializer(value)
        attributes = {"axis": packed.axis, "block_size": packed.block_size} if packed.block_size else {}
        node = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear")
        out = node.outputs[0]
        out.name, out.shape, out.type = name, old.shape, old.type
        old.replace_all_uses_with(out)
        graph.insert_before(first, node)
