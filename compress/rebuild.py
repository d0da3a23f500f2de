"""``build(spec)``: a model's structure from its :class:`~compress.adapters.spec.ModelSpec`, with fresh weights.

The spec's adapter rebuilds the architecture and replays the pruning history; a quantized spec is then folded and
quantized again through its backend (:func:`compress.backends.apply_quantization`), so a state_dict saved from the
original loads into the result strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_named
from .adapters.spec import ModelSpec, attach_spec
from .backends import apply_quantization


def build(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """A model with ``spec``'s structure (pruning replayed, BN folded and layers quantized when the spec says so)
    and freshly initialised weights, on ``device`` (in the dtype it was quantized in, when quantized)."""
    model = adapter_named(spec.adapter).rebuild(spec)
    model.to(device)
    if spec.quantization:
        model.to(getattr(torch, spec.quantization.get("dtype", "float32")))
        model = apply_quantization(model, spec.quantization)
    return attach_spec(model, spec)
