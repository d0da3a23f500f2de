"""``python -m compress.bench quant``: rows per allocator and budget, the HAWQ trace signs, latency columns, and a
torchvision architecture trained on a subset; CUDA without a GPU is a user error."""

from __future__ import annotations

import json

import pytest
import torch

from compress.bench.__main__ import main

QUICK = ["--budgets", "4", "--test-limit", "200", "--calibration", "64", "--probes", "1", "--random-seeds", "1",
         "--latency-batches", "1"]


def test_quant_bench_small_resnet(tmp_path) -> None:
    assert main(["quant", *QUICK, "--allocators", "tpv", "hawq", "uniform", "--latency-image-size", "32",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quant.json").read_text())
    rows = payload["rows"]
    assert [r["allocator"] for r in rows] == ["tpv", "hawq", "uniform"]
    assert all(r["avg_bits"] <= 4 + 1e-9 and 0 <= r["agreement"] <= 1 and r["latency_b1_ms"] > 0
               and r["latency_bf16_b1_ms"] > 0 for r in rows)
    hawq = payload["hawq_traces"]["dense"]
    assert hawq["layers"] == len(hawq["traces"]) == len(rows[0]["bits"])
    assert hawq["nonpositive"] == [n for n, (v, _) in hawq["traces"].items() if v <= 0]
    base = payload["float_baselines"]["dense"]
    assert 0.5 < base["bf16_agreement"] <= 1 and base["latency_b1_ms"] > 0
    md = (tmp_path / "quant.md").read_text()
    assert "Eager latency" in md and "| dense | tpv @ 4 bits |" in md and "HAWQ-V2 on dense" in md


def test_quant_bench_trains_a_torchvision_arch(tmp_path, tmp_cache) -> None:
    assert main(["quant", *QUICK, "--arch", "resnet18", "--image-size", "32", "--train-epochs", "1",
                 "--train-samples", "256", "--allocators", "tpv", "uniform", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quant.json").read_text())
    assert [r["allocator"] for r in payload["rows"]] == ["tpv", "uniform"]
    assert "fc" in payload["rows"][0]["bits"] and "layer4.1.conv2" in payload["rows"][0]["bits"]
    assert len(list(tmp_cache.glob("resnet18-*.pt"))) == 1  # trained once on the subset, cached


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error raised where CUDA is missing")
def test_quant_bench_cuda_without_gpu_is_a_user_error(tmp_path, capsys) -> None:
    assert main(["quant", *QUICK, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
