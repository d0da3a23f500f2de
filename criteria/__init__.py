"""Pruning and quantization criteria: TPV, JBR, the quantization-noise trace and baselines.

Pruning criteria are torch-pruning ``Importance`` objects, usable by every torch-pruning pruner:

* ``criteria.names()``: the registered names (jbr, jbr-mac, jbr-batch, jacobian, l1, l2, taylor, hessian, bn,
  fpgm, lamp, random); ``criteria.describe()``: one line each; ``criteria.uses_data(name)``.
* ``criteria.get(name, data=None, **options)``: the Importance; ``data`` (calibration batches, inputs or
  (input, label); same samples in the same order every time) goes to the criteria that use it. Unknown name:
  ``CompressError`` listing the names.
* ``criteria.prepare(importance, model, data=None)``: the one hook for every criterion. It runs the calibration
  passes the criterion needs on ``model`` now (JBR gate pass; Taylor's gradient of the loss on the model's own
  predictions; Hessian's per-sample squared gradients) and is a no-op for magnitude criteria. Results are cached
  per model structure (parameter names and shapes), and scoring a group of a model whose structure changed runs
  the passes again, so: either give ``data`` to ``get`` and just run the pruner, or call ``prepare`` before each
  ``pruner.step()``; both re-score every step at the cost of one pass. JBR's dense targets m(x) are frozen at
  the first pass.

TPV estimates live in ``criteria.tpv``, the quantization-noise model and HAWQ-V2 in ``criteria.qnoise``.
"""

from .registry import NEEDS_LABELS, describe, get, names, prepare, uses_data

__all__ = ["NEEDS_LABELS", "describe", "get", "names", "prepare", "uses_data"]
