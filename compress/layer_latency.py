"""Per-layer latency table for a latency budget: each Conv2d/Linear alone, at each candidate bit-width, as deployed.

The deployment format whose latency depends on the bits is the static int8 QDQ file (``export_onnx(...,
activations="int8", weight_bits=plan.bits)``): a layer at b <= 8 bits runs as a quantized conv/matmul, at 16 it
stays float. (Weight-only packed files do not qualify: onnxruntime folds their DequantizeLinear into float
weights at load, so every plan runs at fp32 speed.) Each layer is exported alone with the input shape it sees in
the model, in exactly that format, and timed in onnxruntime (median of ``runs`` after warm-up). Layers of the same
shape and input are timed once. The sum over layers predicts the whole file's latency up to the ops between
layers (activations, adds, pooling); ``BitPlan.predicted_latency_ms`` reports that sum.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from .backends.candidates import FLOAT
from .distributed import on_main
from .latency import onnx_latency_ms


@dataclass(frozen=True)
class LatencyTable:
    """``ms[layer][bits]``: onnxruntime CPU milliseconds of that layer alone (``batch_size``, ``threads``)."""

    ms: dict[str, dict[int, float]]
    batch_size: int = 1
    threads: int = 2
    runs: int = 20
    format: str = "int8-qdq"
    measured: int = 0  # distinct (shape, bits) sessions timed
    notes: dict[str, str] = field(default_factory=dict)

    def total(self, bits: Mapping[str, int]) -> float:
        """Predicted latency of a plan: Σ_l ms[l][b_l]."""
        return sum(self.ms[name][b] for name, b in bits.items())


def _input_shapes(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _key(layer: nn.Module, shape: tuple[int, ...]) -> tuple:
    if isinstance(layer, nn.Conv2d):
        return ("conv", tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.bias is not None, shape)
    return ("linear", tuple(layer.weight.shape), layer.bias is not None, shape)


def _one_layer(layer: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor, str]:
    """A module holding only ``layer`` (float copy), an example input, and the layer's name inside it."""
    layer = copy.deepcopy(layer).float().cpu().eval()
    if isinstance(layer, nn.Linear):
        features = shape[-1]
        if len(shape) != 1:
            raise ValueError("only Linear layers on flat features are timed")
        return nn.Sequential(nn.Flatten(), layer), torch.randn(1, features, 1, 1), "1"
    return nn.Sequential(layer), torch.randn(1, *shape), "0"


def _time_layer(layer: nn.Module, shape: tuple[int, ...], bits: int, batch_size: int, threads: int, runs: int) -> float:
    wrapper, x, name = _one_layer(layer, shape)
    timing = dict(batch_size=batch_size, threads=threads, runs=runs)
    if bits >= FLOAT:
        return onnx_latency_ms(wrapper, x, **timing)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, *x.shape[1:], generator=g) for _ in range(2)]
    return onnx_latency_ms(wrapper, x, **timing, activations="int8", calibration_data=calib, weight_bits={name: bits})


def layer_latency_table(model: nn.Module, example_inputs: torch.Tensor, candidates: Sequence[int] = (4, 8, FLOAT), *,
                        batch_size: int = 1, threads: int = 2, runs: int = 20,
                        layers: Sequence[str] | None = None) -> LatencyTable:
    """Time every Conv2d/Linear (or the named ``layers``) of ``model`` at every candidate bit-width (see module doc).
    Under torch.distributed rank 0 times them and sends the table to every rank (one plan on all of them)."""
    return on_main(lambda: _measured_table(model, example_inputs, candidates, batch_size, threads, runs, layers))


def _measured_table(model: nn.Module, example_inputs: torch.Tensor, candidates: Sequence[int], batch_size: int,
                    threads: int, runs: int, layers: Sequence[str] | None) -> LatencyTable:
    shapes = _input_shapes(model, example_inputs)
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else list(shapes)
    cache: dict[tuple, float] = {}
    table: dict[str, dict[int, float]] = {}
    notes: dict[str, str] = {}
    for name in names:
        if name not in shapes:
            raise ValueError(f"layer {name} did not run on the example inputs")
        layer, shape = modules[name], shapes[name]
        if isinstance(layer, nn.Linear) and len(shape) != 1:
            notes[name] = f"Linear on inputs of shape {shape}: timed at float only"
            row_bits = [FLOAT]
        else:
            row_bits = sorted(set(candidates))
        row = {}
        for b in row_bits:
            key = (*_key(layer, shape), min(b, FLOAT))
            if key not in cache:
                cache[key] = _time_layer(layer, shape, b, batch_size, threads, runs)
            row[b] = cache[key]
        table[name] = row
    return LatencyTable(table, batch_size, threads, runs, measured=len(cache), notes=notes)
