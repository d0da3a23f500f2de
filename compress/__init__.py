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
import sys
import types
from typing import Any

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "CompressError": "compress.errors",
    "load": "compress.checkpoint", "save": "compress.checkpoint", "save_pretrained": "compress.adapters.hf_folders",
    "accuracy": "compress.evaluate", "agreement": "compress.evaluate", "compare": "compress.evaluate",
    "ModelSpec": "compress.adapters.spec", "resolve": "compress.models",
    "BitPlan": "compress.plan", "Budget": "compress.plan", "plan_bits": "compress.plan",
    "PruneResult": "compress.prune", "Target": "compress.prune", "prune": "compress.prune",
    "quantize": "compress.quantize",
    "distill": "compress.recover", "recalibrate_bn": "compress.recover",
    "check": "exporters.check",
}
_MODULES = {"data": "compress.data"}  # public names that are modules
# functions named like the submodule that defines them: importing compress.prune must not replace the function
_SHADOWED = frozenset(n for n, m in _EXPORTS.items() if m == f"{__name__}.{n}")

__all__ = sorted({*_EXPORTS, *_MODULES}) + ["__version__"]


class _Facade(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the import system records the submodule here; the public name stays the function
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Facade
