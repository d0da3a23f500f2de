"""What an ONNX export wrote: :class:`ExportResult` and the :class:`PackedLayer` records of integer weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

Container = Literal["int4", "uint4", "int8", "uint8"]
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers a result accounts for (packed or float)


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
