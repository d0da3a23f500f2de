"""The coverage benchmark on a representative handful: models that go end to end and a name that fails (reported with
its reason, not a crash)."""

from __future__ import annotations

import json

import torch

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


def test_coverage_builds_models_as_small_as_their_structure_allows() -> None:
    """ViTs at the nearest multiple of their patch (and their zero-initialised head given weights, as zero norm
    scales are, else no criterion that reads the output can rank a channel); MaxViT, whose 7x7 partitions fail at 64, at its weights' minimum."""
    from torch import nn

    from compress.bench.coverage import _torchvision_model, _trained_like

    vit, size = _torchvision_model("vit_b_32", 40)
    assert size == 64 and vit.image_size == 64 and vit.heads.head.weight.abs().sum() > 0
    assert _torchvision_model("maxvit_t", 64)[1] == 224
    untouched = nn.Linear(3, 2)
    before = untouched.weight.clone()
    assert torch.equal(_trained_like(nn.Sequential(untouched))[0].weight, before)
    zero_scale = nn.BatchNorm2d(3)  # timm's zero_init_last
    nn.init.zeros_(zero_scale.weight)
    assert torch.equal(_trained_like(nn.Sequential(zero_scale))[0].weight, torch.ones(3))
