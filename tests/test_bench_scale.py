"""The scale benchmark's memory table: JBR's kept state is flat in the calibration-set size, the kept rows grow,
and the frozen dense predictions take 12 bytes per sample."""

from __future__ import annotations

from compress.bench.scale import memory_rows
from compress.models import resolve


def test_jbr_state_does_not_grow_with_the_calibration_set() -> None:
    rows = memory_rows(resolve("small_resnet", "random").eval(), [16, 64], batch_size=16)
    small, large = rows
    assert small["summed_bytes"] == large["summed_bytes"] > 0
    assert small["dense_targets_bytes"] == 12 * 16  # class (int64) and confidence (float32) per sample, no softmax
    assert large["rows_bytes"] == 4 * small["rows_bytes"] > small["summed_bytes"]
    assert max(r["max_rel_diff"] for r in rows) < 1e-5
