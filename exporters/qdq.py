"""Static int8 QDQ: onnxruntime.quantization on the float graph, calibrated on input batches, per-channel weights
at per-layer bits (TensorQuantOverrides), float layers excluded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from torch import nn

from compress.backends.candidates import FLOAT as FLOAT_BITS
from compress.data import inputs_of
from compress.errors import CompressError

from .result import LAYER_TYPES, PackedLayer


class CalibrationReader:
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


def quantize_qdq(proto: onnx.ModelProto, plan: Mapping[str, int], calibration_data: Iterable[Any],
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
    reader = CalibrationReader(calibration_data)
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options={"TensorQuantOverrides": overrides})
    if reader.count == 0:
        raise CompressError("calibration_data yielded no batches", "pass an iterable of input batches")
    return onnx.load(str(out)), layers, float_layers
