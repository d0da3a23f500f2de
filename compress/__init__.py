"""TPV compression toolkit: label-free pruning and bit allocation, checked in ONNX.

Library API (one verb per stage)::

    from compress import prune, Target, plan_bits, Budget, quantize, check, save, load
    from exporters import export_onnx
    r = prune(model, data, criterion="jbr", target=Target(macs=0.5))
    plan = plan_bits(r.model, data, budget=Budget(avg_bits=5))
    q = quantize(r.model, plan)
    export_onnx(q, x, "model.onnx"); rep = check("model.onnx", reference=q, data=val)

This module is the facade at the top of the layers (ARCHITECTURE.md): nothing inside the toolkit imports it, and
it loads each name lazily on first use, so ``import compress.errors`` loads nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "data": "compress.data",
    "CompressError": "compress.errors",
    "load": "compress.checkpoint", "save": "compress.checkpoint",
    "accuracy": "compress.evaluate", "agreement": "compress.evaluate", "compare": "compress.evaluate",
    "ModelSpec": "compress.adapters.spec", "resolve": "compress.models",
    "BitPlan": "compress.plan", "Budget": "compress.plan", "plan_bits": "compress.plan",
    "PruneResult": "compress.prune", "Target": "compress.prune", "prune": "compress.prune",
    "quantize": "compress.quantize",
    "distill": "compress.recover", "recalibrate_bn": "compress.recover",
    "check": "exporters.check",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if _EXPORTS[name] == f"compress.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
