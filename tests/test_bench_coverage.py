"""The coverage benchmark on a representative handful: models that go end to end and a name that fails (reported with
its reason, not a crash)."""

from __future__ import annotations

import json

from compress.bench.__main__ import main


def test_coverage_rows_say_how_far_each_model_got(tmp_path) -> None:
    code = main(["coverage", "--models", "resnet18", "shufflenet_v2_x0_5", "resnet_18", "--criterion", "l1",
                 "--image-size", "32", "--out", str(tmp_path)])
    assert code == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "coverage.json").read_text())["rows"]}
    assert rows["resnet18"]["reached"] == "reload" and rows["resnet18"]["reason"] == ""
    assert abs(rows["resnet18"]["macs_ratio"] - 0.5) <= 0.02 and rows["resnet18"]["rel_diff"] <= 1e-4
    assert rows["resnet18"]["reload_max_diff"] == 0.0
    assert rows["shufflenet_v2_x0_5"]["reached"] == "reload", rows["shufflenet_v2_x0_5"]["reason"]
    assert rows["resnet_18"]["reached"] is None
    assert rows["resnet_18"]["reason"].startswith("build: CompressError: unknown model 'resnet_18'")
    assert "2/3 models end to end (67%)" in (tmp_path / "coverage.md").read_text()
