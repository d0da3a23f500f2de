"""The backend registry: which :class:`~compress.backends.base.QuantBackend` quantizes for a target.

Backends are looked up newest-registered first, so a registered backend overrides the built-in ones for the
targets it :meth:`~compress.backends.base.QuantBackend.handles`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

import torch
from torch import nn

from compress.errors import CompressError

from .base import Capability, LayerConfig, QuantBackend
from .candidates import Choice

B = TypeVar("B", bound=type[QuantBackend])
Target = torch.device | str | Sequence[int] | None  # a device, a CUDA compute capability, or None (CPU)

_BACKENDS: list[type[QuantBackend]] = []


def register(backend: B) -> B:
    """Add ``backend`` (a QuantBackend subclass) to the registry; usable as a class decorator."""
    if not (isinstance(backend, type) and issubclass(backend, QuantBackend)):
        raise CompressError(f"{backend!r} is not a QuantBackend subclass", "subclass compress.backends.QuantBackend")
    if backend not in _BACKENDS:
        _BACKENDS.append(backend)
    return backend


def unregister(backend: type[QuantBackend]) -> None:
    """Remove ``backend`` from the registry (no-op when absent)."""
    if backend in _BACKENDS:
        _BACKENDS.remove(backend)


def registered() -> list[type[QuantBackend]]:
    """The registered backends, newest first (the lookup order)."""
    return list(reversed(_BACKENDS))


def device_capability(device: torch.device | str) -> Capability | None:
    """None for CPU, else the CUDA compute capability of ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise CompressError(f"quantizing for device {device.type!r} is not supported", "use cpu or cuda")
    if not torch.cuda.is_available():
        raise CompressError("CUDA is not available here", "quantize for device='cpu', or run on a CUDA machine")
    return torch.cuda.get_device_capability(device)


def backend_for(target: Target) -> QuantBackend:
    """The backend for ``target``: a device (``"cpu"``, ``"cuda:0"``), a CUDA compute capability (9, 0), or None
    (the CPU), bound to that capability."""
    if target is None or isinstance(target, (tuple, list)):
        capability = None if target is None else (int(target[0]), int(target[1]))
    else:
        capability = device_capability(target)
    for backend in registered():
        if backend.handles(capability):
            return backend(capability)
    where = "the CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
    raise CompressError(f"no quantization backend is registered for {where}",
                        "register one with compress.backends.register")


def layer_config(layer: nn.Module, choice: Choice, capability: Capability | None, *,
                 group_size: int | None = None, mapping: str = "symmetric") -> LayerConfig:
    """The torchao config for ``layer`` at ``choice`` (bits 1..8, FLOAT or FLOAT8) on CPU (``capability=None``)
    or on a CUDA GPU of that compute capability; a LayerConfig with a reason when that combination is impossible."""
    return backend_for(capability).layer_config(layer, choice, group_size=group_size, mapping=mapping)


def reload_device(quantization: Mapping[str, Any] | None, requested: str | torch.device | None,
                  source: str) -> torch.device:
    """The device to rebuild a saved model on: asks the backend that quantized it (the record's ``quantized_on``;
    the CPU's for a float model). ``source`` names the checkpoint in errors."""
    quantized_on = (quantization or {}).get("quantized_on") or "cpu"
    for backend in registered():
        if backend.device_type == quantized_on:
            return backend.reload_device(requested, source)
    for backend in registered():
        if backend.handles(None):
            return backend.reload_device(requested, source)
    return QuantBackend.reload_device(requested, source)
