"""SELECT@ALLOCATE criteria: each group keeps ALLOCATE's values (so as many channels go), in SELECT's order."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

import criteria
from compress import Target, prune
from compress.errors import CompressError
from compress.prune import default_steps
from compress.small_resnet import SmallResNet


@pytest.fixture
def net_and_data():
    torch.manual_seed(0)
    return SmallResNet().eval(), [torch.randn(8, 1, 28, 28) for _ in range(2)]


def _groups(model, x):
    graph = tp.DependencyGraph().build_dependency(model, x[:1])
    return list(graph.get_all_groups(ignored_layers=[model.fc], root_module_types=(torch.nn.Conv2d,)))


def test_each_group_holds_the_allocation_values_in_the_selection_order(net_and_data):
    model, data = net_and_data
    composite = criteria.get("jbr-centred@l2", data)
    allocate = criteria.get("l2", data)
    select = criteria.get("jbr-centred", data)
    for group in _groups(model, data[0]):
        scores, values, order = composite(group), allocate(group), select(group)
        torch.testing.assert_close(scores.sort().values, values.sort().values)
        assert torch.equal(scores.argsort(), order.argsort())


def test_one_global_step_removes_as_many_channels_per_layer_as_the_allocation_criterion(net_and_data):
    _, data = net_and_data
    widths, removed = {}, {}
    for name in ("l2", "jbr-centred@l2", "jbr-centred"):
        torch.manual_seed(0)
        model = SmallResNet().eval()
        before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        importance = criteria.get(name, data)
        pruner = tp.pruner.BasePruner(model, data[0][:1], importance=importance, global_pruning=True,
                                      pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
        widths[name] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        removed[name] = {n: before[n].shape[0] - widths[name][n] for n in before}
    assert widths["jbr-centred@l2"] == widths["l2"] != widths["jbr-centred"]


def test_prune_takes_a_composite_name(net_and_data):
    model, data = net_and_data
    result = prune(model, data, "jbr-centred@l2", Target(macs=0.6), steps=2, progress=False)  # fresh BN: bn ties
    assert abs(result.macs_ratio - 0.6) <= 0.02


def test_parts_data_labels_and_normalisers_of_composite_names():
    assert criteria.parts("jbr-centred@bn") == ("jbr-centred", "bn") and criteria.parts("l1") == ("l1", None)
    assert criteria.uses_data("l1@jbr") and not criteria.uses_data("l1@bn")
    assert criteria.needs_labels("l1@jacobian")
    assert criteria.default_normalizer("jbr-ref@l1") == "mean" and criteria.default_normalizer("l1@jbr-ref") == "none"
    for bad in ("jbr@", "jbr@nope", "jbr@l1@l2", "nope@l1"):
        with pytest.raises(CompressError) as err:
            criteria.parts(bad)
        assert "\n" not in str(err.value)


def test_groups_the_allocation_cannot_tell_apart_keep_the_selection_scores(net_and_data):
    model, data = net_and_data  # untrained: every BatchNorm γ is 1, so bn ties every channel of every group
    composite, select = criteria.get("jbr-centred@bn", data), criteria.get("jbr-centred", data)
    for group in _groups(model, data[0]):
        torch.testing.assert_close(composite(group), select(group))


def test_groups_without_batchnorm_keep_the_selection_scores():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    data = [torch.randn(16, 6)]
    graph = tp.DependencyGraph().build_dependency(mlp, data[0][:1])
    group = graph.get_pruning_group(mlp[0], tp.prune_linear_out_channels, idxs=list(range(8)))
    assert criteria.get("bn")(group) is None
    torch.testing.assert_close(criteria.get("jbr-centred@bn", data)(group), criteria.get("jbr-centred", data)(group))


def test_a_composite_prunes_in_one_step_to_exactly_the_allocation_criterions_widths(net_and_data):
    model, data = net_and_data
    result = prune(model, data, "jbr-centred@l2", Target(macs=0.6), progress=False)  # steps: the criterion's default
    alone = prune(model, data, "l2", Target(macs=0.6), steps=1, progress=False)
    assert result.steps == len(result.step_log) == 1
    assert [(l.name, l.after) for l in result.layers] == [(l.name, l.after) for l in alone.layers]
    assert prune(model, data, "jbr-centred@l2", Target(macs=0.6), steps=2, progress=False).steps == 2


def test_default_steps_and_bad_steps():
    assert default_steps("jbr-centred@bn") == default_steps(criteria.get("l1@l2")) == 1
    assert default_steps("jbr-centred") == default_steps(criteria.get("l2")) == 5
    model = SmallResNet().eval()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(CompressError, match="not a positive number of pruning steps") as err:
            prune(model, [torch.randn(4, 1, 28, 28)], "l2", Target(macs=0.5), steps=bad, progress=False)
        assert "\n" not in str(err.value)
