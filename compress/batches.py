"""Model inputs of one batch: a tensor (an image batch) or a mapping of named tensors (a tokenized batch with
``input_ids`` and ``attention_mask``, or ``pixel_values``), each with the samples along dimension 0.

Everything above the core handles inputs through these functions, so a criterion, an evaluation or an exporter
works the same on both kinds:

* :func:`rows`, :func:`first_rows`, :func:`concat_rows`: the samples of a batch, its first ``n``, several joined
  (:func:`compress.nn_helpers.on_model` moves a batch to the model's device and dtype, token ids kept integer);
* :func:`call`: ``model(x)`` or ``model(**x)``; :func:`prediction`: the prediction tensor f(x), (samples,
  outputs), of what the model returned (a tensor, or a Hugging Face output's ``logits``; for per-position logits
  those of the last attended position, the next token of a causal language model); :func:`predict`: both;
  :func:`predict_with`: the same with other parameters (``torch.func.functional_call``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .errors import CompressError

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
LABEL_KEYS = ("labels", "label")  # the names a dict batch gives its labels (Hugging Face: "labels")


def is_named(x: Any) -> bool:
    """Whether ``x`` is a mapping of named input tensors."""
    return isinstance(x, Mapping)


def map_tensors(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to every tensor of a mapping (other values kept)."""
    if is_named(x):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return fn(x)


def tensors(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x`` in a fixed order (a mapping's by name)."""
    if is_named(x):
        return [x[k] for k in sorted(x) if isinstance(x[k], torch.Tensor)]
    return [x]


def rows(x: Inputs) -> int:
    """The number of samples in ``x`` (dimension 0; all named tensors must agree)."""
    sizes = {int(t.shape[0]) for t in tensors(x) if t.dim() > 0}
    if len(sizes) != 1:
        raise CompressError(f"the named inputs of a batch disagree on the number of samples: {sorted(sizes)}",
                            "give every input tensor of a batch the same first dimension")
    return sizes.pop()


def describe(x: Inputs) -> str:
    """The shape of ``x`` for an error message: ``(8, 3, 32, 32)`` or ``input_ids (8, 16), attention_mask (8, 16)``."""
    if is_named(x):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in x.items() if isinstance(v, torch.Tensor))
    return str(tuple(x.shape))


def first_rows(x: Inputs, n: int) -> Inputs:
    """The first ``n`` samples of ``x``."""
    return map_tensors(x, lambda t: t[:n])


def split_rows(x: Inputs, size: int) -> list[Inputs]:
    """``x`` in consecutive chunks of ``size`` samples (the last may be smaller)."""
    n = rows(x)
    return [map_tensors(x, lambda t, a=a: t[a:a + size]) for a in range(0, n, size)]


def concat_rows(batches: Sequence[Inputs]) -> Inputs:
    """Several batches of the same kind joined along the samples."""
    if is_named(batches[0]):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(list(batches))


def call_arguments(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) that call a model on ``x``: positional for a tensor, by keyword for named inputs."""
    return ((), dict(x)) if is_named(x) else ((x,), {})


def call(model: nn.Module, x: Inputs) -> Any:
    """``model`` run on ``x`` (see :func:`call_arguments`)."""
    args, kwargs = call_arguments(x)
    return model(*args, **kwargs)


def last_positions(x: Inputs, length: int) -> torch.Tensor:
    """For each sample, the index of its last attended position (from ``attention_mask``, padding on either side),
    else ``length - 1``."""
    mask = x.get("attention_mask") if is_named(x) else None
    if mask is None:
        return torch.full((rows(x),), length - 1, dtype=torch.long)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask != 0)).amax(1)


def prediction(output: Any, x: Inputs) -> torch.Tensor:
    """The prediction tensor f(x), (samples, outputs), of a model's ``output`` on ``x``: the tensor itself, the
    first tensor of a tuple, or the logits of a dict or Hugging Face output, where logits per position (samples,
    positions, outputs) give those of each sample's last attended position."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise CompressError(f"the model returned {type(output).__name__}, not a tensor or an output with logits",
                            "wrap the model so that it returns its logits")
    return at_last_positions(logits, x) if logits.dim() == 3 and not isinstance(output, torch.Tensor) else logits


def at_last_positions(logits: torch.Tensor, x: Inputs) -> torch.Tensor:
    """(samples, outputs): each sample's logits at its last attended position (see :func:`last_positions`) of
    per-position ``logits`` (samples, positions, outputs)."""
    index = last_positions(x, logits.shape[1]).to(logits.device)
    return logits[torch.arange(len(logits), device=logits.device), index]


def predict(model: nn.Module, x: Inputs) -> torch.Tensor:
    """f(x): the prediction tensor of ``model`` on ``x`` (already on its device), see :func:`prediction`."""
    return prediction(call(model, x), x)


def predict_with(model: nn.Module, parameters: Any, x: Inputs) -> torch.Tensor:
    """f(x) with ``parameters`` (a dict by name, or a tuple of dicts) in place of the model's own
    (``torch.func.functional_call``: differentiable in them, vmap-able), see :func:`prediction`."""
    args, kwargs = call_arguments(x)
    return prediction(functional_call(model, parameters, args, kwargs), x)
