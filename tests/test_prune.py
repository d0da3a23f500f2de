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
