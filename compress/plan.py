"""``plan_bits``: per-layer weight bit-widths that minimise the summed predicted TPV under a budget.

TPV_l(b) ≈ Σ_c σ²_{l,c}(b) · Tr(H_eff)_{l,c} with σ² = Δ²/12 from torchao's own quantizer step ("noise" model)
or the actual rounding error ("error" model). Choosing one b_l per layer to minimise Σ_l TPV_l(b_l) subject to
Σ_l cost_l(b_l) <= budget is a multiple-choice knapsack, solved exactly (compress.knapsack). Baseline
allocators under the same budget: uniform bits, HAWQ-V2 (Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||²), random feasible.
A candidate a layer cannot take on the target device (its quantization backend, compress.backends) is not offered
to it. ``plan_bits`` composes three strategies (compress.planning): a predictor of TPV_l(c) (noise, error, jvp; or
the HAWQ-V2 score), an allocator (exact knapsack, uniform, random) and a cost per budget kind (bits, bytes, BOPs,
latency table).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from .adapters import adapter_for
from .backends import backend_for
from .backends.base import LayerConfig, QuantBackend
from .backends.candidates import FLOAT, FLOAT8, Choice, order, storage_bits
from .data import CalibrationData, calibration
from .distributed import agree
from .errors import CompressError
from .macs import layer_macs
from .nn_helpers import tied_weights
from .planning.allocators import ALLOCATION_STRATEGIES, Allocation
from .planning.costs import CostInputs, make_cost, latency_table_for, restrict_to_timed
from .planning.hawq import hawq_scores
from .planning.predictors import PREDICTORS as PREDICTOR_STRATEGIES, PlanProblem, Scores
from .planning.types import BitPlan, Budget, LayerBits
from .validation import check_calibration, check_finite_weights

Allocator = Literal["tpv", "hawq", "uniform", "random"]
# allocator name -> (allocation strategy, objective: "tpv" the predictor's TPV, "hawq" the HAWQ-V2 score, None)
ALLOCATOR_STRATEGIES: dict[str, tuple[str, str | None]] = {
    "tpv": ("knapsack", "tpv"), "hawq": ("knapsack", "hawq"), "uniform": ("uniform", None), "random": ("random", None)}
ALLOCATORS: tuple[str, ...] = tuple(ALLOCATOR_STRATEGIES)
Predictor = Literal["jvp", "noise", "error"]
PREDICTORS: tuple[str, ...] = tuple(PREDICTOR_STRATEGIES)

__all__ = ["ALLOCATORS", "FLOAT", "FLOAT8", "PREDICTORS", "BitPlan", "Budget", "Choice", "LayerBits", "layer_macs",
           "plan_bits"]


def _target(device: str | torch.device, capability: tuple[int, int] | None) -> tuple[str, tuple[int, int] | None]:
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu", None
    if kind != "cuda":
        raise CompressError(f"plan_bits cannot target device {kind!r}", "use device='cpu' or device='cuda'")
    if capability is None:
        if not torch.cuda.is_available():
            raise CompressError("device='cuda' needs a GPU here, or its compute capability",
                                "pass capability=(major, minor) of the GPU that will run the model")
        capability = torch.cuda.get_device_capability(device)
    return "cuda", tuple(capability)


def _check_names(allocator: str, predictor: str, candidates: Sequence[Choice]) -> None:
    if allocator not in ALLOCATOR_STRATEGIES:
        raise CompressError(f"unknown allocator {allocator!r}", f"use {', '.join(ALLOCATORS)}")
    if predictor not in PREDICTOR_STRATEGIES:
        raise CompressError(f"unknown predictor {predictor!r}", f"use {', '.join(PREDICTORS)}")
    bad = [c for c in candidates if c not in (FLOAT, FLOAT8) and not (isinstance(c, int) and 1 <= c <= 8)]
    if bad or not candidates:
        raise CompressError(f"candidates {list(candidates)} are not bit-widths in 1..8, {FLOAT} or {FLOAT8!r}",
                            "e.g. candidates=(4, 8, 16)")


def _check_float8(candidates: Sequence[Choice], capability: tuple[int, int] | None) -> None:
    if FLOAT8 in candidates and (capability is None or capability < (8, 9)):
        where = "the CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        raise CompressError(f"float8 needs a CUDA GPU of compute capability >= 8.9, the plan targets {where}",
                            "drop 'float8' from candidates, or plan for such a GPU (device='cuda')")


def _layer_options(layers: dict[str, nn.Module], quant: list[Choice], candidates: Sequence[Choice],
                   keep_float: Sequence[str], backend: QuantBackend, group_size: int | None, mapping: str,
                   tied: dict[str, str]):
    """Per layer: the candidates its backend accepts (fewest bits first, FLOAT last when a candidate), the ones it
    refuses and why, the config of each accepted one, and why a layer is fixed in float (none accepted, asked, or
    its weight ``tied`` to another module's)."""
    unknown = [n for n in keep_float if n not in layers]
    if unknown:
        raise CompressError(f"keep_float names unknown layers {unknown}", "use Conv2d/Linear names from model.named_modules()")
    notes: dict[str, str] = {n: "kept in float on request" for n in keep_float}
    notes.update({n: f"its weight is tied to {other}'s (quantizing it would change both): kept in float"
                  for n, other in tied.items() if n not in notes})
    excluded: dict[str, dict[Choice, str]] = {n: {} for n in layers}
    configs: dict[tuple[str, Choice], LayerConfig] = {}
    for n, m in layers.items():
        for c in quant:
            chosen = backend.layer_config(m, c, group_size=group_size, mapping=mapping)
            if chosen.possible:
                configs[n, c] = chosen
            else:
                excluded[n][c] = chosen.reason
        if n not in notes and not any((n, c) in configs for c in quant):
            reasons = list(dict.fromkeys(excluded[n].values()))
            notes[n] = "torchao cannot quantize it: " + "; ".join(reasons)
    options = {n: [FLOAT] if n in notes else [c for c in quant if (n, c) in configs] + [FLOAT] * (FLOAT in candidates)
               for n in layers}
    return notes, excluded, configs, options


def _predicted(problem: PlanProblem, predictor: str) -> Scores:
    """TPV_l(c) for every layer and option (FLOAT: 0), reported for every plan."""
    tpv: Scores = {n: {FLOAT: 0.0} for n in problem.layers}
    if problem.free:
        for n, values in PREDICTOR_STRATEGIES[predictor].predict(problem).items():
            tpv[n].update(values)
    return tpv


def _objective(problem: PlanProblem, allocator: str, tpv: Scores) -> Scores:
    """What the allocator minimises: the predicted TPV, or the HAWQ-V2 score."""
    if ALLOCATOR_STRATEGIES[allocator][1] != "hawq":
        return tpv
    score: Scores = {n: {FLOAT: 0.0} for n in problem.layers}
    if problem.free:
        for n, values in hawq_scores(problem).items():
            score[n].update(values)
    return score


def plan_bits(model: nn.Module, data: Iterable[Any], budget: Budget = Budget(avg_bits=5), *,
              example_inputs: torch.Tensor | None = None, candidates: Sequence[Choice] = (4, 8, FLOAT),
              group_size: int | None = None, mapping: str = "symmetric", allocator: Allocator = "tpv",
              predictor: Predictor = "jvp", calibration_samples: int = 256, batch_size: int = 64,
              probes: int = 4, keep_float: Sequence[str] = (), seed: int = 0, latency_table: Any = None,
              device: str | torch.device = "cpu", capability: tuple[int, int] | None = None) -> BitPlan:
    """Allocate bits per Conv2d/Linear layer under ``budget`` (exact knapsack on the allocator's scores).

    ``candidates``: bit-widths 1..8, 16 for "keep in float", and ``FLOAT8`` ("float8", CUDA sm >= 8.9 only).
    ``device``: where the quantized model will run ("cpu" or "cuda"; ``capability`` = the GPU's compute capability,
    default the local GPU's); it decides which torchao config each layer gets (its backend, compress.backends).
    Candidates a layer cannot take there are reported in ``BitPlan.constrained``; layers left with none (a conv with
    one input channel, a group size that does not divide Cin, ...) and ``keep_float`` names are fixed at float and
    reported in ``BitPlan.kept_float``. ``predictor``: how TPV_l(b) is predicted from the calibration inputs:
    "noise" Σ_p diag(H_eff)_p Δ²/12 (i.i.d. rounding noise), "error" Σ_p diag(H_eff)_p (Q(w)_p − w_p)² (the actual
    rounding error, diagonal H_eff), "jvp" E_x ||J_l(x)(Q(w_l) − w_l)||² (the actual error through the full H_eff
    block of the layer: one Jacobian-vector product per layer and batch; the default, as it planned best in
    BENCHMARKS.md, at 3.5x the time of "noise" on the Fashion-MNIST ResNet and 8.6x on a ResNet-50 on the CPU).
    Float8 TPV always uses the actual error.
    ``Budget(latency=ms)`` uses ``latency_table`` (a :class:`compress.layer_latency.LatencyTable`) or measures one.
    """
    _check_names(allocator, predictor, candidates)
    check_finite_weights(model)
    target, capability = _target(device, capability)
    _check_float8(candidates, capability)
    backend = backend_for(capability)
    quant = sorted({c for c in candidates if c != FLOAT}, key=order)
    adapter = adapter_for(model)
    model = adapter.prepared(model)
    layers = adapter.weight_layers(model)
    notes, excluded, configs, options = _layer_options(layers, quant, candidates, keep_float, backend, group_size,
                                                       mapping, tied_weights(model, layers))
    if example_inputs is None:
        example_inputs = adapter.example_inputs(model)
    macs = layer_macs(model, example_inputs)
    calib = data if isinstance(data, CalibrationData) else calibration(data, calibration_samples, batch_size, seed)
    check_calibration(model, calib, example_inputs)
    problem = PlanProblem(model, calib, layers, [n for n in layers if n not in notes], options, configs, backend,
                          probes, seed)
    tpv = _predicted(problem, predictor)
    score = _objective(problem, allocator, tpv)
    weights = {n: m.weight for n, m in layers.items()}
    if budget.kind == "latency":
        latency_table = latency_table_for(model, example_inputs, budget, quant, latency_table)
        restrict_to_timed(latency_table, options, excluded, notes)

    def size(name: str, choice: Choice) -> float:
        """Bytes at ``choice`` with the group size and zero points the layer's config really uses."""
        return backend.size_bytes(weights[name], choice, configs.get((name, choice)), group_size, budget.scale_bytes)

    cost = make_cost(CostInputs(budget, weights, macs, size, notes), latency_table)
    strategy = ALLOCATION_STRATEGIES[ALLOCATOR_STRATEGIES[allocator][0]]
    names = list(layers)
    chosen = strategy(Allocation(names, options, cost, cost.limit(), score, candidates, budget, seed))
    result = {n: LayerBits(n, storage_bits(chosen[n]), weights[n].numel(), macs.get(n, 0), tpv[n][chosen[n]],
                           size(n, chosen[n]), dict(tpv[n]), notes.get(n, ""), float8=chosen[n] == FLOAT8,
                           excluded=dict(excluded[n]))
              for n in names}
    agree(sorted((n, chosen[n]) for n in names), "the bit plan",
          "give every rank the same model, data size, budget and settings")
    return BitPlan(result, allocator, budget, group_size, mapping, predictor,
                   latency_table if budget.kind == "latency" else None, target, capability)
