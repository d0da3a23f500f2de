"""Pruning and quantization criteria: TPV, JBR, the quantization-noise trace and baselines.

``criteria.names()`` lists the pruning criteria; ``criteria.get(name, **options)`` returns a torch-pruning
``Importance`` (usable by every torch-pruning pruner); ``criteria.prepare(importance, model, data)`` runs the
calibration passes a criterion needs before each ``pruner.step()``. TPV estimates live in ``criteria.tpv``,
the quantization-noise model and HAWQ-V2 in ``criteria.qnoise``.
"""

from .registry import NEEDS_LABELS, describe, get, names, prepare

__all__ = ["NEEDS_LABELS", "describe", "get", "names", "prepare"]
