"""The two pruning protocols of ``python -m compress.bench pruning``, one run (criterion, normaliser, seed) each.

* ``ours``: :func:`compress.prune` to a MACs target (per-layer cap, secant search, ``steps`` re-scored steps), then
  BatchNorm recalibration, then distillation from the dense model; top-1 after each stage.
* ``paper``: the TPV paper's benchmark (github devansharpit/TPV, ``applications/benchmark_pruning.py``): one
  torch-pruning pruner, global ranking by share of filters, ``PAPER_STEPS`` steps of 5% up to 90%, no per-layer
  cap, only the classifier ignored, no recalibration and no fine-tuning; top-1, MACs and parameters after every
  second step (10%, 20%, ... of the filters removed).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch_pruning as tp
from torch import nn

import criteria

from ..adapters import adapter_for
from ..evaluate import compare
from ..macs import count_macs_params
from ..mean_replacement import input_means, pruner_step
from ..prune import Target, prune
from ..quiet import quiet_third_party
from ..recover import distill, recalibrate_bn

PAPER_STEPS = 18  # 5% of the filters per step
PAPER_RATIO = 0.9  # filters removed after the last step
STAGES = ("pruned", "recal", "distill")


def _measure(row: dict[str, Any], stage: str, model: nn.Module, dense: nn.Module, test: Any) -> None:
    c = compare(model, dense, test)
    row[f"top1_{stage}"], row[f"agreement_{stage}"], row[f"kl_{stage}"] = c.top1, c.agreement, c.kl


def run_ours(row: dict[str, Any], dense: nn.Module, calib: Any, recal: Any, test: Any,
             distill_data: Callable[[], Any] | None, distill_steps: int, steps: int, recalibrate_steps: bool,
             options: dict[str, Any] | None = None) -> None:
    """Prune ``dense`` to ``row["target"]`` MACs and measure after each stage (into ``row``); ``options``: the
    criterion's."""
    start = time.perf_counter()
    r = prune(dense, calib, row["criterion"], Target(macs=row["target"]), steps=steps, normalizer=row["normalizer"],
              mean_replacement=row["mean_replacement"], recalibrate=recalibrate_steps, seed=row["seed"],
              criterion_options=options, progress=False)
    row.update(macs_ratio=r.macs_ratio, params_ratio=r.params_ratio, prune_seconds=time.perf_counter() - start,
               widths={layer.name: layer.after for layer in r.layers})
    _measure(row, "pruned", r.model, dense, test)
    recalibrate_bn(r.model, recal, progress=False)
    _measure(row, "recal", r.model, dense, test)
    if distill_data is not None and distill_steps > 0:
        start = time.perf_counter()
        distill(r.model, dense, distill_data(), steps=distill_steps, seed=row["seed"], progress=False)
        row["distill_seconds"] = time.perf_counter() - start
        _measure(row, "distill", r.model, dense, test)


def run_paper(row: dict[str, Any], dense: nn.Module, calib: Any, test: Any, options: dict[str, Any] | None = None) -> None:
    """Prune a copy of ``dense`` by share of filters in ``PAPER_STEPS`` steps; a curve point every second step."""
    model = copy.deepcopy(dense).eval()
    adapter = adapter_for(model)
    example = adapter.example_inputs(model)
    ignored = adapter.never_pruned(model) + adapter.outside_pruning_scope(model, example)
    importance = criteria.get(row["criterion"], normalizer=row["normalizer"], **(options or {}))
    dense_macs, dense_params = count_macs_params(model, example)
    with adapter.tracing(model), quiet_third_party():
        pruner = tp.pruner.BasePruner(model, example, importance=importance, global_pruning=True,
                                      pruning_ratio=PAPER_RATIO, max_pruning_ratio=1.0, iterative_steps=PAPER_STEPS,
                                      ignored_layers=ignored, round_to=adapter.round_to(model),
                                      unwrapped_parameters=adapter.unwrapped_parameters(model))
    points, start = [], time.perf_counter()
    for step in range(1, PAPER_STEPS + 1):
        criteria.prepare(importance, model, calib, pruner.DG, ignored)
        pruner_step(pruner, input_means(model, calib) if row["mean_replacement"] else None)
        adapter.sync_after_pruning(model)
        if step % 2 == 0:
            macs, params = count_macs_params(model, example)
            c = compare(model, dense, test)
            points.append({"filters_removed": round(PAPER_RATIO * step / PAPER_STEPS, 4), "macs_ratio": macs / dense_macs,
                           "params_ratio": params / dense_params, "top1": c.top1, "agreement": c.agreement})
    row.update(points=points, prune_seconds=time.perf_counter() - start)


def paper_mean_top1(row: dict[str, Any], low: float = 0.1, high: float = 0.7) -> float | None:
    """Mean top-1 of a paper-protocol curve over the filter shares in [low, high] (the paper's claim: 10–70%)."""
    values = [p["top1"] for p in row.get("points", []) if low - 1e-9 <= p["filters_removed"] <= high + 1e-9]
    return sum(values) / len(values) if values else None


def seeded(name: str) -> bool:
    """Whether criterion ``name`` depends on the seed (calibration subset, random draws); the others run once."""
    return criteria.uses_data(name) or name == "random"

