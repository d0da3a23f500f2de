"""``plan_bits``: per-layer weight bit-widths that minimise the summed predicted TPV under a budget.

TPV_l(b) ≈ Σ_c σ²_{l,c}(b) · Tr(H_eff)_{l,c} with σ² = Δ²/12 from torchao's own quantizer step ("noise" model)
or the actual rounding error ("error" model). Choosing one b_l per layer to minimise Σ_l TPV_l(b_l) subject to
Σ_l cost_l(b_l) <= budget is a multiple-choice knapsack, solved exactly (compress.knapsack). Baseline
allocators under the same budget: uniform bits, HAWQ-V2 (Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||²), random feasible.
A candidate a layer cannot take on the target device (compress.quantize.layer_config) is not offered to it.
"""

from __future__ import annotations

import random as _random
import typing
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Sequence, Union

import torch
from torch import nn

from .data import CalibrationData, calibration
from .errors import CompressError
from .fold import fold_batchnorm
from .knapsack import solve_mckp

FLOAT = 16  # the bit-width that means "not quantized" (kept in float; counted as 16-bit storage)
FLOAT8 = "float8"  # candidate: float8 e4m3 weights and dynamic activations (CUDA, sm >= 8.9); 8-bit storage
Choice = Union[int, str]  # a candidate: bits 1..8, FLOAT or FLOAT8
Allocator = Literal["tpv", "hawq", "uniform", "random"]
ALLOCATORS: tuple[str, ...] = typing.get_args(Allocator)
Predictor = Literal["jvp", "noise", "error"]
PREDICTORS: tuple[str, ...] = typing.get_args(Predictor)


@dataclass(frozen=True)
class Budget:
    """One limit on the quantized weights: average bits per weight, total bytes, or bit-operations (BOPs).

    ``avg_bits`` averages over the weights the plan may choose for (layers fixed in float, e.g. ones torchao
    cannot quantize, are excluded and reported); bytes count packed weights plus one scale per block
    (``scale_bytes`` each) and, for asymmetric quantizers, one zero point per block (as the config stores it) over all
    Conv2d/Linear weights; BOPs = Σ_l MACs_l · b_l · ``activation_bits``;
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
    bits: int  # FLOAT (16) = kept in float; 8 for float8
    numel: int
    macs: int
    predicted_tpv: float
    size_bytes: float
    options: dict[Choice, float] = field(default_factory=dict)  # candidate -> predicted TPV
    note: str = ""  # why the layer is fixed in float (no candidate possible, or asked)
    float8: bool = False  # the choice is FLOAT8 (bits == 8)
    excluded: dict[Choice, str] = field(default_factory=dict)  # candidates this layer cannot take, and why

    @property
    def choice(self) -> Choice:
        return FLOAT8 if self.float8 else self.bits


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
    device: str = "cpu"  # where the quantized model runs (decides which candidates each layer can take)
    capability: tuple[int, int] | None = None  # CUDA compute capability the plan was made for

    @property
    def predicted_latency_ms(self) -> float | None:
        """Σ_l t_l(b_l) from the latency table (int8 QDQ file), when the plan was made under a latency budget."""
        return None if self.latency_table is None else self.latency_table.total(self.bits)

    @property
    def bits(self) -> dict[str, int]:
        return {n: l.bits for n, l in self.layers.items()}

    @property
    def choices(self) -> dict[str, Choice]:
        """Per-layer choice: bits, FLOAT or FLOAT8."""
        return {n: l.choice for n, l in self.layers.items()}

    @property
    def constrained(self) -> dict[str, dict[Choice, str]]:
        """Layers that could not take some candidates on the target device, with each candidate's reason."""
        return {n: dict(l.excluded) for n, l in self.layers.items() if l.excluded}

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
                "predicted_latency_ms": self.predicted_latency_ms, "device": self.device,
                "capability": list(self.capability) if self.capability else None,
                "size_bytes": self.size_bytes, "avg_bits": self.avg_bits, "avg_bits_all": self.avg_bits_all,
                "layers": {n: {"bits": l.bits, "float8": l.float8, "numel": l.numel, "macs": l.macs,
                               "predicted_tpv": l.predicted_tpv, "size_bytes": l.size_bytes, "note": l.note,
                               "excluded": {str(c): r for c, r in l.excluded.items()}}
                           for n, l in self.layers.items()}}

    def summary(self) -> str:
        float8 = [n for n, l in self.layers.items() if l.float8]
        return (f"{self.allocator} plan: avg {self.avg_bits:.2f} bits, {self.size_bytes / 1024:.1f} KiB, predicted TPV "
                f"{self.predicted_tpv:.4g}; float: {', '.join(self.kept_float) or 'none'}"
                + (f"; float8: {', '.join(float8)}" if float8 else ""))


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


def _size_bytes(weight: torch.Tensor, bits: int, group_size: int | None, scale_bytes: float,
                zero_point_bytes: float = 0.0) -> float:
    """Packed weights plus, per block of ``group_size`` (default: a row of the weight), a scale and a zero point."""
    if bits == FLOAT:
        return weight.numel() * FLOAT / 8
    block = weight.shape[1] if group_size is None else group_size
    return weight.numel() * bits / 8 + weight.numel() / block * (scale_bytes + zero_point_bytes)


def _order(choice: Choice) -> tuple[int, int]:
    """Candidates from fewest to most bits; float8 after int8."""
    return (8, 1) if choice == FLOAT8 else (int(choice), 0)


def _storage_bits(choice: Choice) -> int:
    return 8 if choice == FLOAT8 else int(choice)


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


def plan_bits(model: nn.Module, data: Iterable[Any], budget: Budget = Budget(avg_bits=5), *,
              example_inputs: torch.Tensor | None = None, candidates: Sequence[Choice] = (4, 8, FLOAT),
              group_size: int | None = None, mapping: str = "symmetric", allocator: Allocator = "tpv",
              predictor: Predictor = "jvp", calibration_samples: int = 256, batch_size: int = 64,
              probes: int = 4, keep_float: Sequence[str] = (), seed: int = 0, latency_table: Any = None,
              device: str | torch.device = "cpu", capability: tuple[int, int] | None = None) -> BitPlan:
    """Allocate bits per Conv2d/Linear layer under ``budget`` (exact knapsack on the allocator's scores).

    ``candidates``: bit-widths 1..8, 16 for "keep in float", and ``FLOAT8`` ("float8", CUDA sm >= 8.9 only).
    ``device``: where the quantized model will run ("cpu" or "cuda"; ``capability`` = the GPU's compute capability,
    default the local GPU's); it decides which torchao config each layer gets (compress.quantize.layer_config).
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
    from criteria.qnoise import fake_quantize, hawq_traces, hawq_v2, predicted_tpv
    from criteria.tpv import hutchinson_diag, linearized_tpv, weight_layers

    from .models import spec_of
    from .quantize import float8_dequantized, layer_config

    if allocator not in ALLOCATORS:
        raise CompressError(f"unknown allocator {allocator!r}", f"use {', '.join(ALLOCATORS)}")
    if predictor not in PREDICTORS:
        raise CompressError(f"unknown predictor {predictor!r}", f"use {', '.join(PREDICTORS)}")
    bad = [c for c in candidates if c not in (FLOAT, FLOAT8) and not (isinstance(c, int) and 1 <= c <= 8)]
    if bad or not candidates:
        raise CompressError(f"candidates {list(candidates)} are not bit-widths in 1..8, {FLOAT} or {FLOAT8!r}",
                            "e.g. candidates=(4, 8, 16)")
    target, capability = _target(device, capability)
    if FLOAT8 in candidates and (capability is None or capability < (8, 9)):
        where = "the CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        raise CompressError(f"float8 needs a CUDA GPU of compute capability >= 8.9, the plan targets {where}",
                            "drop 'float8' from candidates, or plan for such a GPU (device='cuda')")
    quant = sorted({c for c in candidates if c != FLOAT}, key=_order)
    layers = weight_layers(model)
    unknown = [n for n in keep_float if n not in layers]
    if unknown:
        raise CompressError(f"keep_float names unknown layers {unknown}", "use Conv2d/Linear names from model.named_modules()")
    notes: dict[str, str] = {n: "kept in float on request" for n in keep_float}
    excluded: dict[str, dict[Choice, str]] = {n: {} for n in layers}
    configs = {}  # (layer, choice) -> LayerConfig of the possible ones
    for n, m in layers.items():
        for c in quant:
            chosen = layer_config(m, c, capability, group_size=group_size, mapping=mapping)
            if chosen.possible:
                configs[n, c] = chosen
            else:
                excluded[n][c] = chosen.reason
        if n not in notes and not any((n, c) in configs for c in quant):
            reasons = list(dict.fromkeys(excluded[n].values()))
            notes[n] = "torchao cannot quantize it: " + "; ".join(reasons)
    options = {n: [FLOAT] if n in notes else [c for c in quant if (n, c) in configs] + [FLOAT] * (FLOAT in candidates)
               for n in layers}
    free = [n for n in layers if n not in notes]
    if example_inputs is None:
        spec = spec_of(model)
        if spec is None:
            raise CompressError("cannot infer the input shape of this model", "pass example_inputs=torch.zeros(1, C, H, W)")
        example_inputs = spec.example_input(device=next(model.parameters()).device)
    macs = layer_macs(model, example_inputs)
    calib = data if isinstance(data, CalibrationData) else calibration(data, calibration_samples, batch_size, seed)
    tpv: dict[str, dict[Choice, float]] = {n: {FLOAT: 0.0} for n in layers}  # predicted TPV, reported for every plan
    score = tpv  # what the knapsack minimises
    if free:
        pnames = [f"{n}.weight" for n in free]
        jvp_deltas: dict[str, dict[Choice, torch.Tensor]] = {p: {} for p in pnames}  # predictor "jvp": δw per choice
        # "jvp" works on the BN-folded model that quantize() rounds: the block's extreme weight sits on a rounding tie,
        # so which way it rounds (and how errors correlate) is only known for the weights actually quantized
        folded_model = fold_batchnorm(model) if predictor == "jvp" else model
        folded = weight_layers(folded_model)
        diag = (None if predictor == "jvp" else
                hutchinson_diag(model, calib, params=pnames, estimator="batched", probes=probes, seed=seed).diag)
        traces = hawq_traces(model, calib, params=pnames, probes=probes, seed=seed) if allocator == "hawq" else {}
        nonpositive = [p[: -len(".weight")] for p, t in traces.items() if float(t.value) <= 0]
        if nonpositive:  # the loss Hessian is indefinite: such a layer scores <= 0 at every width and gets the fewest bits
            warnings.warn(f"HAWQ-V2: the loss-Hessian trace of {len(nonpositive)} of {len(traces)} layers is estimated "
                          f"<= 0 with {probes} probes ({', '.join(nonpositive[:4])}{', ...' if len(nonpositive) > 4 else ''}), "
                          "so they get the fewest bits; raise probes= (TPV's Gauss-Newton trace is never negative)",
                          stacklevel=2)
        if allocator == "hawq":
            score = {n: {FLOAT: 0.0} for n in layers}
        by_spec: dict[Any, list[str]] = {}  # integer quantizer -> layers it predicts
        for n in free:
            for c in options[n]:
                if c == FLOAT8:
                    w = layers[n].weight.detach()
                    error = (float8_dequantized(w) - w).double() ** 2
                    if diag is None:
                        wf = folded[n].weight.detach()
                        jvp_deltas[f"{n}.weight"][c] = float8_dequantized(wf) - wf
                    else:
                        tpv[n][c] = float((error * diag[f"{n}.weight"].to(error)).sum())
                    if allocator == "hawq":
                        score[n][c] = float(traces[f"{n}.weight"].value) / w.numel() * float(error.sum())
                elif c != FLOAT:
                    by_spec.setdefault(configs[n, c].spec, []).append(n)
        for spec, names_ in by_spec.items():
            params = [f"{n}.weight" for n in names_]
            if diag is None:
                for p in params:
                    w = folded[p[: -len(".weight")]].weight.detach()
                    jvp_deltas[p][spec.bits] = fake_quantize(w, spec) - w
            else:
                for p, v in predicted_tpv(model, {p: diag[p] for p in params}, spec, predictor).items():
                    tpv[p[: -len(".weight")]][spec.bits] = float(v.sum())
            if allocator == "hawq":
                for p, v in hawq_v2(model, {p: traces[p] for p in params}, spec).items():
                    score[p[: -len(".weight")]][spec.bits] = v
        if diag is None:
            for p, values in linearized_tpv(folded_model, calib, jvp_deltas).items():
                tpv[p[: -len(".weight")]].update(values)
    weights = {n: m.weight for n, m in layers.items()}
    if budget.kind == "latency":
        from .layer_latency import layer_latency_table

        if latency_table is None:
            latency_table = layer_latency_table(model, example_inputs, sorted({*(c for c in quant if c != FLOAT8), FLOAT}),
                                                batch_size=budget.batch_size, threads=budget.threads)
        missing = [n for n in layers if FLOAT not in latency_table.ms.get(n, {})]
        if missing:
            raise CompressError(f"the latency table has no float entry for layers {missing[:5]}",
                                "measure the table on this model (compress.layer_latency.layer_latency_table)")
        for n in layers:
            untimed = [c for c in options[n] if c not in latency_table.ms[n]]
            for c in untimed:
                excluded[n][c] = latency_table.notes.get(n, "no latency measured for it")
            options[n] = [c for c in options[n] if c not in untimed] or [FLOAT]
            if options[n] == [FLOAT] and n not in notes:
                notes[n] = latency_table.notes.get(n, "no latency measured at the candidate bits")

    def size(name: str, choice: Choice) -> float:
        """Bytes at ``choice`` with the group size and zero points the layer's config really uses (CUDA int4 picks
        its own group size and keeps bfloat16 zero points)."""
        chosen = configs.get((name, choice))
        block = chosen.spec.group_size if chosen is not None and chosen.spec is not None else group_size
        zero = chosen.zero_point_bytes if chosen is not None else 0.0
        return _size_bytes(weights[name], _storage_bits(choice), block, budget.scale_bytes, zero)

    def cost(name: str, choice: Choice) -> float:
        w, bits = weights[name], _storage_bits(choice)
        if budget.kind == "avg_bits":
            return 0.0 if name in notes else float(w.numel() * bits)
        if budget.kind == "bytes":
            return size(name, choice)
        if budget.kind == "latency":
            return latency_table.ms[name][choice]
        return float(macs.get(name, 0) * bits * budget.activation_bits)

    limit = {"avg_bits": (budget.avg_bits or 0) * sum(w.numel() for n, w in weights.items() if n not in notes),
             "bytes": budget.bytes, "bops": budget.bops, "latency": budget.latency}[budget.kind]
    names = list(layers)
    if allocator in ("tpv", "hawq"):
        pick = solve_mckp([[cost(n, c) for c in options[n]] for n in names],
                          [[score[n][c] for c in options[n]] for n in names], float(limit))
        chosen = {n: options[n][j] for n, j in zip(names, pick)}
    elif allocator == "uniform":
        def nearest(name: str, c: Choice) -> Choice:  # c, or the widest option below it (else the narrowest)
            below = [o for o in options[name] if _order(o) <= _order(c)]
            return below[-1] if below else options[name][0]

        chosen = None
        for c in sorted(set(quant) | ({FLOAT} & set(candidates)), key=_order, reverse=True):
            trial = {n: nearest(n, c) for n in names}
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
        c = chosen[n]
        bits = _storage_bits(c)
        result[n] = LayerBits(n, bits, weights[n].numel(), macs.get(n, 0), tpv[n][c],
                              size(n, c), dict(tpv[n]), notes.get(n, ""),
                              float8=c == FLOAT8, excluded=dict(excluded[n]))
    return BitPlan(result, allocator, budget, group_size, mapping, predictor,
                   latency_table if budget.kind == "latency" else None, target, capability)
