"""Quantization noise as a TPV perturbation: torchao IntxWeightOnly steps, predicted vs measured per-layer damage.

Weight-only quantization with step Δ per block acts like i.i.d. rounding noise of variance σ² = Δ²/12, so the
predicted TPV of layer l at b bits is Σ_blocks Δ_block(b)²/12 · Σ_{p in block} diag(H_eff)_p ("noise" model).
torchao's rounding is biased (the block's extreme weight sits between grid points), so the "error" model uses the
actual error instead: Σ_p diag(H_eff)_p (Q(w)_p − w_p)², and the "jvp" model keeps how those errors correlate:
E_x ||J_l(x)(Q(w_l) − w_l)||² (criteria.tpv.linearized_tpv). HAWQ-V2 (Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||²) is the
baseline; :func:`validate` quantizes one layer at a time with torchao and ranks predictions against measurements.

The quantizer itself (QuantSpec, quant_params, quant_step, fake_quantize, quantization_problems) lives in
:mod:`compress.backends.intx` and is re-exported here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.backends.intx import (TORCHAO_WEIGHT_DTYPES, MappingName, QuantSpec, block_length, fake_quantize,
                                    quant_params, quant_step, quantization_problems)
from compress.batches import predict, predict_with, rows
from compress.data import labels_of
from compress.errors import CompressError
from compress.quiet import load_torchao

from .tpv import (DiagHeff, Estimate, Estimator, RatioMean, differentiable_attention, eval_mode, hutchinson_diag,
                  linearized_tpv, model_inputs, per_channel, rademacher, select_params, weight_layers)

__all__ = ["TORCHAO_WEIGHT_DTYPES", "MappingName", "QuantSpec", "Validation", "block_length", "fake_quantize",
           "hawq_traces", "hawq_v2", "measured_tpv", "predicted_tpv", "quant_params", "quant_step",
           "quantization_problems", "spearman", "validate"]


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
    with eval_mode(model), differentiable_attention():  # Hessian-vector products: a double backward
        for batch, x in zip(batches, model_inputs(model, batches, num_samples)):
            p = {n: t.clone().requires_grad_(True) for n, t in selected.items()}
            logits = predict_with(model, p, x)
            labels = labels_of(batch)
            y = logits.argmax(1).detach() if labels is None else labels[: rows(x)].to(logits.device)
            grads = torch.autograd.grad(F.cross_entropy(logits, y), list(p.values()), create_graph=True)
            for j in range(probes):
                v = [rademacher(g.shape, gen, g) for g in grads]
                hv = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(grads, v)), list(p.values()),
                                         retain_graph=j < probes - 1)
                for n, vi, h in zip(p, v, hv):
                    stats[n].add((vi * h).sum().reshape(1) * rows(x), torch.tensor([float(rows(x))]))
    return {n: s.result() for n, s in stats.items()}


def hawq_v2(model: nn.Module, traces: Mapping[str, Estimate], spec: QuantSpec) -> dict[str, float]:
    """HAWQ-V2 sensitivity Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||² per parameter tensor in ``traces``."""
    params = dict(model.named_parameters())
    return {n: float(t.value) / params[n].numel() * float(((fake_quantize(params[n].detach(), spec)
                                                          - params[n].detach()).double() ** 2).sum())
            for n, t in traces.items()}


# --- validation against torchao ----------------------------------------------------------------------------------

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
    load_torchao()
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model).eval()
    quantize_(quantized, spec.config(), filter_fn=lambda m, fqn: fqn == layer)
    with eval_mode(model), torch.no_grad():
        reference = [predict(model, x) for x in inputs] if reference is None else reference
        sq = sum(float(((predict(quantized, x) - ref).double() ** 2).reshape(rows(x), -1).sum())
                 for x, ref in zip(inputs, reference))
    return sq / sum(rows(x) for x in inputs)


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
        reference = [predict(model, x) for x in inputs]
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
