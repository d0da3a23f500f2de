"""Exporters: ONNX files that onnxruntime runs (fp32, pruned, torchao-quantized), and their check."""

from .check import CheckReport, check
from .onnx_export import ExportResult, PackedLayer, export_onnx, fold_batchnorm

__all__ = ["CheckReport", "ExportResult", "PackedLayer", "check", "export_onnx", "fold_batchnorm"]
