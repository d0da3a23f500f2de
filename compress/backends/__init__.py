"""Quantization backends: one interface (:class:`QuantBackend`) for what each target's torchao configs can do.

* :mod:`.candidates`: the candidate vocabulary (bits 1..8, ``FLOAT``, ``FLOAT8``), :func:`parse_candidate`.
* :mod:`.base`: :class:`LayerConfig` and :class:`QuantBackend` (``layer_config``, ``size_bytes``, ``dequantized``,
  ``reload_device``).
* :mod:`.intx`: the CPU, torchao ``IntxWeightOnlyConfig`` and its exact Q(w) (:func:`fake_quantize`).
* :mod:`.cuda`: CUDA int8 / tinygemm int4 / float8 Linear kernels.
* :mod:`.registry`: :func:`register`, :func:`backend_for`, :func:`device_capability`, :func:`reload_device`.
* :mod:`.apply`: :func:`apply_quantization` of a plan record.

A new backend is one file: a :class:`QuantBackend` subclass decorated with :func:`register`, either in this
package (every module here is loaded on import, after the built-in ones, so it is asked first) or in your own code.
"""

from __future__ import annotations

import importlib
import pkgutil

from .apply import apply_quantization, layer_choice
from .base import Capability, LayerConfig, QuantBackend
from .candidates import FLOAT, FLOAT8, Choice, order, parse_candidate, storage_bits
from .cuda import CudaBackend, float8_dequantized
from .intx import IntxBackend, QuantSpec, fake_quantize, torchao_bits
from .registry import backend_for, device_capability, layer_config, register, registered, reload_device, unregister

for _module in pkgutil.iter_modules(__path__):  # backends added as files here register themselves on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FLOAT", "FLOAT8", "Capability", "Choice", "CudaBackend", "IntxBackend", "LayerConfig", "QuantBackend",
           "QuantSpec", "apply_quantization", "backend_for", "device_capability", "fake_quantize", "float8_dequantized",
           "layer_choice", "layer_config", "order", "parse_candidate", "register", "registered", "reload_device",
           "storage_bits", "torchao_bits", "unregister"]
