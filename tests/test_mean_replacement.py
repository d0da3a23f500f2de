"""Mean replacement against brute force in float64: the pruned network equals the dense one with the removed
channels held at their calibration means (1x1 convs and linear layers, where the fold is exact)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress import Target, prune
from compress.data import synthetic
from compress.mean_replacement import fold_removed_inputs, input_means
from compress.small_resnet import SmallResNet


class PointwiseNet(nn.Module):
    """1x1 conv (no bias) -> BN -> ReLU -> 1x1 conv (no bias) -> BN -> ReLU -> mean pool -> linear; plus a bias-free
    linear tail, which mean replacement cannot fold into."""

    def __init__(self, tail_bias: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 5)
        self.tail = nn.Linear(5, 2, bias=tail_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.tail(torch.relu(self.fc(x.mean((2, 3)))))


def _net(tail_bias: bool = True) -> PointwiseNet:
    torch.manual_seed(0)
    net = PointwiseNet(tail_bias).double()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]


def _held_at_means(net: nn.Module, consumer: nn.Module, channels: list[int], means: torch.Tensor, x: torch.Tensor):
    """The dense output with input channels ``channels`` of ``consumer`` replaced by their means (brute force)."""
    def replace(module, inputs):
        held = inputs[0].clone()
        index = (slice(None), channels) if held.dim() == 2 else (slice(None), channels, ...)
        shape = (1, -1) if held.dim() == 2 else (1, -1, 1, 1)
        held[index] = means[channels].reshape(shape).expand_as(held[index])
        return (held,)
    handle = consumer.register_forward_pre_hook(replace)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("root, consumer, channels", [("conv1", "conv2", [1, 2]), ("conv2", "fc", [0, 2]),
                                                      ("fc", "tail", [3])])
def test_pruned_network_equals_the_dense_one_with_removed_channels_at_their_means(root, consumer, channels):
    net, data = _net(), _data()
    means = input_means(net, data)
    dense_means = {n: m.clone() for n, m in means.items()}
    x = torch.cat(data)
    expected = _held_at_means(net, getattr(net, consumer), channels, dense_means[consumer], x)
    pruned = copy.deepcopy(net)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=x[:1])
    layer = getattr(pruned, root)
    handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    group = graph.get_pruning_group(layer, handler, idxs=channels)
    assert fold_removed_inputs(group, means, graph) == []
    group.prune()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(pruned(x), _held_at_means(net, getattr(net, consumer), channels,
                                                            torch.zeros_like(dense_means[consumer]), x))


def test_a_layer_without_bias_or_batchnorm_is_named_not_changed():
    net, data = _net(tail_bias=False), _data()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=data[0][:1])
    group = graph.get_pruning_group(net.fc, tp.prune_linear_out_channels, idxs=[0])
    assert fold_removed_inputs(group, input_means(net, data), graph) == ["tail"]
    assert net.tail.bias is None


def test_prune_with_mean_replacement_keeps_the_target_and_moves_the_batchnorm_means():
    torch.manual_seed(0)
    model, data = SmallResNet().eval(), synthetic(32)
    plain = prune(model, data, "l2", Target(macs=0.6), steps=2, progress=False)
    replaced = prune(model, data, "l2", Target(macs=0.6), steps=2, mean_replacement=True, progress=False)
    assert replaced.macs_ratio == pytest.approx(plain.macs_ratio) and replaced.unfolded_layers == []
    assert [w.after for w in replaced.layers] == [w.after for w in plain.layers]  # l2 scores ignore the fold
    moved = [not torch.allclose(a.running_mean, b.running_mean)
             for a, b in zip(plain.model.modules(), replaced.model.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert any(moved)
