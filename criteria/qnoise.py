"""Quantization noise as a TPV perturbation: torchao IntxWeightOnly steps, predicted vs measured per-layer damage.

Weight-only quantization with step Δ per block acts like i.i.d. rounding noise of variance σ² = Δ²/12, so the
predicted TPV of layer l at b bits is Σ_blocks Δ_block(b)²/12 · Σ_{p in block} diag(H_eff)_p ("noise" model).
torchao's rounding is biased (the block's extreme weight sits between grid points), so the "error" model uses the
actual error instead: Σ_p diag(H_eff)_p (Q(w)_p − w_p)², and the "jvp" model keeps how those errors correlate:
E_x ||J_l(x)(Q(w_l) − w_l)||² (criteria.tpv.linearized_tpv). HAWQ-V2 (Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||²) is the
baseline; :func:`validate` quantizes one layer at a time with torchao and ranks predictions against measurements.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from compress.data import labels_of
from compress.errors import CompressError

from .tpv import (DiagHeff, Estimate, Estimator, RatioMean, eval_mode, hutchinson_diag, linearized_tpv, model_inputs,
                  per_channel, rademacher, select_params, weight_layers)

MappingName = Literal["symmetric", "asymmetric", "symmetric_no_clipping_err"]
TORCHAO_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantSpec:
    """torchao 0.18 ``IntxWeightOnlyConfig(weight_dtype=int<bits>, granularity, mapping_type, scale_dtype)``.

    ``group_size=None`` is ``PerAxis(0)`` (one block spans all input channels: (1, Cin) for Linear,
    (1, Cin, 1, 1) for Conv2d, so a conv has one scale per (out channel, kh, kw)); an int g is ``PerGroup(g)``.
    ``scale_dtype=None`` keeps the weight's dtype; the scale is clamped below at finfo(weight dtype).smallest_normal.
    """

    bits: int = 8
    group_size: int | None = None
    mapping: MappingName = "symmetric"
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise CompressError(f"torchao IntxWeightOnly supports 1..8 bits, got {self.bits}", "pick bits in 1..8")
        if self.mapping not in ("symmetric", "asymmetric", "symmetric_no_clipping_err"):
            raise CompressError(f"unknown mapping {self.mapping!r}", "use symmetric, asymmetric or symmetric_no_clipping_err")

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def config(self) -> Any:
        """The equivalent torchao ``IntxWeightOnlyConfig``."""
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.bits}"),
                                    granularity=PerAxis(0) if self.group_size is None else PerGroup(self.group_size),
                                    mapping_type=MappingType[self.mapping.upper()], scale_dtype=self.scale_dtype)


def block_length(weight: Tensor, spec: QuantSpec) -> int:
    """Number of input channels (dim 1) that share one scale: Cin for PerAxis(0), g for PerGroup(g)."""
    return weight.shape[1] if spec.group_size is None else spec.group_size


def quant_params(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale Δ, zero point) exactly as torchao's ``choose_qparams_affine`` for this spec, in torchao's shapes:
    (Cout, Cin/g) for Linear, (Cout, Cin/g, kh, kw) for Conv2d."""
    g = block_length(weight, spec)
    if weight.dim() not in (2, 4) or weight.shape[1] % g:
        raise CompressError(f"cannot split a weight of shape {tuple(weight.shape)} into blocks of {g} input channels",
                            "use a group size that divides the input channels (see quantization_problems)")
    qmin, qmax = spec.qrange
    blocks = weight.unflatten(1, (weight.shape[1] // g, g))
    min_neg = blocks.amin(2).clamp(max=0)
    max_pos = blocks.amax(2).clamp(min=0)
    eps = torch.finfo(weight.dtype).smallest_normal
    if spec.mapping == "asymmetric":
        scale = ((max_pos - min_neg) / float(qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax)
    else:
        if spec.mapping == "symmetric":
            scale = torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2)
        else:
            smin, smax = min_neg / float(qmin), max_pos / float(qmax)
            scale = torch.where(smin > smax, smin, smax)
        scale, zero = scale.clamp(min=eps), torch.full_like(scale, int((qmax + qmin + 1) / 2))
    return scale.to(spec.scale_dtype or weight.dtype), zero


def _per_weight(t: Tensor, weight: Tensor, spec: QuantSpec) -> Tensor:
    """A per-block tensor (torchao scale shape) repeated to the weight's shape."""
    return t.repeat_interleave(block_length(weight, spec), dim=1)


def quant_step(weight: Tensor, spec: QuantSpec, *, per_weight: bool = False) -> Tensor:
    """The quantizer step Δ (torchao's scale) per block, or repeated to every weight with ``per_weight``."""
    scale = quant_params(weight, spec)[0]
    return _per_weight(scale, weight, spec) if per_weight else scale


def fake_quantize(weight: Tensor, spec: QuantSpec) -> Tensor:
    """Q(w): torchao's dequantized weight, (clamp(round(w·(1/Δ)) + z, qmin, qmax) − z)·Δ, same ops and dtypes."""
    scale, zero = (_per_weight(t, weight, spec) for t in quant_params(weight, spec))
    qmin, qmax = spec.qrange
    q = torch.clamp(torch.round(weight * (1.0 / scale)) + zero, qmin, qmax)
    return ((q - zero) * scale).to(weight.dtype)


# --- predictions ------------------------------------------------------------------------------------------------

def _diag(diag: DiagHeff | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return diag.diag if isinstance(diag, DiagHeff) else diag


def predicted_tpv(model: nn.Module, diag: DiagHeff | Mapping[str, Tensor], spec: QuantSpec,
                  kind: Literal["noise", "error"] = "noise") -> dict[str, Tensor]:
    """Predicted TPV per output channel for each parameter in ``diag`` (layer TPV = ``.sum()``).

    noise: Σ_{p in channel} Δ_block(p)²/12 · diag(H_eff)_p;  error: Σ_{p in channel} diag(H_eff)_p (Q(w)_p − w_p)².
    """
    params = dict(model.named_parameters())
    out = {}
    for name, d in _diag(diag).items():
        w = params[name].detach()
        if kind == "noise":
            var = quant_step(w, spec, per_weight=True).double() ** 2 / 12
        elif kind == "error":
            var = (fake_quantize(w, spec) - w).double() ** 2
        else:
            raise CompressError(f"unknown prediction kind {kind!r}", "use 'noise' or 'error'")
        out[name] = per_channel((var * d.to(var))[None])[0]
    return out


def hawq_traces(model: nn.Module, data: Iterable[Any], *, params: Sequence[str] | None = None, probes: int = 8,
                num_samples: int | None = None, seed: int = 0) -> dict[str, Estimate]:
    """Tr(∇²_{w_l} L) per parameter tensor by Hutchinson with Hessian-vector products: E_v vᵀ(∇²L)v.

    L = mean cross-entropy against the batch's labels, or against the model's own argmax (pseudo-labels) when the
    batches carry none. One Rademacher v over all tensors per probe; cross-tensor blocks average out. Eval mode.
    The standard error is across (batch, probe) units: the probe noise given these batches.
    """
    selected = {n: t.detach() for n, t in select_params(model, params).items()}
    gen, stats = torch.Generator().manual_seed(seed), {n: RatioMean() for n in selected}
    batches = list(data)
    with eval_mode(model):
        for batch, x in zip(batches, model_inputs(model, batches, num_samples)):
            p = {n: t.clone().requires_grad_(True) for n, t in selected.items()}
            logits = functional_call(model, p, (x,))
            labels = labels_of(batch)
            y = logits.argmax(1).detach() if labels is None else labels[: len(x)].to(logits.device)
            grads = torch.autograd.grad(F.cross_entropy(logits, y), list(p.values()), create_graph=True)
            for j in range(probes):
                v = [rademacher(g.shape, gen, g) for g in grads]
                hv = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(grads, v)), list(p.values()),
                                         retain_graph=j < probes - 1)
                for n, vi, h in zip(p, v, hv):
                    stats[n].add((vi * h).sum().reshape(1) * len(x), torch.tensor([float(len(x))]))
    return {n: s.result() for n, s in stats.items()}


def hawq_v2(model: nn.Module, traces: Mapping[str, Estimate], spec: QuantSpec) -> dict[str, float]:
    """HAWQ-V2 sensitivity Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||² per parameter tensor in ``traces``."""
    params = dict(model.named_parameters())
    return {n: float(t.value) / params[n].numel() * float(((fake_quantize(params[n].detach(), spec)
                                                          - params[n].detach()).double() ** 2).sum())
            for n, t in traces.items()}


# --- torchao's limits and the validation ------------------------------------------------------------------------

def quantization_problems(model: nn.Module, spec: QuantSpec) -> list[tuple[str, str]]:
    """(layer, reason) for every Conv2d/Linear layer torchao's IntxWeightOnlyConfig cannot quantize with ``spec``."""
    problems = []
    for name, m in weight_layers(model).items():
        w, g = m.weight, block_length(m.weight, spec)
        if w.dtype not in TORCHAO_WEIGHT_DTYPES:
            problems.append((name, f"weight dtype {w.dtype} (torchao quantizes float32/float16/bfloat16 only)"))
        elif w.shape[1] % g:
            problems.append((name, f"group size {g} does not divide the {w.shape[1]} input channels"))
        elif g == 1:
            problems.append((name, "blocks of 1 input channel (torchao's reduction fails on them, e.g. a conv with "
                                   "Cin=1 or a depthwise conv)"))
    return problems


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks, ties given their average rank."""
    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        r = np.empty(len(v))
        r[np.argsort(v, kind="mergesort")] = np.arange(len(v))
        _, tie, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(tie, r) / counts)[tie]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def measured_tpv(model: nn.Module, layer: str, spec: QuantSpec, inputs: Sequence[Tensor],
                 reference: Sequence[Tensor] | None = None) -> float:
    """E_x ||f_q(x) − f(x)||² with only ``layer`` quantized by torchao (on a copy of ``model``), eval mode."""
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model).eval()
    quantize_(quantized, spec.config(), filter_fn=lambda m, fqn: fqn == layer)
    with eval_mode(model), torch.no_grad():
        reference = [model(x) for x in inputs] if reference is None else reference
        sq = sum(float(((quantized(x) - ref).double() ** 2).reshape(len(x), -1).sum()) for x, ref in zip(inputs, reference))
    return sq / sum(len(x) for x in inputs)


@dataclass(frozen=True)
class Validation:
    """Predicted and torchao-measured TPV per (layer, bits) pair and their Spearman rank correlations.

    ``predicted`` holds one list per model ("noise", "error", "jvp", and "hawq" when computed), aligned with
    ``pairs``.
    """

    pairs: list[tuple[str, int]]
    predicted: dict[str, list[float]]
    measured: list[float]
    spearman: dict[str, float]
    problems: list[tuple[str, str]]
    diag: DiagHeff


def validate(model: nn.Module, calibration: Iterable[Any], held_out: Iterable[Any], *,
             bits: Sequence[int] = (2, 3, 4, 8), spec: QuantSpec = QuantSpec(), estimator: Estimator = "batched",
             probes: int = 8, hawq: bool = True, hawq_probes: int = 4, seed: int = 0) -> Validation:
    """For each quantizable Conv2d/Linear layer and each b in ``bits`` (``spec`` with bits=b), predict TPV from
    diag(H_eff) on ``calibration`` and measure it with torchao on ``held_out``; layers torchao cannot quantize are
    listed in ``problems`` (reason per layer), not measured."""
    problems = {name: reason for b in bits for name, reason in quantization_problems(model, replace(spec, bits=b))}
    layers = [name for name in weight_layers(model) if name not in problems]
    calibration = list(calibration)
    diag = hutchinson_diag(model, calibration, params=[f"{n}.weight" for n in layers], estimator=estimator,
                           probes=probes, seed=seed)
    traces = hawq_traces(model, calibration, params=list(diag.param), probes=hawq_probes, seed=seed) if hawq else {}
    inputs = list(model_inputs(model, held_out))
    with eval_mode(model), torch.no_grad():
        reference = [model(x) for x in inputs]
    pairs, measured = [], []
    predicted: dict[str, list[float]] = {k: [] for k in ("noise", "error", "jvp", *(("hawq",) if hawq else ()))}
    params = dict(model.named_parameters())
    jvp = linearized_tpv(model, calibration, {f"{n}.weight": {b: fake_quantize(params[f"{n}.weight"].detach(),
                                                                               replace(spec, bits=b))
                                                                 - params[f"{n}.weight"].detach() for b in bits}
                                              for n in layers})
    for b in bits:
        s = replace(spec, bits=b)
        noise, error = predicted_tpv(model, diag, s, "noise"), predicted_tpv(model, diag, s, "error")
        hawq_scores = hawq_v2(model, traces, s) if hawq else {}
        for layer in layers:
            pname = f"{layer}.weight"
            pairs.append((layer, b))
            measured.append(measured_tpv(model, layer, s, inputs, reference))
            predicted["noise"].append(float(noise[pname].sum()))
            predicted["error"].append(float(error[pname].sum()))
            predicted["jvp"].append(jvp[pname][b])
            if hawq:
                predicted["hawq"].append(hawq_scores[pname])
    return Validation(pairs, predicted, measured, {k: spearman(v, measured) for k, v in predicted.items()},
                      sorted(problems.items()), diag)
