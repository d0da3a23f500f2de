"""The toolkit's version, recorded in checkpoints, ONNX metadata and reports."""

__version__ = "0.1.0"
