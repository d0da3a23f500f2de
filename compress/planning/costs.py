"""Cost strategies of a bit plan: what one layer at one candidate costs against the :class:`Budget`, and the limit.

One class per budget kind (``Budget.kind``): average bits per weight (Σ n_l·b_l ≤ avg_bits·Σ n_l over the layers
the plan chooses for), bytes (packed weights + scales + zero points, as the backend stores them), BOPs
(Σ MACs_l·b_l·activation bits) and latency (Σ t_l(b_l) from a per-layer onnxruntime table). Add a kind by
subclassing :class:`Cost` and registering it in :data:`COSTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..backends.candidates import FLOAT, FLOAT8, Choice, storage_bits
from ..errors import CompressError
from ..layer_latency import layer_latency_table
from .types import Budget

SizeFn = Callable[[str, Choice], float]


@dataclass
class CostInputs:
    """What the cost strategies read: the layers' weights, MACs and sizes, and the layers fixed in float."""

    budget: Budget
    weights: Mapping[str, torch.Tensor]
    macs: Mapping[str, int]
    size: SizeFn
    fixed: Mapping[str, str]  # layer -> why it is fixed in float


class Cost:
    """Cost of (layer, candidate) and the budget's limit on the summed cost."""

    kind = ""

    def __init__(self, inputs: CostInputs) -> None:
        self.inputs = inputs

    def __call__(self, name: str, choice: Choice) -> float:
        raise NotImplementedError

    def limit(self) -> float:
        raise NotImplementedError


class AvgBitsCost(Cost):
    kind = "avg_bits"

    def __call__(self, name: str, choice: Choice) -> float:
        w = self.inputs.weights[name]
        return 0.0 if name in self.inputs.fixed else float(w.numel() * storage_bits(choice))

    def limit(self) -> float:
        free = sum(w.numel() for n, w in self.inputs.weights.items() if n not in self.inputs.fixed)
        return float((self.inputs.budget.avg_bits or 0) * free)


class BytesCost(Cost):
    kind = "bytes"

    def __call__(self, name: str, choice: Choice) -> float:
        return self.inputs.size(name, choice)

    def limit(self) -> float:
        return float(self.inputs.budget.bytes)


class BopsCost(Cost):
    kind = "bops"

    def __call__(self, name: str, choice: Choice) -> float:
        return float(self.inputs.macs.get(name, 0) * storage_bits(choice) * self.inputs.budget.activation_bits)

    def limit(self) -> float:
        return float(self.inputs.budget.bops)


class LatencyCost(Cost):
    """t_l(b) from a :class:`compress.layer_latency.LatencyTable` of the int8 QDQ file."""

    kind = "latency"

    def __init__(self, inputs: CostInputs, table: Any) -> None:
        super().__init__(inputs)
        self.table = table

    def __call__(self, name: str, choice: Choice) -> float:
        return self.table.ms[name][choice]

    def limit(self) -> float:
        return float(self.inputs.budget.latency)


COSTS: dict[str, type[Cost]] = {c.kind: c for c in (AvgBitsCost, BytesCost, BopsCost, LatencyCost)}


def latency_table_for(model: nn.Module, example_inputs: torch.Tensor, budget: Budget, quant: list[Choice],
                      table: Any) -> Any:
    """``table``, or one measured now at the candidate bits (float8 has no QDQ file) and at FLOAT."""
    if table is not None:
        return table
    return layer_latency_table(model, example_inputs, sorted({*(c for c in quant if c != FLOAT8), FLOAT}),
                               batch_size=budget.batch_size, threads=budget.threads)


def restrict_to_timed(table: Any, options: dict[str, list[Choice]], excluded: dict[str, dict[Choice, str]],
                      notes: dict[str, str]) -> None:
    """Drop the candidates the latency table has no time for (in place), recording why."""
    missing = [n for n in options if FLOAT not in table.ms.get(n, {})]
    if missing:
        raise CompressError(f"the latency table has no float entry for layers {missing[:5]}",
                            "measure the table on this model (compress.layer_latency.layer_latency_table)")
    for n in options:
        untimed = [c for c in options[n] if c not in table.ms[n]]
        for c in untimed:
            excluded[n][c] = table.notes.get(n, "no latency measured for it")
        options[n] = [c for c in options[n] if c not in untimed] or [FLOAT]
        if options[n] == [FLOAT] and n not in notes:
            notes[n] = table.notes.get(n, "no latency measured at the candidate bits")


def make_cost(inputs: CostInputs, table: Any = None) -> Cost:
    """The cost strategy of ``inputs.budget.kind``."""
    cls = COSTS[inputs.budget.kind]
    return cls(inputs, table) if cls is LatencyCost else cls(inputs)
