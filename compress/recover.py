"""Recovery after pruning: label-free BatchNorm recalibration and distillation from the dense model.

BN recalibration re-estimates each BatchNorm's running mean and variance on calibration inputs (cumulative
average, no gradient): pruning changes the statistics of the surviving channels' inputs. Distillation minimises
T²·KL(softmax(t/T) || softmax(s/T)) between the dense teacher t and the pruned student s; labels are optional
(with ``label_weight`` > 0, cross-entropy on true labels is added).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .data import labels_of
from .distributed import all_reduce_sums, is_distributed
from .errors import CompressError
from .fold import BATCHNORMS
from .nn_helpers import model_device



@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Iterable[Any], progress: bool = True) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``data`` (cumulative average over
    batches); under torch.distributed the average runs over every rank's batches (see :func:`_pool_across_ranks`)."""
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms:
        return model
    adapter = adapter_for(model)
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for batch in tqdm(data, desc="bn-recal", unit="batch", disable=not progress, leave=False):
            x = adapter.inputs_of(batch)
            seen += len(adapter.forward(model, x))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise CompressError("BatchNorm recalibration got no data", "pass a non-empty calibration set")
    _pool_across_ranks(norms)
    return model


@torch.no_grad()
def _pool_across_ranks(norms: list[nn.Module]) -> None:
    """Each rank's cumulative batch averages of mean and variance, weighted by its batch count and summed over the
    ranks: the averages over all ranks' batches, identical everywhere (no-op in a single process)."""
    if not is_distributed():
        return
    weighted = {}
    for i, m in enumerate(norms):
        batches = m.num_batches_tracked.double()
        weighted[f"{i}.mean"], weighted[f"{i}.var"] = m.running_mean.double() * batches, m.running_var.double() * batches
        weighted[f"{i}.batches"] = batches.reshape(1)
    pooled = all_reduce_sums(weighted)
    for i, m in enumerate(norms):
        batches = pooled[f"{i}.batches"]
        m.running_mean.copy_(pooled[f"{i}.mean"] / batches)
        m.running_var.copy_(pooled[f"{i}.var"] / batches)
        m.num_batches_tracked.fill_(int(batches.item()))


def _data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torch.distributed (the model itself otherwise)."""
    if not is_distributed():
        return model
    device = model_device(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def distill(student: nn.Module, teacher: nn.Module, data: Iterable[Any], *, steps: int = 200, lr: float = 1e-3,
            temperature: float = 2.0, label_weight: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
            progress: bool = True) -> list[float]:
    """Train ``student`` towards ``teacher``'s logits for ``steps`` batches (cycling ``data``); returns the losses.

    Deterministic given ``seed`` and the order of ``data``. The teacher stays frozen in eval mode.
    Under torch.distributed the student trains as a ``DistributedDataParallel`` module: each rank feeds its own
    share of every global batch (``data`` is this rank's, e.g. a :func:`compress.data.loader` with ``shard=True``),
    the gradients are averaged across ranks, and every rank ends with the same weights (BatchNorm layers use each
    rank's batch statistics, as DDP does). The returned losses are this rank's.
    """
    if steps < 1:
        return []
    device = next(student.parameters()).device
    adapter, teacher_adapter = adapter_for(student), adapter_for(teacher)
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    trained = _data_parallel(student)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses: list[float] = []
    batches = itertools.cycle(data) if not isinstance(data, torch.Tensor) else itertools.repeat(data)
    for _ in tqdm(range(steps), desc="distill", unit="step", disable=not progress):
        batch = next(batches)
        x = adapter.inputs_of(batch)
        with torch.no_grad():
            target = F.log_softmax(teacher_adapter.forward(teacher, x) / temperature, dim=1)
        logits = adapter.forward(trained, x)
        loss = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True,
                        reduction="batchmean") * temperature**2
        labels = labels_of(batch)
        if label_weight > 0 and labels is not None:
            loss = loss + label_weight * F.cross_entropy(logits, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    student.eval()
    return losses
