"""criteria.register: a criterion added from outside is seen by every lookup, built with its data, and checked."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import criteria
from compress.errors import CompressError
from criteria import registry
from criteria.calibrated import CalibratedImportance

BUILT_IN = ["jbr", "jbr-centred", "jbr-recal", "jbr-mac", "jbr-batch", "jbr-ref", "jacobian", "l1", "l2", "taylor", "hessian", "bn", "fpgm", "lamp", "random"]


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    """Each test registers into a copy of the registry, so no other test sees its criteria."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class CountingMagnitude(CalibratedImportance, tp.importance.GroupMagnitudeImportance):
    """A user criterion that learns from calibration data: counts its passes, scores by the group L2 norm."""

    def __init__(self, data=None, **options) -> None:
        tp.importance.GroupMagnitudeImportance.__init__(self, p=2, **options)
        CalibratedImportance.__init__(self, data)
        self.passes, self.samples = 0, 0

    score = tp.importance.GroupMagnitudeImportance.__call__

    def _calibrate(self, model, data, graph) -> None:
        self.passes += 1
        self.samples = sum(len(x) for x in data)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_built_ins_and_needs_labels():
    assert criteria.names()[:len(BUILT_IN)] == BUILT_IN
    assert criteria.NEEDS_LABELS == frozenset({"jacobian"})
    assert criteria.needs_labels("jacobian") and not criteria.needs_labels("jbr")
    with pytest.raises(CompressError, match="unknown criterion"):
        criteria.needs_labels("nope")


def test_registered_criterion_is_seen_everywhere():
    needs_labels_view = criteria.NEEDS_LABELS  # imported before the registration, still sees it
    criteria.register("l1-sum", lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", **kw),
                      "group L1 norm,\n summed over coupled layers")
    assert criteria.names()[-1] == "l1-sum" and criteria.names()[:len(BUILT_IN)] == BUILT_IN
    assert criteria.describe()["l1-sum"] == "group L1 norm, summed over coupled layers"
    assert not criteria.uses_data("l1-sum") and not criteria.needs_labels("l1-sum")
    assert "l1-sum" not in needs_labels_view
    imp = criteria.get("l1-sum", data=[torch.zeros(1, 3, 4, 4)])  # data is not passed to a data-free criterion
    inner = imp.importance
    assert isinstance(inner, tp.importance.GroupMagnitudeImportance) and inner.p == 1 and inner.group_reduction == "sum"
    assert imp.normalizer == criteria.DEFAULT_NORMALIZER

    criteria.register("labelled", CountingMagnitude, "needs (input, label) batches", uses_data=True, needs_labels=True)
    assert criteria.needs_labels("labelled") and "labelled" in needs_labels_view
    assert set(needs_labels_view) == {"jacobian", "labelled"} and len(needs_labels_view) == 2


def test_calibrated_user_criterion_gets_its_data_and_prunes():
    criteria.register("counting", CountingMagnitude, "L2 norm after a counted calibration pass", uses_data=True)
    assert criteria.uses_data("counting") and not criteria.needs_labels("counting")
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    imp = criteria.get("counting", data, normalizer="none", group_reduction="sum")
    assert isinstance(imp.importance, CountingMagnitude) and imp.importance.data is data
    assert imp.importance.group_reduction == "sum"
    assert imp.normalizer == "none"

    model = _net().eval()
    example = torch.randn(1, 3, 8, 8)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5, ignored_layers=[model[-1]])
    pruner.step()
    assert imp.passes == 1 and imp.samples == 12  # one pass over the data, run by the scoring itself
    assert model[0].out_channels == 4 and model(example).shape == (1, 4)
    criteria.prepare(imp, model)  # the pruned structure is new: one more pass
    criteria.prepare(imp, model)  # unchanged since: cached
    assert imp.passes == 2


def test_duplicate_name_needs_overwrite():
    criteria.register("mine", tp.importance.RandomImportance, "random, mine")
    for name in ("mine", "l1"):
        with pytest.raises(CompressError, match=rf"criterion '{name}' is already registered.*overwrite=True") as err:
            criteria.register(name, tp.importance.RandomImportance)
        assert "\n" not in str(err.value)
    criteria.register("mine", tp.importance.BNScaleImportance, "bn, mine", overwrite=True)
    assert criteria.describe()["mine"] == "bn, mine"
    assert isinstance(criteria.get("mine").importance, tp.importance.BNScaleImportance)
    assert criteria.names().count("mine") == 1


def test_factory_must_build_an_importance():
    criteria.register("not-an-importance", lambda **kw: object(), "broken")
    with pytest.raises(CompressError, match="criterion 'not-an-importance' built a object, not a torch-pruning "
                                            "Importance") as err:
        criteria.get("not-an-importance")
    assert "\n" not in str(err.value)
    criteria.register("scores", lambda data, **kw: (lambda group: torch.ones(3)), "a bare function", uses_data=True)
    with pytest.raises(CompressError, match="criterion 'scores' built a function"):
        criteria.get("scores", [torch.zeros(1)])


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (("", tp.importance.RandomImportance), {}, "must be a non-empty string"),
    ((" padded", tp.importance.RandomImportance), {}, "must be a non-empty string"),
    (("x", "not callable"), {}, "is not callable"),
    (("x", tp.importance.RandomImportance), {"needs_labels": True}, "needs labels but does not use data"),
])
def test_bad_registrations(args, kwargs, message):
    before = criteria.names()
    with pytest.raises(CompressError, match=message):
        criteria.register(*args, **kwargs)
    assert criteria.names() == before


def test_registry_is_clean_between_tests():
    assert not {"l1-sum", "labelled", "counting", "mine", "not-an-importance", "scores"} & set(criteria.names())
