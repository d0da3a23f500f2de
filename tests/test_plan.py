"""plan_bits + quantize: exact allocation under each budget kind, constrained layers reported, safe round trip."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress import CompressError, load, resolve, save
from compress.data import synthetic
from compress.fold import fold_batchnorm
from compress.plan import FLOAT, Budget, plan_bits
from compress.quantize import quantize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = resolve("small_resnet", kwargs={"widths": (8, 16, 16)})
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def data():
    return synthetic(64)


def test_budget_validation():
    with pytest.raises(CompressError, match="exactly one"):
        Budget()
    with pytest.raises(CompressError, match="exactly one"):
        Budget(avg_bits=4, bytes=100)
    with pytest.raises(CompressError, match="positive"):
        Budget(avg_bits=-1)


def _feasible_optimum(plan, budget_bits):
    """Exhaustive search over the plan's own option table (avg-bits budget)."""
    names = list(plan.layers)
    options = [list(plan.layers[n].options) if not plan.layers[n].note else [FLOAT] for n in names]
    best = None
    for pick in itertools.product(*options):
        bits = sum(b * plan.layers[n].numel for n, b in zip(names, pick) if not plan.layers[n].note)
        if bits <= budget_bits:
            value = sum(plan.layers[n].options[b] for n, b in zip(names, pick))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("avg_bits", [4.5, 6, 9])
def test_tpv_plan_is_the_exhaustive_optimum(model, data, avg_bits):
    plan = plan_bits(model, data, Budget(avg_bits=avg_bits), calibration_samples=32, probes=1)
    total_weights = sum(l.numel for l in plan.layers.values() if not l.note)
    assert plan.avg_bits <= avg_bits + 1e-9
    assert plan.predicted_tpv == pytest.approx(_feasible_optimum(plan, avg_bits * total_weights), rel=1e-9)


def test_bytes_and_bops_budgets_hold_and_more_budget_never_hurts(model, data):
    ref = plan_bits(model, data, Budget(avg_bits=6), calibration_samples=32, probes=1)
    for budget in (Budget(bytes=ref.size_bytes * 0.9), Budget(bops=ref.bops * 0.9)):
        plan = plan_bits(model, data, budget, calibration_samples=32, probes=1)
        assert (plan.size_bytes if budget.kind == "bytes" else plan.bops) <= 0.9 * (
            ref.size_bytes if budget.kind == "bytes" else ref.bops) + 1e-6
    tpvs = [plan_bits(model, data, Budget(avg_bits=b), calibration_samples=32, probes=1).predicted_tpv
            for b in (4.2, 5, 6, 8, 12)]
    assert all(a >= b - 1e-12 for a, b in zip(tpvs, tpvs[1:]))


def test_unquantizable_layers_are_reported_not_skipped(model, data):
    plan = plan_bits(model, data, Budget(avg_bits=8), calibration_samples=32, probes=1, keep_float=["fc"])
    assert "input channel" in plan.kept_float["conv1"]  # Cin=1: torchao cannot quantize it
    assert plan.kept_float["fc"] == "kept in float on request"
    with pytest.raises(CompressError, match="below the smallest possible size"):
        plan_bits(model, data, Budget(avg_bits=1), calibration_samples=32, probes=1)


@pytest.mark.parametrize("allocator", ["uniform", "random", "hawq"])
def test_baseline_allocators_respect_the_budget(model, data, allocator):
    plan = plan_bits(model, data, Budget(avg_bits=5), allocator=allocator, calibration_samples=32, probes=1)
    assert plan.avg_bits <= 5 + 1e-9 and plan.allocator == allocator
    if allocator == "uniform":
        assert {b for n, b in plan.bits.items() if n != "conv1"} == {4}
        assert plan.avg_bits == 4 and plan.avg_bits_all > 4  # conv1 (Cin=1) stays float, outside the average


def test_hawq_warns_when_a_loss_hessian_trace_is_not_positive(model, data, monkeypatch):
    """An indefinite loss Hessian can give a layer a trace estimate <= 0; HAWQ then scores it <= 0 at every width and
    gives it the fewest bits. The user is told, with the fix."""
    import warnings

    import criteria.qnoise as qnoise

    real = qnoise.hawq_traces

    def traces_with(negative: int):
        def estimate(*args, **kwargs):
            traces = {n: qnoise.Estimate(t.value.abs() + 1e-6, t.stderr) for n, t in real(*args, **kwargs).items()}
            for n in list(traces)[:negative]:
                traces[n] = qnoise.Estimate(-traces[n].value, traces[n].stderr)
            return traces
        return estimate

    monkeypatch.setattr(qnoise, "hawq_traces", traces_with(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every trace positive: no warning
        plan_bits(model, data, Budget(avg_bits=5), allocator="hawq", calibration_samples=32, probes=4)
    monkeypatch.setattr(qnoise, "hawq_traces", traces_with(1))
    with pytest.warns(UserWarning, match=r"HAWQ-V2: the loss-Hessian trace of 1 of 9 layers .* 4 probes .*raise probes="):
        plan = plan_bits(model, data, Budget(avg_bits=5), allocator="hawq", calibration_samples=32, probes=4)
    assert plan.allocator == "hawq"


def test_jvp_predictor_matches_torchao_damage_layer_by_layer(model, data):
    """At 8 bits (first order is exact there), E_x||J_l (Q(w_l) − w_l)||² on the BN-folded weights equals the output
    change measured with torchao quantizing that layer alone, to 5%."""
    from criteria.tpv import weight_layers

    names = list(weight_layers(model))
    x = data.tensors[0]
    for n in names[1:]:  # conv1 has one input channel: torchao cannot quantize it
        plan = plan_bits(model, data, Budget(avg_bits=8), candidates=(8, FLOAT), keep_float=[k for k in names if k != n],
                         predictor="jvp", calibration_samples=64)
        with torch.no_grad():
            measured = float((quantize(model, plan)(x) - model(x)).double().pow(2).sum()) / len(x)
        assert plan.predictor == "jvp" and measured == pytest.approx(plan.layers[n].predicted_tpv, rel=0.05), n
    with pytest.raises(CompressError, match="unknown predictor"):
        plan_bits(model, data, predictor="exact")


def test_quantize_follows_the_plan_and_round_trips(model, data, tmp_path):
    plan = plan_bits(model, data, Budget(avg_bits=6), calibration_samples=32, probes=1)
    q = quantize(model, plan)
    quantized = {n for n, m in q.named_modules() if type(getattr(m, "weight", None)).__name__.startswith("Intx")}
    assert quantized == {n for n, b in plan.bits.items() if b != FLOAT}
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        dense, folded, out = model(x), fold_batchnorm(model)(x), q(x)
    assert torch.allclose(folded, dense, atol=1e-4)  # folding alone changes nothing
    assert 0 < (out - dense).pow(2).mean() < dense.pow(2).mean()  # quantization perturbs, but not wildly
    loaded = load(save(q, tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_plan_for_another_model_is_refused(model, data):
    plan = plan_bits(model, data, Budget(avg_bits=6), calibration_samples=32, probes=1)
    with pytest.raises(CompressError, match="lacks"):
        quantize(resolve("resnet18"), plan)
