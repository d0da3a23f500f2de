"""Pruning and quantization criteria: TPV, JBR, the quantization-noise trace and baselines.

Pruning criteria are torch-pruning ``Importance`` objects, usable by every torch-pruning pruner:

* ``criteria.names()``: the registered names (built in: jbr, jbr-centred, jbr-recal, jbr-mac, jbr-batch, jbr-ref,
  jacobian, l1, l2, taylor, hessian, bn, fpgm, lamp, random); ``criteria.describe()``: one line each; ``criteria.uses_data(name)``.
* ``criteria.get(name, data=None, *, normalizer=None, **options)``: the Importance, its scores normalised per
  group (``criteria.NORMALIZERS``: none, mean, max, sum, macs; default ``criteria.default_normalizer(name)``,
  ``DEFAULT_NORMALIZER`` for all but jbr-mac, see :mod:`criteria.normalize`); ``data`` (calibration batches, inputs or
  (input, label); same samples in the same order every time) goes to the criteria that use it. Unknown name:
  ``CompressError`` listing the names. ``"SELECT@ALLOCATE"`` (e.g. ``"jbr-centred@bn"``): channels chosen by
  SELECT, how many per group by ALLOCATE (:mod:`criteria.allocated`); ``criteria.parts(name)`` splits it.
* ``criteria.prepare(importance, model, data=None)``: the one hook for every criterion. It runs the calibration
  passes the criterion needs on ``model`` now (JBR gate pass; Taylor's gradient of the loss on the model's own
  predictions; Hessian's per-sample squared gradients) and is a no-op for magnitude criteria. Results are cached
  per model structure (parameter names and shapes), and scoring a group of a model whose structure changed runs
  the passes again, so: either give ``data`` to ``get`` and just run the pruner, or call ``prepare`` before each
  ``pruner.step()``; both re-score every step at the cost of one pass. JBR's dense targets m(x) are frozen at
  the first pass.
* ``criteria.needs_labels(name)``: whether its calibration batches must be (input, label) (``jacobian``);
  ``criteria.NEEDS_LABELS``: those names, as a live read-only set.
* ``criteria.register(name, factory, description="", *, uses_data=False, needs_labels=False, overwrite=False)``:
  add your own criterion. ``names``, ``describe``, ``get``, ``uses_data`` and ``needs_labels`` see it, so
  ``compress.prune(..., criterion=name)`` (or a recipe run in the same Python process) can use it.
  ``factory(**options)``, or ``factory(data, **options)`` when ``uses_data``, must return a torch-pruning
  ``Importance`` (``get`` checks); one that learns from calibration data subclasses
  :class:`criteria.calibrated.CalibratedImportance` (implement ``_calibrate`` and ``score``). A name already
  registered (built-ins included) is replaced only with ``overwrite=True``; otherwise ``CompressError``::

      def l1_sum(**options):
          return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", **options)

      criteria.register("l1-sum", l1_sum, "group L1 norm, summed over coupled layers")

TPV estimates live in ``criteria.tpv``, the quantization-noise model and HAWQ-V2 in ``criteria.qnoise``.
"""

from .normalize import DEFAULT_NORMALIZER, NORMALIZERS
from .registry import (NEEDS_LABELS, default_normalizer, describe, get, names, needs_labels, parts, prepare, register,
                       uses_data)

__all__ = ["DEFAULT_NORMALIZER", "NEEDS_LABELS", "NORMALIZERS", "default_normalizer", "describe", "get", "names",
           "needs_labels", "parts", "prepare", "register", "uses_data"]
