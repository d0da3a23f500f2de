"""The model variants a recipe run measures and exports: one definition that the runner, its stages, the report
and ``compress.bench deploy`` all read.

A variant's value is its key in report.json (``variants``, ``files``, ``checks``); the members are listed in the
order the report shows them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


DEPLOY_FILE = "model.onnx"  # the file to deploy: fast in a default onnxruntime session (see deploy_variant)


class Variant(enum.StrEnum):
    DENSE = "dense"  # the model as resolved
    PRUNED = "pruned"  # after pruning, before recovery (and the fp32 file when there is no recovery)
    RECOVERED = "recovered"  # after BN recalibration / distillation
    QUANTIZED = "quantized"  # torchao weight-only by the bit plan: model_small.onnx (packed, size-optimised)
    FINAL = "final"  # the fp32 model shipped as model.onnx when quantization is off
    INT8 = "int8"  # model_int8.onnx: static int8 QDQ activations and weights (CPU speed)

    @property
    def label(self) -> str:
        """How report.md and pareto.png name the variant."""
        return LABELS[self]


LABELS: dict[Variant, str] = {
    Variant.DENSE: "dense fp32",
    Variant.PRUNED: "pruned (no recovery)",
    Variant.RECOVERED: "pruned + recovered fp32",
    Variant.QUANTIZED: "pruned + quantized, size-optimised (model_small.onnx)",
    Variant.FINAL: "final fp32 (model.onnx)",
    Variant.INT8: "int8 activations, CPU speed (model_int8.onnx)",
}


def deploy_variant(exported: set[Variant]) -> Variant:
    """Which exported file model.onnx is: one that needs no session option to run fast on the CPU. The int8 QDQ
    file when there is one, else the fp32 model (the packed weight-only file is size-optimised: a default session
    re-dequantizes its weights on every run)."""
    for variant in (Variant.INT8, Variant.FINAL, Variant.RECOVERED, Variant.PRUNED):
        if variant in exported:
            return variant
    raise ValueError(f"no file to deploy among {sorted(exported)}")


@dataclass(frozen=True)
class VariantMetrics:
    """One row of report.json's ``variants``: torch-side accuracy of a variant and its size.

    ``dense_kl``, ``output_mse`` and ``samples`` come from comparing the variant with the dense model; the dense
    model itself has none (``samples`` is None) and its row omits them.
    """

    top1: float | None  # None when the evaluation data has no labels
    dense_agreement: float
    macs: int
    params: int
    dense_kl: float | None = None
    output_mse: float | None = None
    samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top1": self.top1, "dense_agreement": self.dense_agreement}
        if self.samples is not None:
            out.update(dense_kl=self.dense_kl, output_mse=self.output_mse, samples=self.samples)
        out.update(macs=self.macs, params=self.params)
        return out
