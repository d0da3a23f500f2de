"""Pruning works on the torchvision architectures users bring (random weights: structure only).

For each: prune to 70% MACs, then the forward pass works, every layer's weight fits its neighbours, the MACs
land within tolerance, the classifier keeps its outputs, and compress.save -> compress.load gives identical
outputs. Small inputs keep it fast (ViT-B/16 is built for 64x64 inputs, i.e. 4x4 patches). JBR, the product's
criterion, runs on plain and depthwise convs (resnet18, mobilenet_v2), squeeze-excitation (efficientnet_b0),
LayerNorm (convnext_tiny) and attention (vit_b_16); l1 covers resnet50 and ViT's hidden-width pruning.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import load, resolve, save
from compress.data import calibration, synthetic
from compress.prune import Target, prune

CASES = [  # arch, model kwargs, input size, criterion
    ("resnet18", {}, 64, "jbr"),
    ("resnet50", {}, 64, "l1"),
    ("mobilenet_v2", {}, 64, "jbr"),
    ("efficientnet_b0", {}, 64, "jbr"),
    ("convnext_tiny", {}, 64, "jbr"),
    ("vit_b_16", {"image_size": 64}, 64, "l1"),
    ("vit_b_16", {"image_size": 32}, 32, "jbr"),
]


def _consistent(model: nn.Module) -> None:
    """Every layer's parameters agree with its declared widths (what a broken pruning would violate)."""
    from torchvision.models.vision_transformer import VisionTransformer

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.bias.shape == m.running_mean.shape == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            assert m.weight.shape == m.bias.shape == tuple(m.normalized_shape), name
        elif isinstance(m, nn.MultiheadAttention):
            assert m.in_proj_weight.shape == (3 * m.embed_dim, m.embed_dim), name
            assert m.head_dim * m.num_heads == m.embed_dim == m.out_proj.in_features, name
        elif isinstance(m, VisionTransformer):
            assert m.hidden_dim == m.conv_proj.out_channels == m.class_token.shape[-1] == m.encoder.pos_embedding.shape[-1]


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch-pruning's "Unwrapped parameters" on ConvNeXt and ViT
@pytest.mark.parametrize("arch, kwargs, size, criterion", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_prune_torchvision_structure(arch, kwargs, size, criterion, tmp_path) -> None:
    torch.manual_seed(0)
    model = resolve(arch, "random", kwargs=kwargs, input_shape=(3, size, size)).eval()
    if arch.startswith("vit"):  # torchvision zero-initialises ViT's head: no output would depend on any channel
        nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, size, size)
    data = calibration(synthetic(8, (3, size, size), num_classes=1000), 8, 4)
    result = prune(model, data, criterion=criterion, target=Target(macs=0.7), example_inputs=x[:1], steps=1,
                   max_bisections=12, progress=False)
    pruned = result.model.eval()
    assert abs(result.macs_ratio - 0.7) <= 0.02, result.macs_ratio
    assert any(l.after < l.before for l in result.layers)
    _consistent(pruned)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    loaded = load(save(result, tmp_path / "pruned.pt"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)


def _grouped(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}


@pytest.mark.parametrize("arch", ["shufflenet_v2_x0_5", "regnet_y_400mf"])
def test_prune_shuffles_and_grouped_convs_over_several_steps(arch, tmp_path) -> None:
    """ShuffleNetV2 (channel shuffle: torch-pruning cannot trace it) prunes inside its branches and keeps every block's
    output; RegNetY's grouped convs keep their output channels (torch-pruning mistakes a grouped conv with one
    channel per group for a depthwise one). Both over several steps, and both reload to identical outputs."""
    torch.manual_seed(0)
    model = resolve(arch, "random", kwargs={"num_classes": 10}, input_shape=(3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    blocks_before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    grouped_before = _grouped(model)
    result = prune(model, synthetic(8, (3, 64, 64)), criterion="jbr", target=Target(macs=0.5), example_inputs=x[:1],
                   steps=3, calibration_samples=8, batch_size=8, progress=False)
    pruned = result.model.eval()
    assert abs(result.macs_ratio - 0.5) <= 0.02, result.macs_ratio
    _consistent(pruned)
    after = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    if arch.startswith("shufflenet"):
        last_of_branch = [n for n in after if n.endswith(("branch1.2", "branch2.5"))]
        assert last_of_branch and all(after[n] == blocks_before[n] for n in last_of_branch)
        assert any(after[n] < blocks_before[n] for n in after if n.endswith("branch2.0"))
    else:
        assert grouped_before and {n: after[n] for n in grouped_before} == grouped_before
    with torch.no_grad():
        out = pruned(x)
    loaded = load(save(result, tmp_path / "pruned.pt"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)
