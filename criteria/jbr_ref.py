"""``jbr-ref``: JBR as the TPV paper's pruning benchmark defines it, to show the pipeline reproduces the paper.

Differences from the exact per-sample ``jbr`` (:mod:`criteria.jbr`):

* the objective is the batch-mean cross-entropy L_b against the dense model's predicted classes y*, on the
  calibration samples whose dense confidence (max softmax) exceeds ``confidence`` (at most ``samples`` of them),
  frozen at the first pass; the pool is reshuffled into new batches at every pass (every pruning step);
* a channel's score is Σ_b (∂L_b/∂γ)² per *layer* it touches, summed over the layers of its group: the output of
  a conv/linear (Σ_{in,k} w·∂L/∂w + b·∂L/∂b), of a BatchNorm (γ·∂L/∂γ + β·∂L/∂β) and the input of each next
  conv/linear (Σ_{out,k} w·∂L/∂w over the channel's input column), each squared on its own, not the square of the
  coupled sum; no normalisation in the paper's protocol (``normalizer="none"``).

Grouped convolutions' input terms are not scored (only ungrouped convs and linear layers).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.batches import concat_rows, map_tensors, predict, rows
from compress.data import inputs_of
from compress.distributed import all_reduce_sums
from compress.errors import CompressError
from compress.nn_helpers import model_device, on_model

from .calibrated import CalibratedImportance

NORMS = (nn.modules.batchnorm._BatchNorm,)
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _out_term(layer: nn.Module, grads: dict[Tensor, Tensor]) -> Tensor:
    """Σ over the parameters of each output channel of p·∂L/∂p (weights and bias; γ and β of a BatchNorm)."""
    term = (layer.weight * grads[layer.weight]).reshape(layer.weight.shape[0], -1).sum(1)
    if grads.get(layer.bias) is not None:
        term = term + layer.bias * grads[layer.bias]
    return term


def _in_term(layer: nn.Module, grads: dict[Tensor, Tensor]) -> Tensor | None:
    """Σ over each input channel's weights of w·∂L/∂w (ungrouped conv, linear; None for the others)."""
    if isinstance(layer, NORMS) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1):
        return None
    return (layer.weight * grads[layer.weight]).transpose(0, 1).reshape(layer.weight.shape[1], -1).sum(1)


class JBRReferenceImportance(CalibratedImportance):
    """The TPV paper's JBR (see the module docstring); ``seed`` fixes the reshuffling."""

    def __init__(self, data: Iterable[Any] | None = None, *, confidence: float = 0.9, samples: int = 6400,
                 batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__(data)
        self.confidence, self.samples, self.batch_size, self.seed = confidence, samples, batch_size, seed
        self.pool: tuple[Any, Tensor] | None = None  # the confident inputs (CPU) and their frozen classes y*
        self.terms: dict[str, Tensor] = {}  # "<layer>:out" / "<layer>:in" -> Σ_b (∂L_b/∂γ)² per channel
        self.passes = 0

    def reset(self) -> None:
        """Forget the frozen pool (to score a different dense model)."""
        self.pool, self.terms, self.passes = None, {}, 0
        self.invalidate()

    @torch.no_grad()
    def _freeze_pool(self, model: nn.Module, data: Iterable[Any]) -> None:
        """The first ``samples`` calibration samples the dense model predicts with confidence > ``confidence``."""
        kept_inputs, kept_classes, sizes = [], [], []
        for batch in data:
            x = inputs_of(batch)
            sizes.append(rows(x))
            probabilities = predict(model, on_model(x, model)).float().softmax(1).cpu()
            confidence, classes = probabilities.max(1)
            keep = torch.nonzero(confidence > self.confidence).flatten()
            kept_inputs.append(map_tensors(x, lambda t: t[keep.to(t.device)].cpu()))
            kept_classes.append(classes[keep])
            if sum(len(c) for c in kept_classes) >= self.samples:
                break
        classes = torch.cat(kept_classes)[:self.samples] if kept_classes else torch.zeros(0, dtype=torch.long)
        if len(classes) == 0:
            raise CompressError(f"no calibration sample has dense confidence > {self.confidence}, so jbr-ref has "
                                "nothing to score", "lower its confidence option or use 'jbr'")
        inputs = map_tensors(concat_rows(kept_inputs), lambda t: t[:len(classes)])
        self.pool = (inputs, classes)
        self.batch_size = self.batch_size or max(sizes)

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        if self.pool is None:
            self._freeze_pool(model, data)
        inputs, classes = self.pool
        order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(self.seed * 100003 + self.passes))
        self.passes += 1
        layers = {n: m for n, m in model.named_modules()
                  if isinstance(m, LAYERS + NORMS) and getattr(m, "weight", None) is not None}
        params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
        terms: dict[str, Tensor] = {}
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            x = on_model(map_tensors(inputs, lambda t: t[index]), model)
            loss = F.cross_entropy(predict(model, x), classes[index].to(model_device(model)))
            grads = dict(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))
            with torch.no_grad():
                for name, layer in layers.items():
                    if grads[layer.weight] is None:
                        continue
                    for side, term in (("out", _out_term(layer, grads)), ("in", _in_term(layer, grads))):
                        if term is not None:
                            square = term.double().cpu() ** 2
                            key = f"{name}:{side}"
                            terms[key] = terms[key] + square if key in terms else square
        self.terms = all_reduce_sums(terms)  # under torch.distributed: every rank's batches

    @torch.no_grad()
    def score(self, group: Any) -> Tensor | None:
        """Σ over the group's layers of their squared terms at the removed channels (torch-pruning's "sum")."""
        names = self.module_names(group)
        total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        found = False
        for item in group:
            layer, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
            side = {"prune_out_channels": "out", "prune_in_channels": "in"}.get(handler)
            key = f"{names.get(layer)}:{side}"
            if side is None or key not in self.terms:
                continue
            roots = item.root_idxs
            if any(r is None for r in roots):
                continue
            total.index_add_(0, torch.tensor(roots), self.terms[key][list(item.idxs)])
            found = True
        return total.float() if found else None
