"""The HAWQ-V2 score of a bit plan (the ``hawq`` allocator's objective): Tr(∇²L_l)/n_l · ||Q(w_l) − w_l||².

L is the cross-entropy on the model's own predictions; its Hessian trace per layer is a Hutchinson estimate. The
loss Hessian is indefinite, so a trace estimated <= 0 gives a layer the fewest bits at every budget: warned.
"""

from __future__ import annotations

import warnings

from criteria import qnoise

from ..backends.candidates import FLOAT8
from .predictors import PlanProblem, Scores, split_candidates, weight_name


def hawq_scores(problem: PlanProblem) -> Scores:
    """HAWQ-V2 score per free layer and candidate (FLOAT scores 0)."""
    pnames = [f"{n}.weight" for n in problem.free]
    traces = qnoise.hawq_traces(problem.model, problem.calib, params=pnames, probes=problem.probes, seed=problem.seed)
    nonpositive = [weight_name(p) for p, t in traces.items() if float(t.value) <= 0]
    if nonpositive:
        warnings.warn(f"HAWQ-V2: the loss-Hessian trace of {len(nonpositive)} of {len(traces)} layers is estimated "
                      f"<= 0 with {problem.probes} probes ({', '.join(nonpositive[:4])}"
                      f"{', ...' if len(nonpositive) > 4 else ''}), so they get the fewest bits; raise probes= "
                      "(TPV's Gauss-Newton trace is never negative)", stacklevel=3)
    score: Scores = {n: {} for n in problem.free}
    float8_errors, by_spec = split_candidates(problem)
    for n, error in float8_errors.items():
        score[n][FLOAT8] = float(traces[f"{n}.weight"].value) / error.numel() * float(error.sum())
    for spec, names in by_spec.items():
        params = [f"{n}.weight" for n in names]
        for p, v in qnoise.hawq_v2(problem.model, {p: traces[p] for p in params}, spec).items():
            score[weight_name(p)][spec.bits] = v
    return score
