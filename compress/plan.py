"""``plan_bits``: per-layer weight bit-widths that minimise the summed predicted TPV under a budget.

TPV_l(b) ≈ Σ_c σ²_{l,c}(b) · Tr(H_eff)_{l,c} with σ² = Δ²/12 from torchao's own quantizer step ("noise" model)
or the actual rounding error ("error" model). Choosing one b_l per layer to minimise Σ_l TPV_l(b_l) subject to
Σ_l cost_l(b_l) <= budget is a multiple-choice knapsack, solved exactly (compress.knapsack). Baseline
allocators under the same budget: uniform bits, HAWQ-V2 (Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||²), random feasible.
"""

from __future__ import annotations

import random as _random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from .data import CalibrationData, calibration
from .errors import CompressError
from .knapsack import solve_mckp

FLOAT = 16  # the bit-width that means "not quantized" (kept in float; counted as 16-bit storage)
Allocator = Literal["tpv", "hawq", "uniform", "random"]


@dataclass(frozen=True)
class Budget:
    """One limit on the quantized weights: average bits per weight, total bytes, or bit-operations (BOPs).

    ``avg_bits`` averages over the weights the plan may choose for (layers fixed in float, e.g. ones torchao
    cannot quantize, are excluded and reported); bytes count packed weights plus one scale per block
    (``scale_bytes`` each) over all Conv2d/Linear weights; BOPs = Σ_l MACs_l · b_l · ``activation_bits``;
    ``latency`` (ms) = Σ_l t_l(b_l) from a per-layer onnxruntime table of the int8 QDQ file
    (:mod:`compress.layer_latency`, ``batch_size`` inputs, ``threads`` threads).
    """

    avg_bits: float | None = None
    bytes: float | None = None
    bops: float | None = None
    latency: float | None = None  # ms of the int8 QDQ file, from a per-layer table (compress.layer_latency)
    activation_bits: int = 8
    scale_bytes: int = 2
    batch_size: int = 1  # latency: batch size and onnxruntime threads of the measurement
    threads: int = 2

    def __post_init__(self) -> None:
        given = [k for k in ("avg_bits", "bytes", "bops", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise CompressError(f"a Budget needs exactly one of avg_bits=, bytes=, bops=, latency=, got {given or 'none'}",
                                "e.g. Budget(avg_bits=5)")
        if getattr(self, given[0]) <= 0:
            raise CompressError(f"Budget({given[0]}={getattr(self, given[0])}) must be positive", "e.g. Budget(avg_bits=5)")

    @property
    def kind(self) -> str:
        return next(k for k in ("avg_bits", "bytes", "bops", "latency") if getattr(self, k) is not None)


@dataclass(frozen=True)
class LayerBits:
    name: str
    bits: int  # FLOAT (16) = kept in float
    numel: int
    macs: int
    predicted_tpv: float
    size_bytes: float
    options: dict[int, float] = field(default_factory=dict)  # candidate bits -> predicted TPV
    note: str = ""  # why a layer was constrained or kept in float


@dataclass(frozen=True)
class BitPlan:
    """Per-layer bits with predicted TPV and size; ``kept_float`` names layers left unquantized and why."""

    layers: dict[str, LayerBits]
    allocator: str
    budget: Budget
    group_size: int | None
    mapping: str
    predictor: str
    latency_table: Any = None  # the LatencyTable of a latency budget

    @property
    def predicted_latency_ms(self) -> float | None:
        """Σ_l t_l(b_l) from the latency table (int8 QDQ file), when the plan was made under a latency budget."""
        return None if self.latency_table is None else self.latency_table.total(self.bits)

    @property
    def bits(self) -> dict[str, int]:
        return {n: l.bits for n, l in self.layers.items()}

    @property
    def predicted_tpv(self) -> float:
        return sum(l.predicted_tpv for l in self.layers.values())

    @property
    def size_bytes(self) -> float:
        return sum(l.size_bytes for l in self.layers.values())

    @property
    def avg_bits(self) -> float:
        """Average bits per weight over the layers the plan chose for (not those fixed in float)."""
        free = [l for l in self.layers.values() if not l.note] or list(self.layers.values())
        return sum(l.bits * l.numel for l in free) / sum(l.numel for l in free)

    @property
    def avg_bits_all(self) -> float:
        """Average bits per weight over every Conv2d/Linear weight, float layers counted at 16."""
        return sum(l.bits * l.numel for l in self.layers.values()) / sum(l.numel for l in self.layers.values())

    @property
    def bops(self) -> float:
        return sum(l.macs * l.bits * self.budget.activation_bits for l in self.layers.values())

    @property
    def kept_float(self) -> dict[str, str]:
        return {n: l.note or "the allocation kept it in float" for n, l in self.layers.items() if l.bits == FLOAT}

    def to_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator, "budget": asdict(self.budget), "group_size": self.group_size,
                "mapping": self.mapping, "predictor": self.predictor, "predicted_tpv": self.predicted_tpv,
                "predicted_latency_ms": self.predicted_latency_ms,
                "size_bytes": self.size_bytes, "avg_bits": self.avg_bits, "avg_bits_all": self.avg_bits_all,
                "layers": {n: {"bits": l.bits, "numel": l.numel, "macs": l.macs, "predicted_tpv": l.predicted_tpv,
                               "size_bytes": l.size_bytes, "note": l.note} for n, l in self.layers.items()}}

    def summary(self) -> str:
        return (f"{self.allocator} plan: avg {self.avg_bits:.2f} bits, {self.size_bytes / 1024:.1f} KiB, predicted TPV "
                f"{self.predicted_tpv:.4g}; float: {', '.join(self.kept_float) or 'none'}")


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """MACs per Conv2d/Linear layer for one sample: output elements × (Cin/groups · kh · kw) or in_features."""
    from criteria.tpv import eval_mode, weight_layers

    macs: dict[str, int] = {}
    hooks = []
    for name, m in weight_layers(model).items():
        def hook(mod, inp, out, name=name):
            per_output = (mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                          if isinstance(mod, nn.Conv2d) else mod.in_features)
            macs[name] = int(out[:1].numel() * per_output)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def _size_bytes(weight: torch.Tensor, bits: int, group_size: int | None, scale_bytes: int) -> float:
    if bits == FLOAT:
        return weight.numel() * FLOAT / 8
    block = weight.shape[1] if group_size is None else group_size
    return weight.numel() * bits / 8 + weight.numel() / block * scale_bytes


def plan_bits(model: nn.Module, data: Iterable[Any], budget: Budget = Budget(avg_bits=5), *,
              example_inputs: torch.Tensor | None = None, candidates: Sequence[int] = (4, 8, FLOAT),
              group_size: int | None = None, mapping: str = "symmetric", allocator: Allocator = "tpv",
              predictor: Literal["noise", "error"] = "noise", calibration_samples: int = 256, batch_size: int = 64,
              probes: int = 4, keep_float: Sequence[str] = (), seed: int = 0, latency_table: Any = None) -> BitPlan:
    """Allocate bits per Conv2d/Linear layer under ``budget`` (exact knapsack on the allocator's scores).

    ``candidates``: bit-widths 1..8 plus 16 for "keep in float". Layers torchao cannot quantize (a conv with one
    input channel, depthwise convs, a group size that does not divide Cin) and ``keep_float`` names are fixed at
    float and reported in ``BitPlan.kept_float``. ``Budget(latency=ms)`` uses ``latency_table`` (a
    :class:`compress.layer_latency.LatencyTable`) or measures one on this machine.
    """
    from criteria.qnoise import QuantSpec, hawq_traces, hawq_v2, predicted_tpv, quantization_problems
    from criteria.tpv import hutchinson_diag, weight_layers

    from .models import spec_of

    if allocator not in ("tpv", "hawq", "uniform", "random"):
        raise CompressError(f"unknown allocator {allocator!r}", "use tpv, hawq, uniform or random")
    bad = [b for b in candidates if b != FLOAT and not 1 <= b <= 8]
    if bad or not candidates:
        raise CompressError(f"candidate bit-widths {list(candidates)} are not in 1..8 or {FLOAT}", "e.g. candidates=(4, 8, 16)")
    quant_bits = sorted({b for b in candidates if b != FLOAT})
    specs = {b: QuantSpec(bits=b, group_size=group_size, mapping=mapping) for b in quant_bits}
    layers = weight_layers(model)
    unknown = [n for n in keep_float if n not in layers]
    if unknown:
        raise CompressError(f"keep_float names unknown layers {unknown}", "use Conv2d/Linear names from model.named_modules()")
    notes: dict[str, str] = {n: "kept in float on request" for n in keep_float}
    for b, spec in specs.items():
        for name, reason in quantization_problems(model, spec):
            notes.setdefault(name, f"torchao cannot quantize it: {reason}")
    free = [n for n in layers if n not in notes]
    if example_inputs is None:
        spec = spec_of(model)
        if spec is None:
            raise CompressError("cannot infer the input shape of this model", "pass example_inputs=torch.zeros(1, C, H, W)")
        example_inputs = spec.example_input(device=next(model.parameters()).device)
    macs = layer_macs(model, example_inputs)
    calib = data if isinstance(data, CalibrationData) else calibration(data, calibration_samples, batch_size, seed)
    tpv: dict[str, dict[int, float]] = {n: {FLOAT: 0.0} for n in layers}  # predicted TPV, reported for every plan
    score = tpv  # what the knapsack minimises
    if free:
        pnames = [f"{n}.weight" for n in free]
        diag = hutchinson_diag(model, calib, params=pnames, estimator="batched", probes=probes, seed=seed)
        for b, spec in specs.items():
            for p, v in predicted_tpv(model, diag, spec, predictor).items():
                tpv[p[: -len(".weight")]][b] = float(v.sum())
        if allocator == "hawq":
            traces = hawq_traces(model, calib, params=pnames, probes=probes, seed=seed)
            score = {n: {FLOAT: 0.0} for n in layers}
            for b, spec in specs.items():
                for p, v in hawq_v2(model, traces, spec).items():
                    score[p[: -len(".weight")]][b] = v
    options = {n: ([FLOAT] if n in notes else sorted(set(quant_bits) | ({FLOAT} & set(candidates)))) for n in layers}
    weights = {n: m.weight for n, m in layers.items()}
    if budget.kind == "latency":
        from .layer_latency import layer_latency_table

        if latency_table is None:
            latency_table = layer_latency_table(model, example_inputs, sorted({*quant_bits, FLOAT}),
                                                batch_size=budget.batch_size, threads=budget.threads)
        missing = [n for n in layers if FLOAT not in latency_table.ms.get(n, {})]
        if missing:
            raise CompressError(f"the latency table has no float entry for layers {missing[:5]}",
                                "measure the table on this model (compress.layer_latency.layer_latency_table)")
        for n in layers:
            timed = [b for b in options[n] if b in latency_table.ms[n]]
            if len(timed) < len(options[n]):
                notes.setdefault(n, latency_table.notes.get(n, "no latency measured at the candidate bits"))
            options[n] = timed or [FLOAT]

    def cost(name: str, bits: int) -> float:
        w = weights[name]
        if budget.kind == "avg_bits":
            return 0.0 if name in notes else float(w.numel() * bits)
        if budget.kind == "bytes":
            return _size_bytes(w, bits, group_size, budget.scale_bytes)
        if budget.kind == "latency":
            return latency_table.ms[name][bits]
        return float(macs.get(name, 0) * bits * budget.activation_bits)

    limit = {"avg_bits": (budget.avg_bits or 0) * sum(w.numel() for n, w in weights.items() if n not in notes),
             "bytes": budget.bytes, "bops": budget.bops, "latency": budget.latency}[budget.kind]
    names = list(layers)
    if allocator in ("tpv", "hawq"):
        pick = solve_mckp([[cost(n, b) for b in options[n]] for n in names],
                          [[score[n][b] for b in options[n]] for n in names], float(limit))
        chosen = {n: options[n][j] for n, j in zip(names, pick)}
    elif allocator == "uniform":
        chosen = None
        for b in sorted(set(quant_bits) | ({FLOAT} & set(candidates)), reverse=True):
            trial = {n: (FLOAT if n in notes else b) for n in names}
            if sum(cost(n, trial[n]) for n in names) <= limit * (1 + 1e-9):
                chosen = trial
                break
        if chosen is None:
            raise CompressError(f"no uniform bit-width among {list(candidates)} fits {budget}", "raise the budget or allow fewer bits")
    else:
        rng = _random.Random(seed)
        chosen = {n: rng.choice(options[n]) for n in names}
        while sum(cost(n, chosen[n]) for n in names) > limit * (1 + 1e-9):
            lowerable = [n for n in names if options[n].index(chosen[n]) > 0]
            if not lowerable:
                raise CompressError(f"no plan fits {budget}", "raise the budget or allow fewer bits")
            n = rng.choice(lowerable)
            chosen[n] = options[n][options[n].index(chosen[n]) - 1]
    result = {}
    for n in names:
        b = chosen[n]
        result[n] = LayerBits(n, b, weights[n].numel(), macs.get(n, 0), tpv[n][b],
                              _size_bytes(weights[n], b, group_size, budget.scale_bytes), dict(tpv[n]), notes.get(n, ""))
    return BitPlan(result, allocator, budget, group_size, mapping, predictor,
                   latency_table if budget.kind == "latency" else None)
