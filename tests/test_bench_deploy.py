"""``python -m compress.bench deploy --quick`` on the Fashion-MNIST model: every variant, every column, every file."""

from __future__ import annotations

import json

from compress.bench.__main__ import main


def test_deploy_quick_writes_all_variants(tmp_path) -> None:
    assert main(["deploy", "--quick", "--models", "small_resnet", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "deploy.json").read_text())
    variants = [r["variant"] for r in payload["rows"]]
    assert variants == ["dense fp32", "pruned fp32", "pruned + mixed weight-only", "pruned + int8 QDQ"]
    dense, pruned, weight_only, int8 = payload["rows"]
    assert dense["speedup_b1"] == 1.0 and dense["size_ratio"] == 1.0
    assert weight_only["size_mb"] < pruned["size_mb"] < dense["size_mb"]  # packed int4/int8 < fp32 pruned < dense
    assert abs(pruned["macs"] / dense["macs"] - 0.5) <= 0.02
    assert all(r["top1"] is not None and r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0 for r in payload["rows"])
    assert "| small_resnet | pruned + int8 QDQ |" in (tmp_path / "deploy.md").read_text()
    assert (tmp_path / "deploy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "deploy-small_resnet" / "model.onnx").is_file()
    # OpenVINO beside onnxruntime, and the default-session column
    assert all(r["openvino_b1_ms"] > 0 and r["openvino_b32_ms"] > 0 and r["default_b1_ms"] > 0 for r in payload["rows"])
    assert "OpenVINO b1 ms" in (tmp_path / "deploy.md").read_text()
