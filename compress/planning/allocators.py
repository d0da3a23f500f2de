"""Allocator strategies of a bit plan: one candidate per layer such that Σ_l cost_l(c_l) <= limit.

* ``knapsack``: minimise Σ_l score_l(c_l), an exact multiple-choice knapsack (compress.knapsack); the ``tpv``
  and ``hawq`` allocators are this solver on TPV and on the HAWQ-V2 score.
* ``uniform``: the widest single candidate that fits (each layer takes it, or its widest option below it).
* ``random``: a seeded random feasible plan (random choices, lowered at random until they fit).

Add one by writing a function of :class:`Allocation` and registering it in :data:`ALLOCATION_STRATEGIES`.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Callable, Sequence

from ..backends.candidates import FLOAT, Choice, order
from ..errors import CompressError
from ..knapsack import solve_mckp
from .costs import Cost
from .predictors import Scores
from .types import Budget


@dataclass
class Allocation:
    """One allocation problem: layers, their options (fewest bits first), cost, limit and the objective."""

    names: list[str]
    options: dict[str, list[Choice]]
    cost: Cost
    limit: float
    score: Scores  # per layer and option, what the knapsack minimises
    candidates: Sequence[Choice]
    budget: Budget
    seed: int


def knapsack(a: Allocation) -> dict[str, Choice]:
    pick = solve_mckp([[a.cost(n, c) for c in a.options[n]] for n in a.names],
                      [[a.score[n][c] for c in a.options[n]] for n in a.names], float(a.limit))
    return {n: a.options[n][j] for n, j in zip(a.names, pick)}


def uniform(a: Allocation) -> dict[str, Choice]:
    def nearest(name: str, c: Choice) -> Choice:  # c, or the widest option below it (else the narrowest)
        below = [o for o in a.options[name] if order(o) <= order(c)]
        return below[-1] if below else a.options[name][0]

    quant = {c for c in a.candidates if c != FLOAT}
    for c in sorted(quant | ({FLOAT} & set(a.candidates)), key=order, reverse=True):
        trial = {n: nearest(n, c) for n in a.names}
        if sum(a.cost(n, trial[n]) for n in a.names) <= a.limit * (1 + 1e-9):
            return trial
    raise CompressError(f"no uniform bit-width among {list(a.candidates)} fits {a.budget}", "raise the budget or allow fewer bits")


def random_plan(a: Allocation) -> dict[str, Choice]:
    rng = _random.Random(a.seed)
    chosen = {n: rng.choice(a.options[n]) for n in a.names}
    while sum(a.cost(n, chosen[n]) for n in a.names) > a.limit * (1 + 1e-9):
        lowerable = [n for n in a.names if a.options[n].index(chosen[n]) > 0]
        if not lowerable:
            raise CompressError(f"no plan fits {a.budget}", "raise the budget or allow fewer bits")
        n = rng.choice(lowerable)
        chosen[n] = a.options[n][a.options[n].index(chosen[n]) - 1]
    return chosen


ALLOCATION_STRATEGIES: dict[str, Callable[[Allocation], dict[str, Choice]]] = {
    "knapsack": knapsack, "uniform": uniform, "random": random_plan}
