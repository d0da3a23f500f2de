"""The public API end to end on the real reference model, as written in DEVELOPERS.md and the README."""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from compress import Budget, Target, check, load, plan_bits, prune, quantize, resolve, save
from compress.data import FashionMNIST, calibration, loader
from compress.recover import recalibrate_bn
from exporters import export_onnx


def test_prune_plan_quantize_export_check(tmp_path):
    model = resolve("small_resnet", weights="train")
    data = calibration(FashionMNIST("train"), num_samples=256, batch_size=64, seed=0)
    val = loader(Subset(FashionMNIST("test"), range(500)), 250)
    x = torch.zeros(1, 1, 28, 28)
    r = prune(model, data, criterion="jbr", target=Target(macs=0.7), example_inputs=x, steps=2, progress=False)
    assert 0.68 <= r.macs_ratio <= 0.7 and r.history
    recalibrate_bn(r.model, calibration(FashionMNIST("train"), 1024, 128, seed=1), progress=False)
    plan = plan_bits(r.model, data, budget=Budget(avg_bits=5), example_inputs=x)
    assert plan.avg_bits <= 5 and "conv1" in plan.kept_float
    q = quantize(r.model, plan)
    export_onnx(q, x, tmp_path / "model.onnx")
    rep = check(tmp_path / "model.onnx", reference=q, data=val, latency_runs=3, batch_sizes=(1,))
    assert rep.passed, rep.failures
    assert rep.reference_agreement >= 0.99 and rep.top1 > 0.5
    loaded = load(save(q, tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(torch.ones(2, 1, 28, 28)), q(torch.ones(2, 1, 28, 28)))


def test_quantized_checkpoint_loads_in_a_fresh_process(tmp_path):
    """A new interpreter has not imported torchao yet: load must still accept its tensor subclasses (weights_only)."""
    import subprocess
    import sys

    model = resolve("small_resnet")
    plan = plan_bits(model, [torch.randn(16, 1, 28, 28)], budget=Budget(avg_bits=6), allocator="uniform",
                     candidates=(4, 8), example_inputs=torch.zeros(1, 1, 28, 28))
    q = quantize(model, plan)
    path = save(q, tmp_path / "q.pt")
    x = torch.ones(2, 1, 28, 28)
    with torch.no_grad():
        torch.save(q(x), tmp_path / "expected.pt")
    code = ("import sys, torch, compress; m = compress.load(sys.argv[1]); "
            "assert torch.equal(m(torch.ones(2, 1, 28, 28)), torch.load(sys.argv[2])), 'outputs differ'")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "expected.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-500:]
