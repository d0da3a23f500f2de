"""``prune``: dependency-graph channel pruning to a MACs or parameter target, scored by any criterion.

Each step builds a torch-pruning pruner on the current model, scores every prunable group with the criterion
(re-scored between steps; JBR's pseudo-labels m(x) stay frozen from the dense model) and removes the globally
least important channels. The per-step MACs targets follow a geometric schedule from 1 to the target; the
channel ratio of a step is found by a safeguarded secant search (at most ``max_bisections`` trials) so the
final MACs (or params) land within ``tolerance`` of the target: below it when a trial lands there, else the
closest trial above it (channel groups are indivisible).
``Target(latency=...)`` searches the MACs fraction against onnxruntime measurements (``_prune_to_latency``).
Every criterion's scores are rescaled per group by one normaliser (:mod:`criteria.normalize`) before the global
ranking; ``mean_replacement`` folds removed channels' means into the next layers (:mod:`compress.mean_replacement`);
Hugging Face attention loses whole heads (:mod:`compress.adapters.heads`).
The input model is not modified: ``PruneResult.model`` is a pruned copy. What the model is (its never-pruned
classifier, the channel multiple attention heads need, what to sync after pruning) comes from its adapter.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

import criteria
from criteria.allocated import AllocatedImportance
from criteria.normalize import NormalizedImportance, check_normalizer

from . import latency
from .adapters import ModelAdapter, adapter_for, identify
from .adapters.heads import (HEAD_PREFIX, attention_heads, head_scores, heads_to_remove, lowest_heads, remove_heads,
                             scoring_group)
from .adapters.hidden import (HIDDEN_PREFIX, ResidualStream, check_stream, hidden_to_remove, hidden_width,
                              lowest_channels, remove_hidden, residual_stream)
from .adapters.hidden import scoring_group as hidden_group
from .adapters.spec import attach_spec, user_spec, with_history
from .adapters.split_order import split_outputs_in_order
from .batches import first_rows
from .capped_importance import CappedImportance
from .data import CalibrationData, calibration
from .distributed import agree, on_main
from .errors import CompressError
from .macs import count_macs_params
from .mean_replacement import input_means, pruner_step
from .nn_helpers import on_model
from .quiet import quiet_third_party
from .recover import recalibrate_bn
from .validation import check_calibration, check_finite_weights


@dataclass(frozen=True)
class Target:
    """What to keep, as a fraction of the dense model: ``macs=0.5`` keeps half the multiply-accumulates.

    ``latency=0.5`` keeps half the dense model's onnxruntime CPU latency measured on this machine (fp32 export,
    ``batch_size`` inputs, ``threads`` intra-op threads, median of ``runs``); being a noisy measurement, it is met
    within ``latency_tolerance`` rather than prune's MACs tolerance. ``activations="int8"`` times the pruned model
    as it is deployed for CPU speed (static int8 QDQ, calibrated on the pruning data) against the dense fp32 model:
    ``Target(latency=0.25, activations="int8")`` asks for a pruned + int8 file 4x faster than the dense one.
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    batch_size: int = 1
    threads: int = 2
    runs: int = 20
    latency_tolerance: float = 0.05
    activations: str = "fp32"  # latency targets: the pruned model timed as "fp32" or "int8" (QDQ)

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("macs", self.macs), ("params", self.params), ("latency", self.latency)) if v is not None}
        if len(given) != 1:
            raise CompressError(f"a Target needs exactly one of macs=, params=, latency=, got {sorted(given) or 'none'}",
                                "e.g. Target(macs=0.5)")
        (name, value), = given.items()
        if not 0.0 < value <= 1.0:
            raise CompressError(f"Target({name}={value}) is not a fraction in (0, 1]", f"e.g. Target({name}=0.5)")
        if self.activations not in ("fp32", "int8"):
            raise CompressError(f"Target(activations={self.activations!r}) is neither 'fp32' nor 'int8'",
                                "e.g. Target(latency=0.25, activations='int8')")
        if min(self.batch_size, self.threads, self.runs) < 1 or self.latency_tolerance <= 0:
            raise CompressError("Target's batch_size, threads and runs must be >= 1 and latency_tolerance > 0",
                                "e.g. Target(latency=0.5, batch_size=1, threads=2)")

    @property
    def metric(self) -> str:
        return next(k for k in ("macs", "params", "latency") if getattr(self, k) is not None)

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.metric))


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
    latency_before_ms: float | None = None  # Target(latency=...): measured latency of the dense model,
    latency_after_ms: float | None = None  # of the pruned one,
    latency_log: list[dict[str, float]] = field(default_factory=list)  # and one entry per MACs round of the search
    unfolded_layers: list[str] = field(default_factory=list)  # mean replacement: layers without a bias or BN to fold into

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_before_ms is None or self.latency_after_ms is None:
            return None
        return self.latency_after_ms / self.latency_before_ms

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def summary(self) -> str:
        latency = "" if self.latency_ratio is None else (
            f", latency {self.latency_before_ms:.2f} -> {self.latency_after_ms:.2f} ms ({self.latency_ratio:.3f}, "
            f"onnxruntime batch {self.target.batch_size}, {self.target.threads} threads)")
        return (f"{self.criterion}: MACs {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M "
                f"({self.macs_ratio:.3f}), params {self.params_before / 1e3:.1f}k -> {self.params_after / 1e3:.1f}k "
                f"({self.params_ratio:.3f}){latency} in {self.steps} steps, {self.seconds:.1f} s")


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _ignored_names(model: nn.Module, adapter: ModelAdapter, ignored: Sequence[nn.Module | str],
                   example_inputs: Any) -> list[str]:
    """Names of the layers never pruned: the adapter's (classifier, LM head, layers outside its pruning scope) plus
    the user's (modules or names)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = [names[id(m)] for m in adapter.never_pruned(model) + adapter.outside_pruning_scope(model, example_inputs)]
    for item in ignored:
        name = item if isinstance(item, str) else names.get(id(item))
        if name not in dict(model.named_modules()):
            raise CompressError(f"ignored layer {item!r} is not in the model", "use names from model.named_modules()")
        out.append(name)
    return out


def _modules_named(model: nn.Module, names: list[str]) -> list[nn.Module]:
    named = dict(model.named_modules())
    return [named[n] for n in names]


def _scores_tied(model: nn.Module, example_inputs: torch.Tensor, importance: Any, calib: Any,
                 ignored: list[nn.Module], adapter: ModelAdapter) -> bool:
    """Whether ``importance`` scores every prunable channel of ``model`` equally (torch-pruning then removes none);
    the criterion is prepared on ``model`` first (the trials prepared it on their pruned copies)."""
    criteria.prepare(importance, model, calib, ignored_layers=ignored)
    graph = adapter.dependency_graph(model, example_inputs)
    scores = [importance(g) for g in graph.get_all_groups(ignored_layers=ignored,
                                                           root_module_types=(nn.Conv2d, nn.Linear))]
    values = torch.cat([s.flatten().float() for s in scores if s is not None and s.numel()] or [torch.zeros(0)])
    return values.numel() > 0 and bool(values.max() == values.min())


def criterion_name(criterion: Any) -> str:
    """The name a criterion is reported under: its registered name, or its Importance class name."""
    return criterion if isinstance(criterion, str) else type(criterion).__name__


DEFAULT_STEPS = 5
# "SELECT@ALLOCATE" in one step: each layer keeps exactly ALLOCATE's one-step width. Over several re-scored steps
# ALLOCATE re-ranks only the channels SELECT kept, so the widths drift from its own. One step kept 6 to 13 points
# more top-1 after BN recalibration on the ResNet-20 and ResNet-56 layouts at 0.5 MACs (and on ResNet-56 at 0.3),
# about the same on ResNet-20 at 0.3, and lost at 0.3 on the 77.8k-parameter small_resnet (BENCHMARKS.md, session 15).
COMPOSITE_STEPS = 1


def default_steps(criterion: Any) -> int:
    """The pruning steps :func:`prune` takes for ``criterion`` unless told: :data:`COMPOSITE_STEPS` for a
    ``"SELECT@ALLOCATE"`` name or an :class:`~criteria.allocated.AllocatedImportance`, else :data:`DEFAULT_STEPS`."""
    if isinstance(criterion, str):
        return COMPOSITE_STEPS if criteria.parts(criterion)[1] is not None else DEFAULT_STEPS
    return COMPOSITE_STEPS if isinstance(criterion, AllocatedImportance) else DEFAULT_STEPS


def check_steps(steps: int) -> None:
    """A one-line error for a step count that is not a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CompressError(f"steps={steps!r} is not a positive number of pruning steps",
                            "pass steps=1 or more, or leave it out for the criterion's default")


def make_importance(criterion: Any, options: dict[str, Any] | None,
                    normalizer: str | None = None) -> tp.importance.Importance:
    """The Importance of a registered name (built with ``options``, its scores normalised by ``normalizer``, else
    by the criterion's default) or the user's own Importance object (normalised only when ``normalizer`` is given)."""
    if isinstance(criterion, str):
        return criteria.get(criterion, normalizer=normalizer, **(options or {}))
    if not isinstance(criterion, tp.importance.Importance):
        raise CompressError(f"criterion must be a registered name or a torch-pruning Importance, got "
                            f"{type(criterion).__name__}", f"use one of {', '.join(criteria.names())} or subclass "
                            "torch_pruning.importance.Importance")
    if options:
        raise CompressError("criterion_options apply to a criterion given by name", "configure your Importance object yourself")
    return criterion if normalizer is None else NormalizedImportance(criterion, normalizer)


@dataclass
class _Run:
    """What stays fixed during one pruning run."""

    name: str  # the criterion's reported name
    importance: tp.importance.Importance
    calib: Any
    example: Any  # one sample of the model's inputs (a tensor or named tensors)
    ignored: list[str]
    adapter: ModelAdapter
    metric_index: int  # 0: MACs, 1: params
    dense_value: int
    global_pruning: bool
    max_layer_ratio: float
    round_to: int | None
    tolerance: float
    max_bisections: int
    mean_replacement: bool = False
    prune_heads: bool = True
    head_count: int = 0  # key/value heads the trials of the current step remove
    hidden_count: int = 0  # hidden channels the trials of the current step remove
    hidden_width: int = 0  # the model's hidden size before the current step (0: not pruned)
    input_means: dict[str, torch.Tensor] = field(default_factory=dict)  # of the model the step's trials start from
    unfolded: set[str] = field(default_factory=set)  # layers mean replacement could not fold into (any trial)


def grouped_convs(model: nn.Module) -> list[nn.Module]:
    """Grouped convolutions other than depthwise ones (groups > 1, not in = out = groups). Their output channels
    are not pruned: torch-pruning takes any conv with ``groups == out_channels`` for a depthwise one, so once
    pruning leaves one output channel per group it prunes that conv and its neighbours inconsistently (the model
    breaks, or its history no longer replays). Their input channels are still pruned, the same in every group."""
    return [m for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not m.in_channels == m.out_channels == m.groups]


def _prune_heads(run: _Run, scored: list) -> list[tuple[str, bool, list[int]]]:
    """Remove the step's ``run.head_count`` lowest-scored heads; their history entries."""
    entries = []
    units = {unit.name: unit for unit, _ in scored}
    for name, heads in lowest_heads(scored, run.head_count, run.max_layer_ratio).items():
        remove_heads(units[name], heads)
        entries.append((HEAD_PREFIX + name, True, heads))
    return entries


def _prune_hidden(run: _Run, stream: ResidualStream | None, scores: torch.Tensor | None) -> list:
    """Remove the step's ``run.hidden_count`` lowest-scored hidden channels; their history entry."""
    if stream is None or scores is None or run.hidden_count == 0:
        return []
    channels = lowest_channels(scores, run.hidden_count)
    remove_hidden(stream, channels)
    return [(f"{HIDDEN_PREFIX}{run.hidden_width}", True, channels)]


def _trial(run: _Run, net: nn.Module, channel_ratio: float) -> tuple[nn.Module, float, list]:
    """Prune ``net`` in place by one pruner step at ``channel_ratio`` (and the step's attention heads and hidden
    channels); (net, metric fraction, history entries)."""
    ignored = _modules_named(net, run.ignored) + grouped_convs(net)
    with run.adapter.tracing(net), quiet_third_party():
        pruner = tp.pruner.BasePruner(net, run.example, importance=CappedImportance(run.importance, run.max_layer_ratio),
                                      global_pruning=run.global_pruning,
                                      pruning_ratio=channel_ratio, max_pruning_ratio=run.max_layer_ratio,
                                      iterative_steps=1, ignored_layers=ignored,
                                      round_to=run.round_to or run.adapter.round_to(net),
                                      unwrapped_parameters=run.adapter.unwrapped_parameters(net))
    pruner.DG = run.adapter.pruning_graph(net, split_outputs_in_order(pruner.DG))
    units = attention_heads(net) if run.prune_heads else []
    stream = residual_stream(net, run.example, run.hidden_width) if run.hidden_count else None
    extra_groups = [scoring_group(unit, pruner.DG) for unit in units]
    if stream is not None:
        extra_groups.append(hidden_group(stream, pruner.DG))
    criteria.prepare(run.importance, net, run.calib, pruner.DG, ignored, extra_groups=extra_groups)
    scored = [(unit, s) for unit in units if (s := head_scores(run.importance, unit, pruner.DG)) is not None]
    hidden_scores = run.importance(extra_groups[-1]) if stream is not None else None
    # heads and hidden channels are scored before: the channel step changes the model's structure
    run.unfolded.update(pruner_step(pruner, run.input_means if run.mean_replacement else None))
    entries = ([tuple(h) for h in pruner.pruning_history()] + _prune_heads(run, scored)
               + _prune_hidden(run, stream, hidden_scores))
    run.adapter.sync_after_pruning(net)
    value = count_macs_params(net, run.example)[run.metric_index] / run.dense_value
    return net, value, entries


def _next_guess(lo: tuple[float, float], hi: tuple[float, float], aim: float) -> float:
    """Safeguarded secant step on the channel ratio: interpolate √value (MACs ~ kept channel fraction²) between the
    bracketing trials ``lo`` (ratio, value) and ``hi`` towards ``aim``, kept inside the middle 80% of the bracket
    so the bracket always shrinks."""
    (r_lo, v_lo), (r_hi, v_hi) = lo, hi
    span = v_lo ** 0.5 - v_hi ** 0.5
    t = (v_lo ** 0.5 - aim ** 0.5) / span if span > 0 else 0.5
    return r_lo + (r_hi - r_lo) * min(0.9, max(0.1, t))


def _search_ratio(run: _Run, model: nn.Module, goal: float, current: float) -> tuple | None:
    """Search one step's channel ratio (the number of channels removed is monotone in it) by a safeguarded secant
    aimed at the middle of the window [goal - tolerance, goal]: the first trial inside it; otherwise the closest
    trial at or below the goal. Channel groups are indivisible: when one group's removal jumps across the whole
    window below the goal, the closest trial above the goal is taken if it lies within the tolerance. Returns
    (model, value, entries, ratio), or None when nothing fits."""
    aim = max(goal - run.tolerance / 2, 1e-9)
    lo, hi = (0.0, current), (1.0, 0.0)  # (channel ratio, value): ratio 0 removes nothing; 1 at most everything
    guess = _next_guess(lo, hi, aim)
    best = above = None
    for _ in range(run.max_bisections):
        trial, value, entries = _trial(run, copy.deepcopy(model), guess)
        if value > goal + 1e-12:
            if value < current - 1e-12 and (above is None or value < above[1]):
                above = (trial, value, entries, guess)
            lo = (guess, value)  # removed too little
        else:
            if best is None or value > best[1]:
                best = (trial, value, entries, guess)
            if value >= goal - run.tolerance:
                break
            hi = (guess, value)  # removed too much
        if hi[0] - lo[0] < 1e-6:
            break
        guess = _next_guess(lo, hi, aim)
    if above is not None and above[1] <= goal + run.tolerance and (best is None or best[1] < goal - run.tolerance):
        best = above
    if best is None and above is None and _scores_tied(model, run.example, run.importance, run.calib,
                                                      _modules_named(model, run.ignored), run.adapter):
        raise CompressError(f"criterion {run.name!r} gives every prunable channel the same score, so no channel can "
                            "be ranked (all 0 when the output ignores them, e.g. torchvision ViT's zero-initialised head before "
                            "training)", "prune a trained model, or use a weight-based criterion such as l1")
    return best


def _calibration(data: Iterable[Any], criterion: Any, samples: int, batch_size: int, seed: int) -> CalibrationData:
    """The calibration batches, with labels only for criteria that need them."""
    labelled = isinstance(criterion, str) and criteria.needs_labels(criterion)
    if isinstance(data, CalibrationData):
        return replace(data, with_labels=labelled)
    return calibration(data, samples, batch_size, seed, with_labels=labelled)


# channels chosen by jbr-centred, how many per layer by BatchNorm scale (jbr-centred alone where a layer has no
# BatchNorm): the best after BN recalibration on the ResNet-20 and ResNet-56 layouts, BENCHMARKS.md (issue 14)
DEFAULT_CRITERION = "jbr-centred@bn"


def prune(model: nn.Module, data: Iterable[Any], criterion: Any = DEFAULT_CRITERION, target: Target = Target(macs=0.5), *,
          example_inputs: torch.Tensor | None = None, steps: int | None = None, tolerance: float = 0.02,
          round_to: int | None = None, ignored_layers: Sequence[nn.Module | str] = (), max_layer_ratio: float = 0.9,
          global_pruning: bool = True, calibration_samples: int = 512, batch_size: int = 64, seed: int = 0,
          criterion_options: dict[str, Any] | None = None, normalizer: str | None = None, max_bisections: int = 20,
          recalibrate: bool = False, mean_replacement: bool = False, prune_heads: bool = True,
          prune_hidden: float = 0.0, progress: bool = True) -> PruneResult:
    """Prune a copy of ``model`` with ``criterion`` until ``target`` is met (within ``tolerance``, below if possible).

    ``criterion``: a registered name (``criteria.names()``), ``"SELECT@ALLOCATE"`` (channels chosen by SELECT, how
    many per layer by ALLOCATE) or any torch-pruning ``Importance`` object (a
    :class:`criteria.calibrated.CalibratedImportance` gets the calibration data before each step). Default
    ``jbr-centred@bn``: within each layer the channels whose replacement by their mean (what BatchNorm
    recalibration recovers) costs least TPV, as many per layer as BatchNorm scales would remove (jbr-centred's own
    allocation in layers without BatchNorm).
    ``steps``: prune in this many re-scored steps (the MACs or params goal shrinking geometrically); default
    :func:`default_steps` (one for a ``SELECT@ALLOCATE`` criterion, five otherwise).
    ``data``: calibration inputs (any iterable of batches or a dataset; labels ignored unless the criterion
    needs them, e.g. ``jacobian``). ``max_layer_ratio`` caps how much of any one layer a step may remove.
    ``normalizer``: how each group's scores are rescaled before the global ranking (``criteria.NORMALIZERS``;
    default: the criterion's, ``criteria.default_normalizer(name)``; an Importance object is left as it is).
    ``recalibrate``: re-estimate BatchNorm statistics on the calibration inputs after every step but the last, so
    the next step scores channels around the point recovery will start from (label-free; the returned model's
    BN statistics are those of the step before the last).
    ``mean_replacement``: fold each removed channel's mean input (over the calibration data) into the next layers'
    biases (:mod:`compress.mean_replacement`), so the pruned model keeps every layer's mean output.
    ``prune_heads``: in Hugging Face transformers, also remove whole attention heads (with grouped-query attention,
    a key/value head and its query heads; :mod:`compress.adapters.heads`): each step removes the lowest-scored
    heads over all layers until the share 1 − goal of the dense heads is gone, then searches the channel ratio.
    ``prune_hidden``: in Hugging Face transformers, the share of the hidden size (the residual stream) to remove,
    evenly over the steps, the lowest-scored channels first (:mod:`compress.adapters.hidden`); 0 keeps it.
    """
    steps = default_steps(criterion) if steps is None else steps
    check_steps(steps)
    if not 0.0 <= prune_hidden < 1.0:
        raise CompressError(f"prune_hidden={prune_hidden} is not a share of the hidden size in [0, 1)",
                            "pass e.g. prune_hidden=0.25 to remove a quarter of the hidden channels")
    if target.metric == "latency":
        return _prune_to_latency(model, data, criterion, target, example_inputs=example_inputs, steps=steps,
                                 tolerance=tolerance, round_to=round_to, ignored_layers=ignored_layers,
                                 max_layer_ratio=max_layer_ratio, global_pruning=global_pruning,
                                 calibration_samples=calibration_samples, batch_size=batch_size, seed=seed,
                                 criterion_options=criterion_options, normalizer=normalizer,
                                 max_bisections=max_bisections, recalibrate=recalibrate,
                                 mean_replacement=mean_replacement, prune_heads=prune_heads,
                                 prune_hidden=prune_hidden, progress=progress)
    start = time.perf_counter()
    if normalizer is not None:
        check_normalizer(normalizer)
    check_finite_weights(model)
    dense = model
    spec = identify(dense)
    adapter = adapter_for(dense)
    model = adapter.prepared(dense)  # a copy already when the adapter replaces layers (GPT-2's Conv1D)
    model = (copy.deepcopy(model) if model is dense else model).eval()
    example = on_model(first_rows(adapter.example_inputs(dense) if example_inputs is None else example_inputs, 1), model)
    name = criterion_name(criterion)
    calib = _calibration(data, criterion, calibration_samples, batch_size, seed)
    check_calibration(model, calib, example)
    before = count_macs_params(model, example)
    metric_index = 0 if target.metric == "macs" else 1
    run = _Run(name, make_importance(criterion, criterion_options, normalizer), calib, example,
               _ignored_names(model, adapter, ignored_layers, example), adapter, metric_index, before[metric_index],
               global_pruning, max_layer_ratio, round_to, tolerance, max_bisections, mean_replacement, prune_heads)
    widths_before = _widths(model)
    dense_heads = sum(u.kv_heads for u in attention_heads(model)) if prune_heads else 0
    dense_width = hidden_width(model) if prune_hidden else None
    if prune_hidden and dense_width is None:
        raise CompressError(f"prune_hidden needs a transformers model with a hidden size; {type(model).__name__} has none",
                            "leave prune_hidden at 0 for this model")
    if dense_width:
        check_stream(residual_stream(model, example, dense_width), model)
    history: list[tuple[str, bool, list[int]]] = []
    step_log: list[dict[str, float]] = []
    current = 1.0
    bar = tqdm(total=steps, desc=f"prune[{name}]", unit="step", disable=not progress)
    for k in range(1, steps + 1 if target.fraction < 1.0 else 1):  # a target of 1.0 means "no pruning"
        goal = target.fraction ** (k / steps)
        if prune_heads:
            run.head_count = heads_to_remove(dense_heads, sum(u.kv_heads for u in attention_heads(model)), goal)
        if dense_width:
            run.hidden_width = dense_width - sum(len(c) for n, _, c in history if n.startswith(HIDDEN_PREFIX))
            run.hidden_count = hidden_to_remove(dense_width, run.hidden_width, prune_hidden * k / steps, round_to)
        if mean_replacement:
            run.input_means = input_means(model, calib)
        best = _search_ratio(run, model, goal, current)
        if best is None:
            raise CompressError(f"no channel ratio brings {target.metric} to {goal:.3f} (every layer is capped at "
                                f"max_layer_ratio={max_layer_ratio} or ignored)",
                                "raise max_layer_ratio or ask for a less aggressive target")
        model, current, entries, ratio = best
        agree(entries, f"the channels pruned at step {k}",
              "give every rank the same model, criterion, target and settings")
        if recalibrate and k < steps:
            recalibrate_bn(model, calib, progress=False)
        history.extend(entries)
        step_log.append({"step": k, "goal": goal, "reached": current, "channel_ratio": ratio})
        bar.update()
        bar.set_postfix({target.metric: f"{current:.3f}"}, refresh=False)
    bar.close()
    if abs(current - target.fraction) > tolerance:
        raise CompressError(f"pruning reached {target.metric}={current:.3f}: removing one more channel group jumps "
                            f"past the target {target.fraction} by more than {tolerance}",
                            "raise the tolerance, lower round_to, or use more steps")
    after = count_macs_params(model, example)
    widths_after = _widths(model)
    shape = tuple(int(s) for s in example.shape[1:]) if isinstance(example, torch.Tensor) else ()
    if spec is None:  # a user's own class: record what compress.load(path, model=Fresh()) replays
        spec = user_spec(dense, shape, adapter.name)
    elif spec.is_user and not spec.input_shape:
        spec = replace(spec, input_shape=shape)
    attach_spec(model, with_history(spec, history))
    layers = [LayerWidth(n, w, widths_after.get(n, 0)) for n, w in widths_before.items()]
    return PruneResult(model, history, name, target, before[0], after[0], before[1], after[1], layers,
                       len(step_log), time.perf_counter() - start, step_log, unfolded_layers=sorted(run.unfolded))


LATENCY_ROUNDS = 4  # MACs fractions tried by the latency search


def _prune_to_latency(model: nn.Module, data: Iterable[Any], criterion: Any, target: Target, *,
                      example_inputs: torch.Tensor | None, **options: Any) -> PruneResult:
    """Prune to a measured latency fraction: latency is not a function torch-pruning can bisect cheaply (an export
    and ~20 timed runs per trial, and noisy), so this searches on the MACs fraction m instead. Start from
    m = target; after pruning the dense model to m and measuring the latency ratio ρ(m), correct
    m ← m · target / ρ(m) (latency ∝ MACs locally), at most ``LATENCY_ROUNDS`` times. The pruned model whose ρ is
    within ``target.latency_tolerance`` of the target (else the closest one at or below it) is returned."""
    start = time.perf_counter()
    if example_inputs is None:
        example_inputs = adapter_for(model).example_inputs(model, device="cpu")

    int8 = {}
    if target.activations == "int8":  # the deployed CPU-speed file: int8 QDQ calibrated on (some of) the pruning data
        int8 = {"activations": "int8", "calibration_data": calibration(data, 64, 16, options.get("seed", 0))}

    def measure(net: nn.Module, **export: Any) -> float:  # on rank 0, sent to all: every rank takes the same path
        return on_main(lambda: latency.onnx_latency_ms(net, example_inputs, batch_size=target.batch_size,
                                                       runs=target.runs, threads=target.threads, **export))

    dense_ms = measure(model)
    goal, tol = target.fraction, target.latency_tolerance
    macs, log, best = goal, [], None
    for _ in range(LATENCY_ROUNDS):
        result = prune(model, data, criterion, Target(macs=macs), example_inputs=example_inputs, **options)
        ratio = measure(result.model, **int8) / dense_ms
        log.append({"macs_goal": macs, "macs_ratio": result.macs_ratio, "latency_ratio": ratio})
        if ratio <= goal + tol and (best is None or abs(ratio - goal) < abs(best[1] - goal)):
            best = (result, ratio)
        if abs(ratio - goal) <= tol:
            break
        new_macs = min(1.0, max(0.02, macs * goal / ratio))
        if abs(new_macs - macs) < 1e-3:
            break
        macs = new_macs
    if best is None:
        closest = min(log, key=lambda e: e["latency_ratio"])
        raise CompressError(f"latency did not drop to {goal} of dense ({dense_ms:.3f} ms): best {closest['latency_ratio']:.3f} "
                            f"at MACs {closest['macs_ratio']:.3f}; at this batch size the model is overhead-bound",
                            "ask for a larger latency fraction or batch_size, round_to=8 for fast widths, or a MACs target")
    result, ratio = best
    return replace(result, target=target, latency_before_ms=dense_ms, latency_after_ms=ratio * dense_ms,
                   latency_log=log, seconds=time.perf_counter() - start)
