"""Exact multiple-choice knapsack: pick one option per layer minimising Σ_l value_l(j_l) s.t. Σ_l cost_l(j_l) <= B.

Solved by dynamic programming over Pareto frontiers: after layer l the frontier holds every (total cost,
total value) pair not dominated by another (cheaper-or-equal and better-or-equal), which provably contains the
optimum restricted to layers 1..l. Pairs that cannot fit the budget even with the cheapest options for the
remaining layers are dropped. Exact for any real-valued costs and values; no budget grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import CompressError


def _pareto(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points, sorted by increasing cost (and so strictly decreasing value)."""
    order = np.lexsort((value, cost))
    best_before = np.minimum.accumulate(value[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = value[order][1:] < best_before[:-1]
    return order[keep]


def solve_mckp(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], budget: float,
               max_frontier: int = 2_000_000) -> list[int]:
    """Option index per layer of an optimal choice; raises CompressError when even the cheapest choice exceeds ``budget``."""
    if len(costs) != len(values) or any(len(c) != len(v) or len(c) == 0 for c, v in zip(costs, values)):
        raise ValueError("costs and values must give the same non-zero number of options per layer")
    cost_arrays = [np.asarray(c, dtype=np.float64) for c in costs]
    value_arrays = [np.asarray(v, dtype=np.float64) for v in values]
    cheapest_rest = np.concatenate([np.cumsum([c.min() for c in cost_arrays][::-1])[::-1], [0.0]])
    slack = 1e-9 * max(1.0, abs(budget))
    if cheapest_rest[0] > budget + slack:
        raise CompressError(f"the budget {budget:g} is below the smallest possible size {cheapest_rest[0]:g}",
                            "raise the budget or allow fewer bits")
    frontier_cost, frontier_value = np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []  # per layer: (frontier index before, option) of each frontier point
    for layer, (c, v) in enumerate(zip(cost_arrays, value_arrays)):
        total_cost = (frontier_cost[:, None] + c[None, :]).ravel()
        total_value = (frontier_value[:, None] + v[None, :]).ravel()
        fits = np.nonzero(total_cost + cheapest_rest[layer + 1] <= budget + slack)[0]
        kept = fits[_pareto(total_cost[fits], total_value[fits])]
        if len(kept) > max_frontier:
            raise CompressError(f"the exact bit allocation needs a frontier of {len(kept)} points", "use fewer candidate bit-widths")
        parents.append(np.stack(np.divmod(kept, len(c)), axis=1))
        frontier_cost, frontier_value = total_cost[kept], total_value[kept]
    point = int(np.argmin(frontier_value))
    choice = [0] * len(costs)
    for layer in range(len(costs) - 1, -1, -1):
        point, choice[layer] = (int(i) for i in parents[layer][point])
    return choice
