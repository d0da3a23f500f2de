"""``export_onnx``: one ONNX file (opset >= 21) that onnxruntime runs, from a fp32, pruned or torchao-quantized model.

Three kinds of file:

* fp32 (pruned or not): BatchNorm folded into the conv before it, ``torch.onnx.export(dynamo=True)``, dynamic batch
  dimension, input ``input``, output ``logits``.
* weight-only packed (a model quantized with torchao ``IntxWeightOnlyConfig``): each quantized weight is stored as
  int8 / ``ml_dtypes.int4`` data (uint8 / uint4 when torchao's zero points are not all zero) feeding a blocked
  ``DequantizeLinear`` with torchao's own scales and zero points, so the file shrinks and onnxruntime computes the
  very weights torchao computes. Bit-widths below 4 go in 4-bit containers, 5..7 in 8-bit ones.
* ``activations="int8"``: a static int8 QDQ model made by onnxruntime.quantization from calibration batches
  (per-channel weights, per-layer weight bits through TensorQuantOverrides, float layers excluded).

The user's model is never modified: every step works on a deep copy.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compress.atomic import atomic_path, refuse_existing
from compress.data import inputs_of
from compress.errors import CompressError
from compress.fold import set_module, fold_batchnorm, foldable_pairs
from compress.models import spec_of

__all__ = ["ExportResult", "PackedLayer", "export_onnx", "fold_batchnorm", "quantized_layers"]

MIN_OPSET = 21
SINGLE_FILE_LIMIT_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit, less room for the graph itself
FLOAT_BITS = 16  # a bit plan's "kept in float" (compress.plan.FLOAT)
METADATA_PREFIX = "compress."
Container = Literal["int4", "uint4", "int8", "uint8"]
_CONTAINERS: dict[str, Any] = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PackedLayer:
    """One layer whose weight the file stores as integers.

    ``container`` is the ONNX element type holding the ``bits``-bit values (int4/uint4 for bits <= 4, int8/uint8
    above); ``block_size`` input channels share one scale along ``axis`` (None: per-channel QDQ from onnxruntime).
    """

    name: str
    bits: int
    container: Container
    axis: int
    block_size: int | None
    has_zero_point: bool
    weight_shape: tuple[int, ...]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote: the file, its size, the packed layers, and the layers kept in float (and why).

    ``batchnorm_in_scales``: BatchNorms that followed a quantized layer (the model was quantized before folding) and
    were folded into that layer's scales; fold before quantizing to keep torchao's scales exactly.
    """

    path: Path
    size_bytes: int
    weights: Literal["fp32", "packed", "qdq-int8"]
    opset: int
    packed: list[PackedLayer] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)
    batchnorm_in_scales: list[str] = field(default_factory=list)
    external_data: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["external_data"] = str(self.external_data) if self.external_data else None
        return d


@dataclass(frozen=True)
class _QuantizedWeight:
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


def _torchao_bits(weight: torch.Tensor) -> int:
    target = getattr(weight, "target_dtype", torch.int8)
    name = str(target).removeprefix("torch.")
    if not name.startswith("int") or not name[3:].isdigit() or not 1 <= int(name[3:]) <= 8:
        raise CompressError(f"cannot pack torchao weights of dtype {target}", "quantize with IntxWeightOnlyConfig(weight_dtype=torch.int1..int8)")
    return int(name[3:])


def _is_quantized(weight: Any) -> bool:
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


def _quantized_weight(name: str, weight: torch.Tensor) -> _QuantizedWeight:
    """Pack one torchao weight (IntxUnpackedToInt8Tensor or Int8Tensor, weight-only) into ONNX-ready arrays."""
    for attr in ("activation_quantization", "act_quant_kwargs"):
        if getattr(weight, attr, None) is not None:
            raise CompressError(f"layer {name} quantizes activations inside torchao ({type(weight).__name__})",
                                "export weight-only models (IntxWeightOnlyConfig) and ask for activations='int8' instead")
    if not all(hasattr(weight, a) for a in ("qdata", "scale", "block_size", "dequantize")):
        raise CompressError(f"layer {name} holds a {type(weight).__name__} weight, which the ONNX exporter cannot pack",
                            "quantize with torchao IntxWeightOnlyConfig (int1..int8, PerAxis(0) or PerGroup(g))")
    bits = _torchao_bits(weight)
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
    packed = _QuantizedWeight(
        bits=bits, container=container,  # type: ignore[arg-type]
        data=data.numpy().astype(np_type),
        scale=scale.numpy().astype(np.float32) if blocking else scale.reshape(()).numpy().astype(np.float32),
        zero_point=None if zero_data is None else (zero_data.numpy() if blocking else zero_data.reshape(())).astype(np_type),
        axis=blocking[0] if blocking else 0, block_size=blocking[1] if blocking else 0,
        dequantized=weight.dequantize().detach().float())
    expected = _dequantize_numpy(packed)
    if not np.array_equal(expected, packed.dequantized.numpy()):
        raise CompressError(f"layer {name}: packed weights do not reproduce torchao's dequantized weights",
                            "report this model and torchao version to the toolkit maintainers")
    return packed


def _dequantize_numpy(packed: _QuantizedWeight) -> np.ndarray:
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
            if isinstance(getattr(module, "weight", None), torch.Tensor) and _is_quantized(module.weight)}


def _float_reason(module: nn.Module) -> str:
    if isinstance(module, _LAYER_TYPES[:3]) and module.weight.shape[1] == 1:
        return "torchao IntxWeightOnly cannot quantize a conv with one input channel per group (1-channel stem, depthwise)"
    return "not quantized in the source model (left in float by the quantization config)"


def _float_copy(model: nn.Module) -> tuple[nn.Module, dict[str, _QuantizedWeight]]:
    """A float32 eval-mode copy of ``model`` with each torchao weight replaced by its dequantized values."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters() if not _is_quantized(p)):
        raise CompressError("ONNX export needs a float32 model", "call model.float() before exporting")
    float_model = copy.deepcopy(model).eval()
    packs = {}
    for name, module in quantized_layers(float_model).items():
        packs[name] = _quantized_weight(name, module.weight)
        module.weight = nn.Parameter(packs[name].dequantized.clone(), requires_grad=False)
    return float_model, packs


def _rescaled(packed: _QuantizedWeight, factor: torch.Tensor, name: str) -> _QuantizedWeight:
    """``packed`` with its scales multiplied by a per-output-channel ``factor`` (a BatchNorm folded after quantizing):
    (q − z)·(s·f) is the folded weight, and the integers stay torchao's."""
    if not packed.block_size or packed.axis == 0:
        raise CompressError(f"layer {name} shares one scale across output channels, so the BatchNorm after it cannot be folded into its scales",
                            "fold BatchNorm before quantizing: exporters.fold_batchnorm(model), then quantize_")
    shape = (-1,) + (1,) * (packed.scale.ndim - 1)
    scale = (torch.from_numpy(packed.scale) * factor.reshape(shape)).numpy().astype(np.float32)
    rescaled = replace(packed, scale=scale)
    return replace(rescaled, dequantized=torch.from_numpy(_dequantize_numpy(rescaled)))


@torch.no_grad()
def _fold_batchnorm_in_place(model: nn.Module, packs: dict[str, _QuantizedWeight]) -> list[str]:
    """Fold every foldable BatchNorm into its producer; for a packed producer scale its scales (``packs`` updated).

    Returns the BatchNorms folded into packed scales (those layers' scales then differ from torchao's by γ/σ).
    """
    into_scales = []
    for layer_name, norm_name in foldable_pairs(model):
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        fused = fuse(layer, norm)
        if layer_name in packs:
            packs[layer_name] = _rescaled(packs[layer_name], norm.weight * torch.rsqrt(norm.running_var + norm.eps), layer_name)
            fused.weight = nn.Parameter(packs[layer_name].dequantized.clone(), requires_grad=False)
            into_scales.append(norm_name)
        set_module(model, layer_name, fused)
        set_module(model, norm_name, nn.Identity())
    return into_scales


def _example_tensor(example_inputs: Any) -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise CompressError("export_onnx needs one example input tensor of shape (batch, C, ...)",
                            "pass e.g. torch.zeros(1, 3, 224, 224)")
    x = example_inputs.detach().float().cpu()
    return torch.cat([x, x]) if x.shape[0] < 2 else x  # batch 1 would be specialised, not dynamic


def _export_graph(model: nn.Module, example: torch.Tensor, opset: int) -> ir.Model:
    """torch.onnx dynamo export with a dynamic batch dimension, ``input`` -> ``logits``."""
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as err:
        raise CompressError(f"the model rejects the example input of shape {tuple(example.shape)}: {str(err).splitlines()[0][:160]}",
                            "pass an example input of the shape the model was built for") from err
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                    optimize=True, verbose=False)
    except Exception as err:  # torch.export / onnx translation raise many types
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CompressError(f"torch.onnx.export (dynamo) failed on {type(model).__name__}: {type(err).__name__}: {first}",
                            "make the model traceable by torch.export (no data-dependent Python control flow)") from err
    if program is None:
        raise CompressError("torch.onnx.export returned no program", "upgrade torch to >= 2.11")
    return program.model


def _pack_initializers(model: ir.Model, packs: Mapping[str, _QuantizedWeight]) -> None:
    """Replace each packed layer's float weight initializer by integers -> DequantizeLinear (in place)."""
    graph = model.graph
    first = graph.node(0)
    for layer, packed in packs.items():
        name = f"{layer}.weight"
        old = graph.initializers.get(name)
        if old is None:
            raise CompressError(f"the exported graph has no initializer {name!r} for quantized layer {layer}",
                                "report this model to the toolkit maintainers")
        if old.const_value is None or not np.array_equal(old.const_value.numpy(), packed.dequantized.numpy()):
            raise CompressError(f"the ONNX exporter changed the weight of quantized layer {layer} (fused an op into it)",
                                "fold BatchNorm before quantizing: exporters.fold_batchnorm(model), then quantize_")
        graph.initializers.pop(name)
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


def _source_arch(model: nn.Module) -> str:
    spec = spec_of(model)
    return spec.arch if spec is not None else type(model).__name__


def _metadata_props(model: nn.Module, example: torch.Tensor, weights: str, activations: str,
                    bits: Mapping[str, int], extra: Mapping[str, Any] | None) -> dict[str, str]:
    from compress import __version__

    props = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
             for k, v in (extra or {}).items()}
    props.update({
        f"{METADATA_PREFIX}version": __version__,
        f"{METADATA_PREFIX}source_arch": _source_arch(model),
        f"{METADATA_PREFIX}input_shape": json.dumps(list(example.shape[1:])),
        f"{METADATA_PREFIX}weights": weights,
        f"{METADATA_PREFIX}activations": activations,
        f"{METADATA_PREFIX}weight_bits": json.dumps(dict(bits), sort_keys=True),
    })
    return props


def _save(model: ir.Model | onnx.ModelProto, path: Path, overwrite: bool) -> tuple[int, Path | None]:
    """Write atomically: one file below 2 GiB, else the ONNX file plus ``<name>.data`` beside it."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < SINGLE_FILE_LIMIT_BYTES:
        with atomic_path(path, overwrite) as tmp:
            ir.save(model, tmp, format="protobuf")
            onnx.checker.check_model(str(tmp))
        return path.stat().st_size, None
    data_path = path.with_name(path.name + ".data")
    refuse_existing(path, overwrite)
    with atomic_path(data_path, overwrite) as tmp_data, atomic_path(path, overwrite) as tmp_model:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
            staged = Path(staging) / path.name
            ir.save(model, staged, format="protobuf", external_data=data_path.name)
            onnx.checker.check_model(str(staged))
            os.replace(Path(staging) / data_path.name, tmp_data)
            os.replace(staged, tmp_model)
    return path.stat().st_size + data_path.stat().st_size, data_path


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over an iterable of input batches (or (input, label) batches)."""

    def __init__(self, data: Iterable[Any], input_name: str = "input") -> None:
        self._batches = iter(data)
        self._input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.count += 1
        return {self._input_name: inputs_of(batch).detach().float().cpu().numpy()}


def _qdq_weight_bits(model: nn.Module, packs: Mapping[str, _QuantizedWeight],
                     weight_bits: Mapping[str, int] | None) -> dict[str, int]:
    """Bits per Conv/Linear layer for the QDQ model: ``weight_bits``, else the torchao bits, else 8 everywhere."""
    layers = {name for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}
    if weight_bits is not None:
        unknown = sorted(set(weight_bits) - layers)
        if unknown:
            raise CompressError(f"weight_bits names layers this model lacks: {', '.join(unknown[:5])}",
                                "use the Conv2d/Linear module names of the model you export")
        plan = {name: int(weight_bits.get(name, FLOAT_BITS if packs else 8)) for name in layers}
    elif packs:
        plan = {name: packs[name].bits if name in packs else FLOAT_BITS for name in layers}
    else:
        plan = {name: 8 for name in layers}
    bad = {n: b for n, b in plan.items() if not (2 <= b <= 8 or b >= FLOAT_BITS)}
    if bad:
        raise CompressError(f"int8 QDQ export supports 2..8 weight bits or float ({FLOAT_BITS}), got {bad}",
                            "use bits in 2..8, or 16 to keep a layer in float")
    return plan


def _quantize_qdq(proto: onnx.ModelProto, plan: Mapping[str, int], calibration_data: Iterable[Any],
                  workdir: Path) -> tuple[onnx.ModelProto, list[PackedLayer], dict[str, str]]:
    """Static int8 QDQ quantization with onnxruntime (pre-processed, per-channel, per-layer weight bits).

    Activations are uint8, weights int8 (U8S8): ORT's fast x86 path. S8S8 ran 3.4x slower (resnet18 224², 2 threads).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    raw, pre, out = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / "qdq.onnx"
    onnx.save_model(proto, raw)
    quant_pre_process(str(raw), str(pre), skip_symbolic_shape=False)
    pre_model = onnx.load(str(pre))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in pre_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in pre_model.graph.initializer}
    overrides, exclude, layers, float_layers = {}, [], [], {}
    for layer, bits in sorted(plan.items()):
        weight = f"{layer}.weight"
        nodes = consumers.get(weight)
        if weight not in initializers or not nodes:
            raise CompressError(f"cannot find the weight of layer {layer} in the pre-processed ONNX graph",
                                "fold BatchNorm before quantizing so layer weights keep their names")
        if bits >= FLOAT_BITS:
            exclude.extend(n.name for n in nodes)
            float_layers[layer] = "kept in float by the bit plan (excluded from int8 QDQ)"
            continue
        quant_type = QuantType.QInt4 if bits <= 4 else QuantType.QInt8
        overrides[weight] = [{"quant_type": quant_type}]
        container = "int4" if bits <= 4 else "int8"
        layers.append(PackedLayer(layer, bits, container, 0, None, False, tuple(initializers[weight].dims)))  # type: ignore[arg-type]
    reader = _CalibrationReader(calibration_data)
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options={"TensorQuantOverrides": overrides})
    if reader.count == 0:
        raise CompressError("calibration_data yielded no batches", "pass an iterable of input batches")
    return onnx.load(str(out)), layers, float_layers


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = MIN_OPSET,
                metadata: dict | None = None, activations: str | None = None, calibration_data: Iterable[Any] | None = None,
                weight_bits: Mapping[str, int] | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``model`` as one ONNX file at ``path`` (see the module docstring for the three kinds of file).

    ``example_inputs``: one input tensor (batch, C, H, W); the batch dimension is exported dynamic.
    ``metadata``: extra metadata_props (criterion, target, bit plan, ...); non-string values are stored as JSON.
    ``activations="int8"``: static int8 QDQ, calibrated on ``calibration_data`` (input batches); ``weight_bits``
    (layer name -> bits, 16 = keep in float) overrides the bits, which default to the torchao model's own (its float
    layers excluded) or 8 for a float model.
    """
    target = refuse_existing(path, overwrite)
    if not isinstance(model, nn.Module):
        raise CompressError(f"export_onnx needs an nn.Module, got {type(model).__name__}", "pass the model object")
    if opset < MIN_OPSET:
        raise CompressError(f"opset {opset} is too old for blocked/int4 DequantizeLinear", f"use opset >= {MIN_OPSET}")
    if activations not in (None, "int8"):
        raise CompressError(f"unknown activations={activations!r}", "use None (float activations) or 'int8'")
    if activations is None and weight_bits is not None:
        raise CompressError("weight_bits only applies to activations='int8'",
                            "quantize the weights with torchao (compress.quantize) for a weight-only file")
    if activations == "int8" and calibration_data is None:
        raise CompressError("activations='int8' needs calibration_data", "pass an iterable of input batches, e.g. compress.data.calibration(...)")
    example = _example_tensor(example_inputs)
    float_model, packs = _float_copy(model)
    in_scales = _fold_batchnorm_in_place(float_model, packs)
    layer_modules = {n: m for n, m in float_model.named_modules() if isinstance(m, _LAYER_TYPES)}
    if activations == "int8" and sum(p.numel() * 4 for p in float_model.parameters()) >= SINGLE_FILE_LIMIT_BYTES:
        raise CompressError("int8 QDQ export of a model above 2 GiB is not supported", "export fp32 or torchao weight-only packed")
    plan = _qdq_weight_bits(float_model, packs, weight_bits) if activations == "int8" else {}
    graph = _export_graph(float_model, example, opset)
    if activations == "int8":
        with tempfile.TemporaryDirectory(prefix="compress-qdq-") as workdir:
            proto, packed_layers, float_layers = _quantize_qdq(ir.serde.serialize_model(graph), plan, calibration_data, Path(workdir))
        proto.metadata_props.clear()
        for key, value in _metadata_props(model, example, "qdq-int8", "int8", plan, metadata).items():
            proto.metadata_props.add(key=key, value=value)
        size, external = _save(proto, target, overwrite)
        return ExportResult(target, size, "qdq-int8", opset, packed_layers, float_layers, in_scales, external)
    _pack_initializers(graph, packs)
    kind = "packed" if packs else "fp32"
    bits = {name: packed.bits for name, packed in packs.items()}
    graph.metadata_props.update(_metadata_props(model, example, kind, "fp32", bits, metadata))
    size, external = _save(graph, target, overwrite)
    if packs:
        float_layers = {n: _float_reason(m) for n, m in layer_modules.items() if n not in packs}
    else:
        float_layers = {n: "fp32 export (the model has no quantized weights)" for n in layer_modules}
    return ExportResult(target, size, kind, opset, [p.layer(n) for n, p in packs.items()], float_layers, in_scales, external)
