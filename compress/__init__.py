"""TPV compression toolkit: label-free pruning and bit allocation, checked in ONNX.

Library API (one verb per stage)::

    from compress import prune, Target, plan_bits, Budget, quantize, check, save, load
    from exporters import export_onnx
    r = prune(model, data, criterion="jbr", target=Target(macs=0.5))
    plan = plan_bits(r.model, data, budget=Budget(avg_bits=5))
    q = quantize(r.model, plan)
    export_onnx(q, x, "model.onnx"); rep = check("model.onnx", reference=q, data=val)
"""

from . import data
from .checkpoint import load, save
from .errors import CompressError
from .evaluate import accuracy, agreement, compare
from .models import ModelSpec, resolve
from .plan import BitPlan, Budget, plan_bits
from .prune import PruneResult, Target, prune
from .quantize import quantize
from .recover import distill, recalibrate_bn

from exporters.check import check  # noqa: E402  (exporters builds on the modules above)

__all__ = ["BitPlan", "Budget", "CompressError", "ModelSpec", "PruneResult", "Target", "accuracy", "agreement",
           "check", "compare", "data", "distill", "load", "plan_bits", "prune", "quantize", "recalibrate_bn",
           "resolve", "save"]
__version__ = "0.1.0"
