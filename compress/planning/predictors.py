"""Predictor strategies of a bit plan: TPV_l(c), the predicted output damage of layer l at candidate c.

* ``noise``: Σ_p diag(H_eff)_p Δ_p²/12 (i.i.d. rounding noise of torchao's own step Δ).
* ``error``: Σ_p diag(H_eff)_p (Q(w)_p − w_p)² (the actual rounding error, diagonal H_eff).
* ``jvp``: E_x ||J_l(x)(Q(w_l) − w_l)||² (the actual error through the layer's full H_eff block: one
  Jacobian-vector product per layer and batch), on the BN-folded weights that ``quantize`` rounds.

Float8 TPV always uses the actual error. Q(w) comes from the layer's quantization backend. Add a predictor by
subclassing :class:`TPVPredictor` and registering an instance in :data:`PREDICTORS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from criteria.qnoise import predicted_tpv
from criteria.tpv import hutchinson_diag, linearized_tpv

from ..backends.base import LayerConfig, QuantBackend
from ..backends.candidates import FLOAT, FLOAT8, Choice
from ..fold import fold_batchnorm
from ..nn_helpers import weight_layers

Scores = dict[str, dict[Choice, float]]


@dataclass
class PlanProblem:
    """What every strategy of one plan reads: the model, the calibration batches, the layers free to choose, the
    candidates each can take and the backend's config for each (layer, candidate)."""

    model: nn.Module
    calib: Any
    layers: Mapping[str, nn.Module]
    free: list[str]
    options: dict[str, list[Choice]]
    configs: dict[tuple[str, Choice], LayerConfig]
    backend: QuantBackend
    probes: int
    seed: int


def weight_name(param: str) -> str:
    """The layer of a ``<layer>.weight`` parameter name."""
    return param[: -len(".weight")]


def split_candidates(problem: PlanProblem) -> tuple[dict[str, torch.Tensor], dict[Any, list[str]]]:
    """The candidates of the free layers as the diagonal scores need them: per layer with a float8 candidate its
    squared error (Q(w) − w)² on the unfolded weight (float64), and per integer quantizer the layers it predicts."""
    float8_errors: dict[str, torch.Tensor] = {}
    by_spec: dict[Any, list[str]] = {}
    for n in problem.free:
        for c in problem.options[n]:
            if c == FLOAT8:
                w = problem.layers[n].weight.detach()
                float8_errors[n] = (problem.backend.dequantized(w, c, problem.configs[n, c]) - w).double() ** 2
            elif c != FLOAT:
                by_spec.setdefault(problem.configs[n, c].spec, []).append(n)
    return float8_errors, by_spec


class TPVPredictor:
    """TPV_l(c) for every free layer l and each of its candidates c (FLOAT excluded: it is 0)."""

    name = ""

    def predict(self, problem: PlanProblem) -> Scores:
        raise NotImplementedError


class DiagPredictor(TPVPredictor):
    """``noise`` or ``error``: TPV from the Hutchinson estimate of diag(H_eff) on the unfolded weights."""

    def __init__(self, name: str) -> None:
        self.name = name

    def predict(self, problem: PlanProblem) -> Scores:
        pnames = [f"{n}.weight" for n in problem.free]
        diag = hutchinson_diag(problem.model, problem.calib, params=pnames, estimator="batched",
                               probes=problem.probes, seed=problem.seed).diag
        tpv: Scores = {n: {} for n in problem.free}
        float8_errors, by_spec = split_candidates(problem)
        for n, error in float8_errors.items():
            tpv[n][FLOAT8] = float((error * diag[f"{n}.weight"].to(error)).sum())
        for spec, names in by_spec.items():
            params = [f"{n}.weight" for n in names]
            for p, v in predicted_tpv(problem.model, {p: diag[p] for p in params}, spec, self.name).items():
                tpv[weight_name(p)][spec.bits] = float(v.sum())
        return tpv


class JVPPredictor(TPVPredictor):
    """``jvp``: the actual error of the BN-folded weights through J_l. The block's extreme weight sits on a rounding
    tie, so which way it rounds (and how errors correlate) is only known for the weights actually quantized."""

    name = "jvp"

    def predict(self, problem: PlanProblem) -> Scores:
        folded_model = fold_batchnorm(problem.model)
        folded = weight_layers(folded_model)
        deltas: dict[str, dict[Choice, torch.Tensor]] = {}
        for n in problem.free:
            wf = folded[n].weight.detach()
            quantized = sorted((c for c in problem.options[n] if c != FLOAT), key=lambda c: c != FLOAT8)  # float8 first
            deltas[f"{n}.weight"] = {c: problem.backend.dequantized(wf, c, problem.configs[n, c]) - wf for c in quantized}
        tpv: Scores = {n: {} for n in problem.free}
        for p, values in linearized_tpv(folded_model, problem.calib, deltas).items():
            tpv[weight_name(p)].update(values)
        return tpv


PREDICTORS: dict[str, TPVPredictor] = {p.name: p for p in (JVPPredictor(), DiagPredictor("noise"),
                                                             DiagPredictor("error"))}
