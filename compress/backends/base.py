"""The quantization-backend interface: which torchao config a layer gets for a candidate, what it stores, what
weight Q(w) it computes, and where a model it quantized must be rebuilt.

A backend is bound to a target: the CPU (``capability=None``) or a CUDA GPU of a compute capability. Add one by
subclassing :class:`QuantBackend` in one file and calling :func:`compress.backends.register` on the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compress.errors import CompressError

from .candidates import FLOAT, Choice, storage_bits

Capability = tuple[int, int]


@dataclass(frozen=True)
class LayerConfig:
    """What quantize() does to one layer for one candidate: a torchao config, or ``reason`` why it cannot.

    ``spec`` is the integer quantizer whose error model predicts the config's weight error (None for float and
    float8); ``bfloat16``: cast the layer to bfloat16 before ``quantize_`` (tinygemm int4); ``zero_point_bytes``:
    the storage of one block's zero point (0 when symmetric; the data's own width in an ONNX DequantizeLinear on
    CPU; a bfloat16 beside the scale in tinygemm's ``scale_and_zero``).
    """

    config: Any = None
    reason: str = ""
    spec: Any = None
    bfloat16: bool = False
    zero_point_bytes: float = 0.0

    @property
    def possible(self) -> bool:
        return not self.reason


def parse_device(requested: str | torch.device | None, default: str) -> torch.device:
    """``requested`` (or ``default``) as a torch.device; a CompressError for a name torch does not know."""
    try:
        return torch.device(requested if requested is not None else default)
    except RuntimeError as err:
        raise CompressError(f"unknown device {requested!r}", "use 'cpu' or 'cuda'") from err


class QuantBackend:
    """One target's quantizers. Subclasses set ``name`` and ``device_type`` (recorded as the plan's
    ``quantized_on``) and implement :meth:`handles`, :meth:`layer_config` and :meth:`dequantized`."""

    name: ClassVar[str] = ""
    device_type: ClassVar[str] = "cpu"

    def __init__(self, capability: Capability | None = None) -> None:
        self.capability: Capability | None = None if capability is None else (int(capability[0]), int(capability[1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capability={self.capability})"

    @classmethod
    def handles(cls, capability: Capability | None) -> bool:
        """Whether this backend quantizes for that target (None = CPU, else a CUDA compute capability)."""
        raise NotImplementedError

    def layer_config(self, layer: nn.Module, choice: Choice, *, group_size: int | None = None,
                     mapping: str = "symmetric") -> LayerConfig:
        """The torchao config for ``layer`` at ``choice``, or a LayerConfig whose ``reason`` says why it cannot."""
        raise NotImplementedError

    def dequantized(self, weight: torch.Tensor, choice: Choice, config: LayerConfig | None) -> torch.Tensor:
        """Q(w): the float weight the quantized layer computes with (``config`` from :meth:`layer_config`)."""
        raise NotImplementedError

    def size_bytes(self, weight: torch.Tensor, choice: Choice, config: LayerConfig | None, group_size: int | None,
                   scale_bytes: float) -> float:
        """Bytes of the layer: n·b/8 for n weights at b stored bits, plus n/g blocks of g input channels each holding
        a scale (``scale_bytes``) and a zero point (``config.zero_point_bytes``). g is the config's own group size,
        else ``group_size``, else a whole row (Cin). FLOAT: n·16/8."""
        bits = storage_bits(choice)
        if bits == FLOAT:
            return weight.numel() * FLOAT / 8
        block = config.spec.group_size if config is not None and config.spec is not None else group_size
        block = weight.shape[1] if block is None else block
        zero = config.zero_point_bytes if config is not None else 0.0
        return weight.numel() * bits / 8 + weight.numel() / block * (scale_bytes + zero)

    @classmethod
    def reload_device(cls, requested: str | torch.device | None, source: str) -> torch.device:
        """Where to rebuild a model this backend quantized (or a float model): ``requested``, default the CPU;
        any device that exists here will do. ``source`` names the checkpoint in errors."""
        target = parse_device(requested, "cpu")
        if target.type == "cuda" and not torch.cuda.is_available():
            raise CompressError(f"{source} is to be loaded on CUDA, and this machine has no CUDA GPU",
                                "load it with device='cpu'")
        return target
