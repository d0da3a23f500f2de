"""BatchNorm folding: exact on torch's BatchNorm and on fused BatchNorm+activation subclasses (timm's), which keep
their activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.fold import fold_batchnorm, foldable_pairs


class BatchNormReLU(nn.BatchNorm2d):
    """A fused BN + activation in the style of timm's BatchNormAct2d (fx traces into its forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.relu(x) * 2.0  # something besides normalising that folding must keep


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype) * 0.1)
    return model.eval()


def test_fused_norm_activation_folds_exactly_and_keeps_its_activation() -> None:
    model = _randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormReLU(8), nn.Conv2d(8, 4, 1),
                                           nn.BatchNorm2d(4)).double())
    assert foldable_pairs(model) == [("0", "1"), ("2", "3")]
    folded = fold_batchnorm(model)
    assert isinstance(folded[3], nn.Identity) and isinstance(folded[1], BatchNormReLU)
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert (folded[1](-torch.ones(1, 8, 1, 1, dtype=torch.float64)) == 0).all()  # the ReLU is still there


def test_norm_without_running_statistics_is_not_folded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    assert foldable_pairs(model) == []


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_small_100", "resnext26ts"])
def test_timm_models_fold_every_batchnorm(arch: str) -> None:
    timm = pytest.importorskip("timm", reason="the timm extra is installed by `make test`")
    model = _randomise_norms(timm.create_model(arch, pretrained=False, num_classes=10))
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(foldable_pairs(model)) == len(norms)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, folded = model(x), fold_batchnorm(model)(x)
    torch.testing.assert_close(folded, out, rtol=1e-4, atol=1e-5 * float(out.abs().max()))
