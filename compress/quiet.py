"""Third-party notices a normal run must not print, silenced where they are triggered and nowhere else.

* torch's ``torch.utils._pytree`` logs a deprecation notice about torchao's ``KernelPreference`` enum the first time
  ``torchao.quantization`` is imported: :func:`load_torchao` imports it with that logger raised to ERROR.
* torch's forward-mode AD loads its decompositions with ``torch.jit.script`` on the first ``jvp`` and warns that
  ``torch.jit.script`` is deprecated: :func:`quiet_third_party` ignores exactly that FutureWarning.
* functorch's ``vmap`` warns "There is a performance drop because we have not yet implemented the batching rule for
  aten::..." when an op runs in its slow per-sample fallback (``adaptive_avg_pool2d`` under ``jvp`` + ``vmap``, in
  ConvNeXt and others): a note to torch's developers, which the user cannot act on. :func:`quiet_third_party`
  ignores exactly that UserWarning; the results are the same.
* torch-pruning warns "Maximum recursive depth reached!" while building a dependency graph when it cannot infer the
  shape a reshape feeds (Swin's windows): the groups through such reshapes are left out of pruning (see
  ``compress.adapters.mlp_scope``), so the note says nothing the user can act on. :func:`quiet_third_party` ignores
  exactly that UserWarning.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from types import ModuleType
from typing import Iterator

PYTREE_LOGGER = "torch.utils._pytree"
JIT_SCRIPT_DEPRECATED = r"`torch\.jit\.script` is deprecated"
VMAP_FALLBACK = r"There is a performance drop because we have not yet implemented the batching rule"
SHAPE_INFER_DEPTH = r"Maximum recursive depth reached!"


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block: no torch _pytree notice, no torch.jit.script deprecation warning, no vmap fallback note, no
    torch-pruning shape-inference note; all restored after."""
    logger = logging.getLogger(PYTREE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_SCRIPT_DEPRECATED, category=FutureWarning)
            warnings.filterwarnings("ignore", message=VMAP_FALLBACK, category=UserWarning)
            warnings.filterwarnings("ignore", message=SHAPE_INFER_DEPTH, category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def load_torchao() -> ModuleType:
    """``torchao.quantization``, imported quietly (a no-op once imported)."""
    with quiet_third_party():
        return importlib.import_module("torchao.quantization")
