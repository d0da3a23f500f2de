"""jbr-recal against brute force: mean replacement of a channel, then the next BatchNorm recalibrated, in float64."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import criteria


class ConvChain(nn.Module):
    """conv -> BN -> ReLU -> conv (padded, so the border terms matter) -> BN -> ReLU -> pool -> linear. bn1's
    channels are read by conv2, which a BatchNorm follows (recalibration restores their mean and rescales); bn2's
    are read by the head, which none follows (removal as such)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(torch.relu(self.bn2(z)).mean((2, 3)))


def _population_statistics(norm: nn.BatchNorm2d, z: torch.Tensor) -> None:
    """What recalibration on the whole calibration set converges to: the mean and biased variance of ``z``."""
    norm.running_mean.copy_(z.mean((0, 2, 3)))
    norm.running_var.copy_(z.var((0, 2, 3), unbiased=False))


@pytest.fixture
def chain() -> tuple[ConvChain, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = ConvChain().double().eval()
    with torch.no_grad():
        for norm in (net.bn1, net.bn2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(12, 2, 5, 5, dtype=torch.float64) * 2 + 0.3
        _population_statistics(net.bn1, net.conv1(x))
        _population_statistics(net.bn2, net.conv2(torch.relu(net.bn1(net.conv1(x)))))
    return net, [x[:6], x[6:]]


def _recalibrated_logits(net: ConvChain, x: torch.Tensor, channel: int, eps: float) -> torch.Tensor:
    """Logits after conv2's input channel ``channel`` moves by −eps·(u − ū) (ū its mean over samples and
    positions) and bn2 is recalibrated on the same inputs."""
    with torch.no_grad():
        u = torch.relu(net.bn1(net.conv1(x)))
        u[:, channel] -= eps * (u[:, channel] - u[:, channel].mean())
        z = net.conv2(u)
        norm = nn.BatchNorm2d(5).double().eval()
        norm.load_state_dict(net.bn2.state_dict())
        _population_statistics(norm, z)
        return net.head(torch.relu(norm(z)).mean((2, 3)))


def _removed_logits(net: ConvChain, x: torch.Tensor, channel: int, eps: float) -> torch.Tensor:
    """Logits after the head's input channel ``channel`` is scaled by 1 − eps (no BatchNorm to recalibrate)."""
    with torch.no_grad():
        h = torch.relu(net.bn2(net.conv2(torch.relu(net.bn1(net.conv1(x)))))).mean((2, 3))
        h[:, channel] *= 1 - eps
        return net.head(h)


def brute_force_scores(net: ConvChain, x: torch.Tensor, perturbed, channels: int, step: float = 1e-5) -> torch.Tensor:
    """E_x[(m(x)ᵀ ∂f/∂eps)²] per channel, by central differences of ``perturbed(net, x, channel, eps)``."""
    with torch.no_grad():
        classes = net(x).argmax(1, keepdim=True)
    scores = []
    for c in range(channels):
        plus = perturbed(net, x, c, step).gather(1, classes)
        minus = perturbed(net, x, c, -step).gather(1, classes)
        scores.append((((plus - minus) / (2 * step)) ** 2).mean())
    return torch.stack(scores)


def _group(net: ConvChain, layer: nn.Module, channels: int) -> tp.Group:
    graph = tp.DependencyGraph().build_dependency(net, torch.randn(1, 2, 5, 5, dtype=torch.float64))
    return graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(channels)))


def test_jbr_recal_equals_brute_force_mean_replacement_then_recalibration(chain):
    net, batches = chain
    score = criteria.get("jbr-recal", batches, normalizer="none")(_group(net, net.conv1, 4))
    expected = brute_force_scores(net, torch.cat(batches), _recalibrated_logits, 4)
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=1e-10)


def test_jbr_recal_of_a_channel_no_batchnorm_reads_is_the_removal_itself(chain):
    net, batches = chain
    score = criteria.get("jbr-recal", batches, normalizer="none")(_group(net, net.conv2, 5))
    expected = brute_force_scores(net, torch.cat(batches), _removed_logits, 5)
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=1e-10)


def test_the_rescaling_term_changes_the_centred_scores(chain):
    net, batches = chain
    group = _group(net, net.conv1, 4)
    recal = criteria.get("jbr-recal", batches, normalizer="none")(group)
    centred = criteria.get("jbr-centred", batches, normalizer="none")(group)
    assert ((recal - centred).abs() / centred).max() > 0.05


def test_jbr_recal_prunes_a_residual_network_to_a_macs_target():
    from compress import Target, prune
    from compress.small_resnet import SmallResNet

    torch.manual_seed(0)
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    result = prune(SmallResNet().eval(), data, criterion="jbr-recal", target=Target(macs=0.6), steps=2,
                   progress=False)
    assert abs(result.macs_ratio - 0.6) <= 0.02
    assert result.model(data[0]).shape == (8, 10)
