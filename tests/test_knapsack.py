"""The exact multiple-choice knapsack against exhaustive search (hypothesis): feasible, optimal, monotone."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from compress import CompressError
from compress.knapsack import solve_mckp

layer = st.lists(st.tuples(st.integers(1, 40), st.floats(0, 100, allow_nan=False)), min_size=1, max_size=4)
instance = st.tuples(st.lists(layer, min_size=1, max_size=6), st.integers(0, 200))


def brute_force(options, budget):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in options]):
        cost = sum(options[l][j][0] for l, j in enumerate(pick))
        value = sum(options[l][j][1] for l, j in enumerate(pick))
        if cost <= budget and (best is None or value < best):
            best = value
    return best


def solve(options, budget):
    return solve_mckp([[c for c, _ in o] for o in options], [[v for _, v in o] for o in options], budget)


def totals(options, pick):
    return (sum(options[l][j][0] for l, j in enumerate(pick)), sum(options[l][j][1] for l, j in enumerate(pick)))


@settings(max_examples=300, deadline=None)
@given(instance)
def test_matches_exhaustive_search(case):
    options, budget = case
    best = brute_force(options, budget)
    if best is None:
        with pytest.raises(CompressError, match="below the smallest possible size"):
            solve(options, budget)
        return
    cost, value = totals(options, solve(options, budget))
    assert cost <= budget
    assert value == pytest.approx(best, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(instance, st.integers(0, 50))
def test_more_budget_never_hurts(case, extra):
    options, budget = case
    if brute_force(options, budget) is None:
        return
    assert totals(options, solve(options, budget + extra))[1] <= totals(options, solve(options, budget))[1] + 1e-9


def integer_dp(options, budget):
    """Reference for integer costs: best value per exact total cost, layer by layer."""
    inf = float("inf")
    best = [0.0] + [inf] * budget
    for opts in options:
        new = [inf] * (budget + 1)
        for total in range(budget + 1):
            if best[total] < inf:
                for cost, value in opts:
                    if total + cost <= budget:
                        new[total + cost] = min(new[total + cost], best[total] + value)
        best = new
    return min(best)


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet50_sized_instance_matches_integer_dp(seed):
    """54 layers x 3 bit-widths with uneven sizes: the frontier DP equals an exhaustive DP over integer costs."""
    import random

    rng = random.Random(seed)
    sizes = [rng.randint(1, 60) for _ in range(54)]
    options = [[(16 * n, 0.0), (8 * n, rng.uniform(0, 1) * n), (4 * n, rng.uniform(1, 20) * n)] for n in sizes]
    budget = int(sum(sizes) * 6.3)  # an average of ~6.3 bits
    pick = solve(options, budget)
    cost, value = totals(options, pick)
    assert cost <= budget and value == pytest.approx(integer_dp(options, budget), rel=1e-12)
