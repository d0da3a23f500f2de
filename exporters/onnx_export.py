"""``export_onnx``: one ONNX file (opset >= 21) that onnxruntime runs, from a fp32, pruned or torchao-quantized model.

Three kinds of file, one module each:

* fp32 (pruned or not), :mod:`exporters.onnx_graph`: BatchNorm folded into the conv before it,
  ``torch.onnx.export(dynamo=True)``, dynamic batch dimension, input ``input``, output ``logits``.
* weight-only packed, :mod:`exporters.packed` (a model quantized with torchao ``IntxWeightOnlyConfig``): each
  quantized weight is stored as integers feeding a blocked ``DequantizeLinear`` with torchao's own scales and zero
  points, so the file shrinks and onnxruntime computes the very weights torchao computes.
* ``activations="int8"``, :mod:`exporters.qdq`: a static int8 QDQ model made by onnxruntime.quantization from
  calibration batches (per-channel weights, per-layer weight bits, float layers excluded).

The user's model is never modified: every step works on a deep copy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import onnx_ir as ir
from torch import nn

from compress.atomic import refuse_existing
from compress.batches import Inputs
from compress.backends.candidates import FLOAT as FLOAT_BITS
from compress.errors import CompressError
from compress.fold import fold_batchnorm
from compress.nn_helpers import per_sample_outputs

from .onnx_graph import (METADATA_PREFIX, MIN_OPSET, SINGLE_FILE_LIMIT_BYTES, example_batch, export_graph,
                         metadata_props, save)
from .packed import (QuantizedWeight, float_copy, float_reason, fold_batchnorm_in_place, name_transposed_weights,
                     pack_initializers, quantized_layers)
from .qdq import qdq_weight_bits, quantize_qdq
from .result import LAYER_TYPES, ExportResult, PackedLayer

__all__ = ["FLOAT_BITS", "METADATA_PREFIX", "MIN_OPSET", "SINGLE_FILE_LIMIT_BYTES", "ExportResult", "PackedLayer",
           "export_onnx", "fold_batchnorm", "quantized_layers"]


def _check_arguments(model: Any, opset: int, activations: str | None, calibration_data: Any,
                     weight_bits: Mapping[str, int] | None) -> None:
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


def _write_qdq(model: nn.Module, graph: ir.Model, example: Inputs, target: Path, opset: int,
               plan: Mapping[str, int], calibration_data: Iterable[Any], metadata: dict | None, in_scales: list[str],
               overwrite: bool) -> ExportResult:
    """The static int8 QDQ file of the float ``graph``."""
    with tempfile.TemporaryDirectory(prefix="compress-qdq-") as workdir:
        proto, packed_layers, float_layers = quantize_qdq(ir.serde.serialize_model(graph), plan, calibration_data, Path(workdir))
    proto.metadata_props.clear()
    for key, value in metadata_props(model, example, "qdq-int8", "int8", plan, metadata).items():
        proto.metadata_props.add(key=key, value=value)
    size, external = save(proto, target, overwrite, SINGLE_FILE_LIMIT_BYTES)
    return ExportResult(target, size, "qdq-int8", opset, packed_layers, float_layers, in_scales, external)


NOT_RUN = "not run in eval mode (e.g. an auxiliary classifier), so not in the file"
FOLDED = ("computed from constants only (e.g. Swin V2's position-bias MLP on its coordinate table), so the exporter "
          "folded it into a constant that holds its quantized result")


def layers_not_in_file(model: nn.Module, example: Inputs, layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """The ``layers`` whose weights the exported graph cannot hold, with the reason: those an eval-mode forward never
    calls (GoogLeNet's and Inception's auxiliary heads) and those whose output has no batch dimension (found on
    two copies of ``example``), which the exporter constant-folds."""
    per_sample = per_sample_outputs(model.eval(), example, layers)
    return {name: NOT_RUN if name not in per_sample else FOLDED for name in layers if not per_sample.get(name)}


def _write_weights(model: nn.Module, graph: ir.Model, example: Inputs, target: Path, opset: int,
                   packs: Mapping[str, QuantizedWeight], layers: Mapping[str, nn.Module], not_in_file: dict[str, str],
                   metadata: dict | None, in_scales: list[str], overwrite: bool) -> ExportResult:
    """The fp32 file, or the weight-only packed one when the model has torchao weights (``packs``); layers whose
    weights the graph cannot hold (``not_in_file``) are listed as float layers with the reason."""
    packs = {n: p for n, p in packs.items() if n not in not_in_file}
    pack_initializers(graph, packs)
    kind = "packed" if packs else "fp32"
    bits = {name: packed.bits for name, packed in packs.items()}
    graph.metadata_props.update(metadata_props(model, example, kind, "fp32", bits, metadata))
    size, external = save(graph, target, overwrite, SINGLE_FILE_LIMIT_BYTES)
    unpacked = float_reason if packs else (lambda _m: "fp32 export (the model has no quantized weights)")
    float_layers = {n: not_in_file.get(n) or unpacked(m) for n, m in layers.items() if n not in packs}
    return ExportResult(target, size, kind, opset, [p.layer(n) for n, p in packs.items()], float_layers, in_scales, external)


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = MIN_OPSET,
                metadata: dict | None = None, activations: str | None = None, calibration_data: Iterable[Any] | None = None,
                weight_bits: Mapping[str, int] | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``model`` as one ONNX file at ``path`` (see the module docstring for the three kinds of file).

    ``example_inputs``: one input tensor (batch, C, H, W), or a dict of named input tensors (a tokenized batch,
    ``pixel_values``); the batch dimension (and a text model's sequence) is exported dynamic.
    ``metadata``: extra metadata_props (criterion, target, bit plan, ...); non-string values are stored as JSON.
    ``activations="int8"``: static int8 QDQ, calibrated on ``calibration_data`` (input batches); ``weight_bits``
    (layer name -> bits, 16 = keep in float) overrides the bits, which default to the torchao model's own (its float
    layers excluded) or 8 for a float model.
    """
    target = refuse_existing(path, overwrite)
    _check_arguments(model, opset, activations, calibration_data, weight_bits)
    example = example_batch(example_inputs)
    float_model, packs = float_copy(model)
    in_scales = fold_batchnorm_in_place(float_model, packs)
    layers = {n: m for n, m in float_model.named_modules() if isinstance(m, LAYER_TYPES)}
    if activations == "int8":
        if sum(p.numel() * 4 for p in float_model.parameters()) >= SINGLE_FILE_LIMIT_BYTES:
            raise CompressError("int8 QDQ export of a model above 2 GiB is not supported", "export fp32 or torchao weight-only packed")
        plan = qdq_weight_bits(float_model, {name: packed.bits for name, packed in packs.items()}, weight_bits)
        graph = export_graph(float_model, example, opset)
        name_transposed_weights(graph, {name: layers[name] for name in plan})
        return _write_qdq(model, graph, example, target, opset, plan, calibration_data, metadata, in_scales, overwrite)
    graph = export_graph(float_model, example, opset)
    not_in_file = layers_not_in_file(float_model, example, layers)
    return _write_weights(model, graph, example, target, opset, packs, layers, not_in_file, metadata, in_scales, overwrite)
