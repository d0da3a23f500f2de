"""Bad inputs are found before any long work starts (no criterion scores, no TPV is predicted): one line naming the
tensor or batch."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from compress import Budget, CompressError, plan_bits, resolve
from compress.data import synthetic
from compress.planning import predictors
from compress.prune import Target, prune


class Spy(tp.importance.GroupMagnitudeImportance):
    """A criterion and a TPV predictor that record whether any work reached them."""

    calls = 0

    def __call__(self, group):
        Spy.calls += 1
        return super().__call__(group)

    def predict(self, problem):
        Spy.calls += 1
        return {}


@pytest.fixture
def small(monkeypatch):
    Spy.calls = 0
    monkeypatch.setitem(predictors.PREDICTORS, "spy", Spy())
    return resolve("small_resnet")


def _fails_fast(call, match: str) -> str:
    with pytest.raises(CompressError, match=match) as err:
        call()
    assert Spy.calls == 0, "the check ran after scoring started"
    assert "\n" not in str(err.value)
    return str(err.value)


def _prune(model, data):
    return prune(model, data, Spy(), Target(macs=0.5), progress=False)


def _plan(model, data):
    return plan_bits(model, data, Budget(avg_bits=5), predictor="spy")


def test_non_finite_weights_are_named_before_pruning_or_planning(small) -> None:
    with torch.no_grad():
        small.layers[1][0].conv2.weight[0, 0, 0, 0] = float("nan")
    for call in (lambda: _prune(small, synthetic(64)), lambda: _plan(small, synthetic(64))):
        assert "layers.1.0.conv2.weight" in _fails_fast(call, "non-finite")


@pytest.mark.parametrize("batch, match", [
    (torch.full((8, 1, 28, 28), float("inf")), "calibration batch 1 holds non-finite values"),
    (torch.zeros(8, 3, 28, 28), r"calibration batch 1 has shape \(8, 3, 28, 28\), the model takes \(N, 1, 28, 28\)"),
    (torch.zeros(8, 28, 28), r"calibration batch 1 has shape \(8, 28, 28\)"),
])
def test_bad_calibration_batches_are_named(small, batch, match) -> None:
    data = [torch.zeros(8, 1, 28, 28), batch]
    _fails_fast(lambda: _prune(small, data), match)
    _fails_fast(lambda: _plan(small, data), match)


def test_empty_calibration_data_is_an_error(small) -> None:
    _fails_fast(lambda: _prune(small, []), "calibration data is empty")
    _fails_fast(lambda: _plan(small, []), "calibration data is empty")


def test_the_spy_sees_work_on_good_inputs(small) -> None:
    """The control: with good inputs the spies are reached, so a zero count above means the check came first."""
    _prune(small, synthetic(64))
    assert Spy.calls > 0


def test_target_one_means_no_pruning(small) -> None:
    result = prune(small, synthetic(64), "l1", Target(macs=1.0), progress=False)
    assert result.macs_ratio == 1.0 and result.history == [] and result.steps == 0
    assert [l.after for l in result.layers] == [l.before for l in result.layers]
