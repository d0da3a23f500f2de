"""A tiny residual CNN in float64 for brute-force checks of the pruning criteria, with its fixtures.

conv-BN-relu stem; two identity blocks (stem channels coupled with both); a block with a 1x1 downsample whose
second conv has no BN (gated on its own output, coupled with the downsample conv); linear head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

X_SHAPE = (2, 6, 6)


class TinyResNet(nn.Module):
    """conv-BN-relu stem; two identity blocks (stem channels coupled with both); a block with a 1x1 downsample whose
    second conv has no BN (gated on its own output, coupled with the downsample conv); linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.a1, self.abn1 = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.a2, self.abn2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c1, self.cbn1 = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.cbn2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.d1, self.dbn1 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5)
        self.d2 = nn.Conv2d(5, 6, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.abn2(self.a2(F.relu(self.abn1(self.a1(x))))) + x)
        x = F.relu(self.cbn2(self.c2(F.relu(self.cbn1(self.c1(x))))) + x)
        x = F.relu(self.d2(F.relu(self.dbn1(self.d1(x)))) + self.down(x))
        return self.head(x.mean((2, 3)))


GATED = ("bn0", "abn1", "abn2", "cbn1", "cbn2", "dbn1", "d2", "down", "head")  # outputs that vanish with a channel
COUPLED = ({"bn0", "abn2", "cbn2"}, {"abn1"}, {"cbn1"}, {"dbn1"}, {"d2", "down"})  # gated layers per prunable group


@pytest.fixture
def tiny() -> TinyResNet:
    torch.manual_seed(0)
    net = TinyResNet().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, *X_SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(2)]


def graph_of(net: nn.Module) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, *X_SHAPE, dtype=torch.float64))


def groups_of(net: nn.Module) -> list:
    return list(graph_of(net).get_all_groups(root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[net.head]))
