"""Transformers with hand-written attention: only the MLP hidden channels are pruned, exactly as removing them would.

A tiny ViT whose attention reshapes ``qkv`` into heads (as timm's and torchvision's Swin do) is pruned with ``l1``;
the reference is the dense model in float64 with the removed hidden units' ``fc2`` columns set to zero.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import load, save
from compress.adapters import adapter_for
from compress.adapters.mlp_scope import mlp_expansions, unprunable_attention
from compress.data import synthetic
from compress.prune import Target, prune


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads=2)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def _tiny() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().double().eval()


def test_only_the_mlps_first_layers_are_in_scope() -> None:
    model = _tiny()
    assert unprunable_attention(model) == ["blocks.0.attn", "blocks.1.attn"]
    graph = adapter_for(model).dependency_graph(model, torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    assert {id(m) for m in mlp_expansions(graph)} == {id(b.mlp.fc1) for b in model.blocks}


def test_pruning_removes_mlp_hidden_units_exactly(tmp_path) -> None:
    dense = _tiny()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    result = prune(dense, synthetic(8, (3, 16, 16)), "l1", Target(macs=0.8), example_inputs=x[:1], steps=1,
                   progress=False)
    pruned = result.model
    reference = _tiny()
    for block, kept_block in zip(reference.blocks, pruned.blocks):
        assert kept_block.attn.qkv.weight.shape == block.attn.qkv.weight.shape  # attention and width untouched
        rows = {tuple(r.tolist()) for r in kept_block.mlp.fc1.weight}
        removed = [i for i, r in enumerate(block.mlp.fc1.weight) if tuple(r.tolist()) not in rows]
        assert len(removed) == block.mlp.fc1.out_features - kept_block.mlp.fc1.out_features
        with torch.no_grad():
            block.mlp.fc2.weight[:, removed] = 0.0
    assert sum(b.mlp.fc1.out_features for b in pruned.blocks) < sum(b.mlp.fc1.out_features for b in reference.blocks)
    assert result.macs_ratio == pytest.approx(0.8, abs=0.05)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=0, atol=1e-10)
    path = save(pruned, tmp_path / "tiny_vit.pt")
    reloaded = load(path, model=_tiny())
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x))


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin_prunes_its_mlps_and_reloads(version, tmp_path) -> None:
    """torchvision's Swin (window attention via reshapes and rolls; a small one, same code) prunes only MLP hidden
    channels, quietly (torch-pruning's shape-inference note is silenced), and replays onto a fresh instance. V2's
    position-bias MLP runs on a coordinate table, not per sample: JBR leaves it ungated and it stays unpruned."""
    from torchvision.models import swin_transformer as swin

    extra = {} if version == 1 else {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}

    def build() -> nn.Module:
        torch.manual_seed(0)
        return swin.SwinTransformer([4, 4], 16, [1, 1, 1, 1], [2, 2, 2, 2], [4, 4], num_classes=10, **extra).eval()

    dense = build()
    hidden = [m.out_features for n, m in dense.named_modules() if n.endswith("mlp.0")]
    result = prune(dense, synthetic(8, (3, 32, 32)), "jbr", Target(macs=0.8), example_inputs=torch.zeros(1, 3, 32, 32),
                   steps=1, progress=False)
    widths = {n: (m.in_features, m.out_features) for n, m in result.model.named_modules() if isinstance(m, nn.Linear)}
    assert all(widths[n] == (m.in_features, m.out_features) for n, m in dense.named_modules()
               if isinstance(m, nn.Linear) and not n.endswith(("mlp.0", "mlp.3")))
    assert sum(w for n, (_, w) in widths.items() if n.endswith("mlp.0")) < sum(hidden)
    assert result.macs_ratio == pytest.approx(0.8, abs=0.05)
    x = torch.randn(2, 3, 32, 32)
    reloaded = load(save(result.model, tmp_path / "swin.pt"), model=build())
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_opaque_patch_merging_matches_torchvision_in_float64() -> None:
    """The node Swin's patch merging becomes while torch-pruning traces: same values, same gradients (odd sizes
    included: the merge pads), and torchvision's function is back afterwards."""
    from torchvision.models import swin_transformer

    from compress.adapters.swin import _PatchMerge, opaque_patch_merging

    original = swin_transformer._patch_merging_pad
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    model = swin_transformer.swin_t()
    with opaque_patch_merging(model):
        assert swin_transformer._patch_merging_pad is not original
        assert torch.equal(swin_transformer._patch_merging_pad(x), original(x))
        assert torch.autograd.gradcheck(_PatchMerge.apply, (x,))
    assert swin_transformer._patch_merging_pad is original
