"""Exporters: ONNX files that onnxruntime runs (fp32, pruned, torchao-quantized), and their check.

One module per idea: :mod:`.onnx_graph` (float graph, metadata, save), :mod:`.packed` (weight-only torchao
packing), :mod:`.qdq` (static int8 QDQ), :mod:`.onnx_export` (``export_onnx`` composing them), :mod:`.check`.
"""

from .check import CheckReport, check, open_session
from .onnx_export import export_onnx, fold_batchnorm
from .result import ExportResult, PackedLayer

__all__ = ["CheckReport", "ExportResult", "PackedLayer", "check", "export_onnx", "fold_batchnorm", "open_session"]
