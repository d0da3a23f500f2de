"""Checks made before any long work starts, each failing with one line that names the tensor or batch and the fix.

* :func:`check_finite_weights`: every floating parameter and buffer is finite (a NaN weight would otherwise
  surface minutes later as a misleading pruning or planning failure).
* :func:`check_calibration`: the calibration data is not empty, and every batch is finite and fits the model's
  inputs (same number of dimensions and channels as the example input).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch
from torch import nn

from .adapters import adapter_for
from .batches import tensors
from .errors import CompressError


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)  # torchao's quantized subclasses hold integer data


def check_finite_weights(model: nn.Module) -> None:
    """A one-line error naming the first parameter or buffer of ``model`` that holds NaN or inf."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if _plain(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CompressError(f"weight {name} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}",
                                "load finite weights (re-train, or re-export the checkpoint) before compressing")


def check_calibration(model: nn.Module, data: Iterable[Any], example_inputs: Any = None) -> int:
    """The number of calibration batches; a one-line error for empty data, or a batch that is non-finite or does
    not fit the model (its adapter's check, and the example input's rank and channels when given)."""
    adapter = adapter_for(model)
    count = 0
    for index, batch in enumerate(data):
        x = adapter.inputs_of(batch)
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors(x)):
            raise CompressError(f"calibration batch {index} holds non-finite values (NaN or inf)",
                                "clean the data (check the normalisation) or drop that batch")
        if isinstance(x, torch.Tensor):
            if isinstance(example_inputs, torch.Tensor) and (x.dim() != example_inputs.dim() or
                                                             (x.dim() > 1 and x.shape[1] != example_inputs.shape[1])):
                raise CompressError(f"calibration batch {index} has shape {tuple(x.shape)}, the model takes "
                                    f"(N, {', '.join(map(str, example_inputs.shape[1:]))})", "pass batches shaped like the example input")
        try:
            adapter.check_inputs(model, x)
        except CompressError as err:
            raise CompressError(f"calibration batch {index}: {err.problem}", err.fix) from err
        count += 1
    if count == 0:
        raise CompressError("the calibration data is empty", "pass at least one batch of inputs")
    return count
