"""Exporters: ONNX files that onnxruntime runs (fp32, pruned, torchao-quantized)."""
