"""Static int8 QDQ: onnxruntime.quantization on the float graph, calibrated on input batches, per-channel weights
at per-layer bits (TensorQuantOverrides), float layers excluded."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from torch import nn

from compress.backends.candidates import FLOAT as FLOAT_BITS
from compress.batches import is_named
from compress.data import inputs_of
from compress.errors import CompressError

from .packed import TRANSPOSED_SUFFIX
from .result import LAYER_TYPES, PackedLayer


def graph_inputs(proto: onnx.ModelProto) -> dict[str, np.dtype]:
    """The graph's inputs (not initializers) and their numpy dtypes, in order."""
    initializers = {init.name for init in proto.graph.initializer}
    return {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in proto.graph.input if i.name not in initializers}


class CalibrationReader:
    """onnxruntime CalibrationDataReader over an iterable of batches: input tensors, (input, label) pairs, or dicts
    of named tensors (a tokenizer's output), fed as the graph's ``inputs`` (name -> dtype)."""

    def __init__(self, data: Iterable[Any], inputs: Mapping[str, np.dtype]) -> None:
        self._batches = iter(data)
        self._inputs = dict(inputs)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.count += 1
        x = inputs_of(batch)
        if not is_named(x):
            if len(self._inputs) != 1:
                raise CompressError(f"the model takes named inputs ({', '.join(self._inputs)}), the calibration data "
                                    "yields one tensor", "pass dict batches (a tokenizer's output) as calibration_data")
            x = dict.fromkeys(self._inputs, x)
        missing = [name for name in self._inputs if name not in x]
        if missing:
            raise CompressError(f"calibration batches lack the input(s) {', '.join(missing)} (got {', '.join(x)})",
                                f"pass batches with {', '.join(self._inputs)}")
        return {name: x[name].detach().cpu().numpy().astype(dtype) for name, dtype in self._inputs.items()}


def qdq_weight_bits(model: nn.Module, torchao_bits: Mapping[str, int],
                    weight_bits: Mapping[str, int] | None) -> dict[str, int]:
    """Bits per Conv/Linear layer for the QDQ model: ``weight_bits``, else the torchao bits (``torchao_bits``, layer
    -> b, of a quantized model; its other layers float), else 8 everywhere."""
    layers = {name for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    if weight_bits is not None:
        unknown = sorted(set(weight_bits) - layers)
        if unknown:
            raise CompressError(f"weight_bits names layers this model lacks: {', '.join(unknown[:5])}",
                                "use the Conv2d/Linear module names of the model you export")
        plan = {name: int(weight_bits.get(name, FLOAT_BITS if torchao_bits else 8)) for name in layers}
    elif torchao_bits:
        plan = {name: torchao_bits.get(name, FLOAT_BITS) for name in layers}
    else:
        plan = {name: 8 for name in layers}
    bad = {n: b for n, b in plan.items() if not (2 <= b <= 8 or b >= FLOAT_BITS)}
    if bad:
        raise CompressError(f"int8 QDQ export supports 2..8 weight bits or float ({FLOAT_BITS}), got {bad}",
                            "use bits in 2..8, or 16 to keep a layer in float")
    return plan


def activation_products(proto: onnx.ModelProto, initializers: Mapping[str, Any]) -> list[str]:
    """The MatMul nodes of ``proto`` that multiply two activations (neither input a weight): attention products."""
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and not any(i in initializers for i in n.input)]


SHAPE_INFER_LOGGER = "onnxruntime.tools.symbolic_shape_infer"


def pre_process(raw: Path, pre: Path) -> None:
    """onnxruntime's quantization pre-processing (shape inference, graph optimisation) of ``raw`` into ``pre``:
    with symbolic shape inference, or without it where that cannot finish (a transformer's dynamic sequence axis;
    its notices about the unresolved shapes silenced). Run inside ``raw``'s folder: a failed symbolic inference
    leaves its temporary model there, not in the caller's working directory."""
    from onnxruntime.quantization import quant_pre_process

    logger = logging.getLogger(SHAPE_INFER_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.chdir(raw.parent):
            try:
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=False)
            except Exception as err:  # symbolic_shape_infer raises a bare Exception("Incomplete symbolic shape inference")
                if "symbolic shape" not in str(err):
                    raise
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
    finally:
        logger.setLevel(level)


def quantize_qdq(proto: onnx.ModelProto, plan: Mapping[str, int], calibration_data: Iterable[Any],
                 workdir: Path) -> tuple[onnx.ModelProto, list[PackedLayer], dict[str, str]]:
    """Static int8 QDQ quantization with onnxruntime (pre-processed, per-channel, per-layer weight bits).

    Activations are uint8, weights int8 (U8S8): ORT's fast x86 path. S8S8 ran 3.4x slower (resnet18 224², 2 threads).
    In a graph with products of two activations (attention: QKᵀ, the weighted values) only the weight layers'
    nodes are quantized, so the attention and its softmax stay in float; elsewhere (CNNs) every op onnxruntime can
    quantize is.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    raw, pre, out = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / "qdq.onnx"
    onnx.save_model(proto, raw)
    pre_process(raw, pre)
    pre_model = onnx.load(str(pre))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in pre_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in pre_model.graph.initializer}
    overrides, exclude, quantized_nodes, layers, float_layers = {}, [], [], [], {}
    for layer, bits in sorted(plan.items()):
        weight = f"{layer}.weight" if f"{layer}.weight" in initializers else layer + TRANSPOSED_SUFFIX
        nodes = consumers.get(weight)
        if weight not in initializers or not nodes:
            raise CompressError(f"cannot find the weight of layer {layer} in the pre-processed ONNX graph",
                                "fold BatchNorm before quantizing so layer weights keep their names")
        if bits >= FLOAT_BITS:
            exclude.extend(n.name for n in nodes)
            float_layers[layer] = "kept in float by the bit plan (excluded from int8 QDQ)"
            continue
        quantized_nodes.extend(n.name for n in nodes)
        quant_type = QuantType.QInt4 if bits <= 4 else QuantType.QInt8
        overrides[weight] = [{"quant_type": quant_type}]
        container = "int4" if bits <= 4 else "int8"
        layers.append(PackedLayer(layer, bits, container, 0, None, False, tuple(initializers[weight].dims)))  # type: ignore[arg-type]
    reader = CalibrationReader(calibration_data, graph_inputs(pre_model))
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    nodes_to_quantize=quantized_nodes if activation_products(pre_model, initializers) else None,
                    extra_options={"TensorQuantOverrides": overrides})
    if reader.count == 0:
        raise CompressError("calibration_data yielded no batches", "pass an iterable of input batches")
    return onnx.load(str(out)), layers, float_layers
