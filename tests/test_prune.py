"""compress.prune: hits MACs/params targets within tolerance, never prunes the classifier, round-trips via save/load."""

from __future__ import annotations

import pytest
import torch

from compress import CompressError, load, resolve, save
from compress.data import synthetic
from compress.prune import Target, prune


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return resolve("small_resnet")


def test_target_validation():
    with pytest.raises(CompressError, match="exactly one"):
        Target()
    with pytest.raises(CompressError, match="exactly one"):
        Target(macs=0.5, params=0.5)
    with pytest.raises(CompressError, match="not a fraction"):
        Target(macs=1.5)


@pytest.mark.parametrize("target", [Target(macs=0.5), Target(macs=0.3), Target(params=0.6)])
def test_prune_hits_target_within_tolerance(small, target):
    result = prune(small, synthetic(64), criterion="l1", target=target, steps=3, progress=False)
    ratio = result.macs_ratio if target.metric == "macs" else result.params_ratio
    assert abs(ratio - target.fraction) <= 0.02, ratio
    assert small.conv1.out_channels == 16  # the input model is untouched
    assert result.model.fc.out_features == 10  # classifier outputs never pruned
    assert {l.name for l in result.layers if l.after < l.before}  # something was pruned
    assert result.history and len(result.step_log) == 3


def test_pruned_result_round_trips(small, tmp_path):
    result = prune(small, synthetic(64), criterion="random", target=Target(macs=0.6), steps=2, progress=False)
    loaded = load(save(result, tmp_path / "pruned.pt"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


def test_round_to_keeps_widths_multiples(small):
    result = prune(small, synthetic(64), criterion="l2", target=Target(macs=0.5), steps=2, round_to=4,
                   tolerance=0.05, progress=False)
    assert all(l.after % 4 == 0 for l in result.layers if l.after < l.before)


def test_unknown_ignored_layer_is_reported(small):
    with pytest.raises(CompressError, match="not in the model"):
        prune(small, synthetic(8), criterion="l1", ignored_layers=["nope"], progress=False)


def test_latency_target_validation():
    assert Target(latency=0.5).metric == "latency" and Target(latency=0.5).fraction == 0.5
    with pytest.raises(CompressError, match="exactly one"):
        Target(macs=0.5, latency=0.5)
    with pytest.raises(CompressError, match="batch_size"):
        Target(latency=0.5, threads=0)
    with pytest.raises(CompressError, match="neither 'fp32' nor 'int8'"):
        Target(latency=0.5, activations="int4")


def test_int8_latency_target_times_the_pruned_model_as_int8_against_dense_fp32(small, monkeypatch):
    """Target(latency, activations="int8"): the dense model is timed as fp32, every pruned one as the int8 QDQ
    file (a fake clock: int8 runs twice as fast as fp32), so the search lands at twice the MACs of an fp32 target."""
    import compress.latency
    from compress.prune import count_macs_params

    calls = []

    def fake_latency(model, example_inputs, **export):
        calls.append(export.get("activations"))
        assert export.get("activations") != "int8" or export["calibration_data"] is not None
        return count_macs_params(model, example_inputs[:1])[0] / 1e7 / (2 if export.get("activations") == "int8" else 1)

    monkeypatch.setattr(compress.latency, "onnx_latency_ms", fake_latency)
    result = prune(small, synthetic(64), criterion="l1", target=Target(latency=0.3, activations="int8",
                                                                        latency_tolerance=0.02), steps=2, progress=False)
    assert calls[0] is None and set(calls[1:]) == {"int8"}
    assert abs(result.latency_ratio - 0.3) <= 0.02 and abs(result.macs_ratio - 0.6) <= 0.05


def test_latency_target_search_converges_on_a_latency_model(small, monkeypatch):
    """The MACs search against a deterministic latency model: 0.2 ms overhead + 1 ms per 10M MACs."""
    import compress.latency
    from compress.prune import count_macs_params

    def fake_latency(model, example_inputs, **_):
        return 0.2 + count_macs_params(model, example_inputs[:1])[0] / 1e7

    monkeypatch.setattr(compress.latency, "onnx_latency_ms", fake_latency)
    target = Target(latency=0.6, latency_tolerance=0.02)
    result = prune(small, synthetic(64), criterion="l1", target=target, steps=2, progress=False)
    dense_ms = fake_latency(small, torch.zeros(1, 1, 28, 28))
    assert result.latency_before_ms == pytest.approx(dense_ms)
    assert result.latency_after_ms == pytest.approx(fake_latency(result.model, torch.zeros(1, 1, 28, 28)))
    assert abs(result.latency_ratio - 0.6) <= 0.02
    assert len(result.latency_log) >= 2  # the overhead makes MACs 0.6 too slow: the search had to correct
    assert result.latency_log[0]["macs_goal"] == 0.6 and result.macs_ratio < 0.6
    assert "latency" in result.summary()


def test_latency_target_that_cannot_be_met_is_a_user_error(small, monkeypatch):
    import compress.latency

    monkeypatch.setattr(compress.latency, "onnx_latency_ms", lambda *a, **k: 1.0)  # overhead-bound: never drops
    with pytest.raises(CompressError, match="latency did not drop"):
        prune(small, synthetic(64), criterion="l1", target=Target(latency=0.5), steps=1, progress=False)


def test_latency_target_measured_in_onnxruntime(small):
    """Smoke test of the real measurement: fields filled from onnxruntime runs (no speed asserted here). The ratio of
    two 3-run medians of this 0.15 ms model ranged 0.49-1.54 over six identical runs, so the tolerance accepts any
    ratio and one round is always enough."""
    result = prune(small, synthetic(64), criterion="l1", target=Target(latency=0.9, runs=3, latency_tolerance=10.0),
                   steps=1, round_to=4, tolerance=0.05, progress=False)
    assert result.latency_before_ms > 0 and result.latency_after_ms > 0 and len(result.latency_log) == 1


def test_criterion_that_cannot_rank_channels_is_a_user_error(small):
    """A zeroed classifier makes every JBR score 0 (the logits ignore all channels): say so, not 'raise the cap'."""
    import copy

    blind = copy.deepcopy(small)
    torch.nn.init.zeros_(blind.fc.weight)
    with pytest.raises(CompressError, match="same score"):
        prune(blind, synthetic(16), criterion="jbr", target=Target(macs=0.7), steps=1, max_bisections=4,
              calibration_samples=16, progress=False)


def test_recalibrate_between_steps_only(small):
    """recalibrate=True re-estimates BN statistics after every step but the last; l1 ignores them, so the same
    channels go. The random-weight model's BN statistics are the defaults (mean 0): untouched without it."""
    bns = lambda m: [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]  # noqa: E731
    kw = dict(criterion="l1", target=Target(macs=0.5), progress=False)
    plain = prune(small, synthetic(64), steps=2, **kw)
    recal = prune(small, synthetic(64), steps=2, recalibrate=True, **kw)
    assert [l.after for l in plain.layers] == [l.after for l in recal.layers]
    assert all(b.running_mean.abs().max() == 0 for b in bns(plain.model))
    assert all(b.running_mean.abs().max() > 0 for b in bns(recal.model))
    one_step = prune(small, synthetic(64), steps=1, recalibrate=True, **kw)
    assert all(b.running_mean.abs().max() == 0 for b in bns(one_step.model))
