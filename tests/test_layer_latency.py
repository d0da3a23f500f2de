"""Latency budgets: the per-layer onnxruntime table, and the exact knapsack under a latency budget."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from compress import Budget, CompressError, plan_bits, resolve
from compress.data import synthetic
from compress.layer_latency import LatencyTable, layer_latency_table


def test_measured_table_covers_every_layer_and_times_identical_layers_once() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    table = layer_latency_table(model, torch.zeros(1, 3, 16, 16), candidates=(4, 8, 16), runs=3)
    assert set(table.ms) == {"0", "2", "4", "7"}
    assert all(set(row) == {4, 8, 16} and all(v > 0 for v in row.values()) for row in table.ms.values())
    assert table.ms["2"] == table.ms["4"]  # same shape, same input: one measurement
    assert table.measured == 3 * 3  # three distinct layers x three bit-widths
    assert table.total({"0": 16, "2": 8, "4": 4, "7": 16}) == pytest.approx(
        table.ms["0"][16] + table.ms["2"][8] + table.ms["4"][4] + table.ms["7"][16])


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return resolve("small_resnet")


def _injected_table(model: nn.Module) -> LatencyTable:
    """Deterministic latencies: float slowest, 4 bits fastest, scaled by the layer's weight count."""
    ms = {n: {4: 0.2 + m.weight.numel() * 1e-4, 8: 0.3 + m.weight.numel() * 2e-4, 16: 0.5 + m.weight.numel() * 4e-4}
          for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return LatencyTable(ms)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_latency_budget_is_met_exactly_and_optimally(small, fraction) -> None:
    table = _injected_table(small)
    lo, hi = (sum(min(r.values()) for r in table.ms.values()), sum(max(r.values()) for r in table.ms.values()))
    limit = lo + fraction * (hi - lo)
    plan = plan_bits(small, synthetic(64), Budget(latency=limit), latency_table=table, seed=0)
    assert plan.predicted_latency_ms <= limit + 1e-9
    assert plan.predicted_latency_ms == pytest.approx(table.total(plan.bits))
    # brute force over every combination of the layers' options: no feasible plan has a lower predicted TPV
    names = list(plan.layers)
    options = [[plan.layers[n].bits] if plan.layers[n].note else sorted(plan.layers[n].options) for n in names]
    best = min(sum(plan.layers[n].options[b] for n, b in zip(names, combo))
               for combo in itertools.product(*options)
               if sum(table.ms[n][b] for n, b in zip(names, combo)) <= limit + 1e-9)
    assert plan.predicted_tpv == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan.to_dict()["predicted_latency_ms"] == pytest.approx(plan.predicted_latency_ms)


def test_latency_budget_below_the_fastest_plan_is_a_user_error(small) -> None:
    table = _injected_table(small)
    with pytest.raises(CompressError):
        plan_bits(small, synthetic(64), Budget(latency=1e-6), latency_table=table)


def test_budget_validation_names_latency() -> None:
    with pytest.raises(CompressError, match="latency="):
        Budget(avg_bits=4, latency=1.0)
    assert Budget(latency=2.0).kind == "latency"


class _Sleeps(nn.Module):
    """A forward pass that takes at least ``ms`` milliseconds and records the inputs it saw."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms, self.weight, self.seen = ms, nn.Parameter(torch.zeros(1, dtype=torch.bfloat16)), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.seen.append((tuple(x.shape), x.dtype))
        time.sleep(self.ms / 1000)
        return x


def test_torch_latency_times_the_model_on_its_dtype_and_batch() -> None:
    from compress.latency import torch_latency_ms

    model = _Sleeps(3.0)
    ms = torch_latency_ms(model, torch.zeros(1, 2, 5, 5), batch_size=4, runs=5, warmup=2)
    assert 3.0 <= ms < 50 and len(model.seen) == 7 and set(model.seen) == {((4, 2, 5, 5), torch.bfloat16)}
