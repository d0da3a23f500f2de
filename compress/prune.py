"""``prune``: dependency-graph channel pruning to a MACs or parameter target, scored by any criterion.

Each step builds a torch-pruning pruner on the current model, scores every prunable group with the criterion
(re-scored between steps; JBR's pseudo-labels m(x) stay frozen from the dense model) and removes the globally
least important channels. The per-step MACs targets follow a geometric schedule from 1 to the target; the
channel ratio of a step is found by bisection so the final MACs (or params) land within ``tolerance`` of the
target: below it when a trial lands there, else the closest trial above it (channel groups are indivisible). The input model is not modified: ``PruneResult.model`` is a pruned copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import CalibrationData, calibration
from .errors import CompressError
from .models import attach_spec, identify, pruning_round_to, sync_after_pruning


@dataclass(frozen=True)
class Target:
    """What to keep, as a fraction of the dense model: ``macs=0.5`` keeps half the multiply-accumulates."""

    macs: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("macs", self.macs), ("params", self.params)) if v is not None}
        if len(given) != 1:
            raise CompressError(f"a Target needs exactly one of macs= or params=, got {sorted(given) or 'none'}",
                                "e.g. Target(macs=0.5)")
        (name, value), = given.items()
        if not 0.0 < value <= 1.0:
            raise CompressError(f"Target({name}={value}) is not a fraction in (0, 1]", f"e.g. Target({name}=0.5)")

    @property
    def metric(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def fraction(self) -> float:
        return float(self.macs if self.macs is not None else self.params)


@dataclass(frozen=True)
class LayerWidth:
    name: str
    before: int
    after: int


@dataclass
class PruneResult:
    """The pruned model and the record of what was done."""

    model: nn.Module
    history: list[tuple[str, bool, list[int]]]
    criterion: str
    target: Target
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[LayerWidth]
    steps: int
    seconds: float
    step_log: list[dict[str, float]] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def summary(self) -> str:
        return (f"{self.criterion}: MACs {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M "
                f"({self.macs_ratio:.3f}), params {self.params_before / 1e3:.1f}k -> {self.params_after / 1e3:.1f}k "
                f"({self.params_ratio:.3f}) in {self.steps} steps, {self.seconds:.1f} s")


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The layer producing the logits (the last Linear, else the last Conv2d): its outputs are never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise CompressError(f"{type(model).__name__} has no Linear or Conv2d layer to prune", "pass a CNN or transformer")
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return linears[-1] if linears else layers[-1]


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _ignored_names(model: nn.Module, ignored: Sequence[nn.Module | str]) -> list[str]:
    """Names of the layers never pruned: the classifier plus the user's (given as modules of ``model`` or names)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = [names[id(classifier_layer(model))]]
    for item in ignored:
        name = item if isinstance(item, str) else names.get(id(item))
        if name not in dict(model.named_modules()):
            raise CompressError(f"ignored layer {item!r} is not in the model", "use names from model.named_modules()")
        out.append(name)
    return out


def _modules_named(model: nn.Module, names: list[str]) -> list[nn.Module]:
    named = dict(model.named_modules())
    return [named[n] for n in names]


def prune(model: nn.Module, data: Iterable[Any], criterion: str = "jbr", target: Target = Target(macs=0.5), *,
          example_inputs: torch.Tensor | None = None, steps: int = 5, tolerance: float = 0.02,
          round_to: int | None = None, ignored_layers: Sequence[nn.Module | str] = (), max_layer_ratio: float = 0.9,
          global_pruning: bool = True, calibration_samples: int = 512, batch_size: int = 64, seed: int = 0,
          criterion_options: dict[str, Any] | None = None, max_bisections: int = 20,
          progress: bool = True) -> PruneResult:
    """Prune a copy of ``model`` with ``criterion`` until ``target`` is met (within ``tolerance`` of it, below when possible).

    ``data``: calibration inputs (any iterable of batches or a dataset; labels ignored unless the criterion
    needs them, e.g. ``jacobian``). ``max_layer_ratio`` caps how much of any one layer a step may remove.
    """
    import torch_pruning as tp

    import criteria

    start = time.perf_counter()
    dense = model
    model = copy.deepcopy(model).eval()
    spec = identify(dense)
    if example_inputs is None:
        if spec is None:
            raise CompressError("cannot infer the input shape of this model", "pass example_inputs=torch.zeros(1, C, H, W)")
        example_inputs = spec.example_input()
    device = next(model.parameters()).device
    example_inputs = example_inputs[:1].to(device)
    labelled = criterion in criteria.NEEDS_LABELS
    if isinstance(data, CalibrationData):
        calib = replace(data, with_labels=labelled)
    else:
        calib = calibration(data, calibration_samples, batch_size, seed, with_labels=labelled)
    importance = criteria.get(criterion, **(criterion_options or {}))
    ignored = _ignored_names(model, ignored_layers)
    metric_index = 0 if target.metric == "macs" else 1
    before = count_macs_params(model, example_inputs)
    widths_before = _widths(model)
    dense_value = before[metric_index]
    history: list[tuple[str, bool, list[int]]] = []
    step_log: list[dict[str, float]] = []
    current = 1.0
    bar = tqdm(total=steps, desc=f"prune[{criterion}]", unit="step", disable=not progress)

    def prune_step(net: nn.Module, channel_ratio: float) -> tuple[nn.Module, float, list]:
        pruner = tp.pruner.BasePruner(net, example_inputs, importance=importance, global_pruning=global_pruning,
                                      pruning_ratio=channel_ratio, max_pruning_ratio=max_layer_ratio,
                                      iterative_steps=1, ignored_layers=_modules_named(net, ignored),
                                      round_to=round_to or pruning_round_to(net))
        criteria.prepare(importance, net, calib)
        pruner.step()
        sync_after_pruning(net)
        value = count_macs_params(net, example_inputs)[metric_index] / dense_value
        return net, value, [tuple(h) for h in pruner.pruning_history()]

    for k in range(1, steps + 1):
        goal = target.fraction ** (k / steps)
        # Bisection on the step's channel ratio (the number of channels removed is monotone in it): accept the
        # first trial in [goal - tolerance, goal]; otherwise keep the closest trial at or below the goal.
        lo, hi = 0.0, 1.0
        guess = min(0.9, max(1e-3, 1.0 - (goal / current) ** 0.5))  # MACs ~ (kept channel fraction)^2
        best = above = None
        for _ in range(max_bisections):
            trial, value, entries = prune_step(copy.deepcopy(model), guess)
            if value <= goal + 1e-12 and (best is None or value > best[1]):
                best = (trial, value, entries, guess)
            elif value > goal + 1e-12 and value < current - 1e-12 and (above is None or value < above[1]):
                above = (trial, value, entries, guess)
            if value > goal + 1e-12:
                lo = guess  # removed too little
            elif value < goal - tolerance:
                hi = guess  # removed too much
            else:
                break
            if hi - lo < 1e-6:
                break
            guess = (lo + hi) / 2
        # Channel groups are indivisible: when one group's removal jumps across the whole window below the goal,
        # the closest trial above the goal is taken if it lies within the tolerance (the target is met within ±tol).
        if above is not None and above[1] <= goal + tolerance and (best is None or best[1] < goal - tolerance):
            best = above
        if best is None:
            raise CompressError(f"no channel ratio brings {target.metric} to {goal:.3f} (every layer is capped at "
                                f"max_layer_ratio={max_layer_ratio} or ignored)",
                                "raise max_layer_ratio or ask for a less aggressive target")
        model, current, entries, ratio = best
        history.extend(entries)
        step_log.append({"step": k, "goal": goal, "reached": current, "channel_ratio": ratio})
        bar.update()
        bar.set_postfix({target.metric: f"{current:.3f}"}, refresh=False)
    bar.close()
    if abs(current - target.fraction) > tolerance:
        raise CompressError(f"pruning reached {target.metric}={current:.3f}: removing one more channel group jumps "
                            f"past the target {target.fraction} by more than {tolerance}",
                            "raise the tolerance, lower round_to, or use more steps")
    after = count_macs_params(model, example_inputs)
    widths_after = _widths(model)
    if spec is not None:
        attach_spec(model, replace(spec, pruning_history=spec.pruning_history + tuple(
            (str(n), bool(o), tuple(int(i) for i in idx)) for n, o, idx in history)))
    layers = [LayerWidth(n, w, widths_after.get(n, 0)) for n, w in widths_before.items()]
    return PruneResult(model, history, criterion, target, before[0], after[0], before[1], after[1], layers,
                       steps, time.perf_counter() - start, step_log)

