"""Channel splits and slices (timm's MixNet, CSPNet, DPN), constant-folded layers (Swin V2) and the per-layer cap.

The MixNet-like tiny network (conv -> BN -> ReLU blocks as in MixNet) splits a tensor into two halves, each read
by its own 1x1 conv: torch-pruning 1.6 lists the halves last first and maps the second group it prunes through the split at stale offsets. The reference
for its pruned hidden channels is the dense network in float64 with those channels' next-layer columns set to zero.
"""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress import Budget, check, load, plan_bits, quantize, save
from compress.adapters import adapter_for
from compress.adapters.fixed_views import has_fixed_channel_views, is_fixed_channel_view, layers_into_fixed_views
from compress.adapters.split_order import split_outputs_in_order
from compress.capped_importance import CappedImportance
from compress.data import synthetic
from compress.prune import Target, prune
from exporters import export_onnx
from exporters.onnx_export import FOLDED


class Mixed(nn.ModuleDict):
    """timm's MixedConv2d, reduced: the input split by the plain list ``splits``, one conv per piece."""

    def __init__(self, cin: int, cout: int, groups: int = 2) -> None:
        super().__init__()
        for i in range(groups):
            self.add_module(str(i), nn.Conv2d(cin // groups, cout // groups, 1))
        self.splits = [cin // groups] * groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.splits, 1)
        return torch.cat([conv(pieces[i]) for i, conv in enumerate(self.values())], 1)


class MixedBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.pw, self.bn1, self.act = Mixed(width, hidden), nn.BatchNorm2d(hidden), nn.ReLU()
        self.pwl, self.bn2 = Mixed(hidden, width), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.pwl(self.act(self.bn1(self.pw(x)))))


class TinyMixNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(MixedBlock(8, 24), MixedBlock(8, 24))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _mixnet() -> TinyMixNet:
    torch.manual_seed(0)
    return TinyMixNet().double().eval()


def test_split_outputs_are_listed_in_the_order_of_the_pieces() -> None:
    model = _mixnet()
    graph = split_outputs_in_order(tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, 3, 8, 8, dtype=torch.float64)))
    splits = [node for node in graph.module2node.values() if node.type == tp.ops.OPTYPE.SPLIT]
    assert len(splits) == 4
    for node in splits:
        read = [[nr for fn, nr in out.grad_fn.next_functions if fn is node.grad_fn] for out in node.outputs]
        assert read == [[0], [1]]


def test_hidden_channels_through_splits_are_removed_exactly(tmp_path) -> None:
    """Only the hidden width is pruned (stem and block outputs ignored): both halves of each block lose channels
    in one step, and the pruned network equals the dense one with those channels' pwl columns zeroed."""
    dense = _mixnet()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ignored = ["stem"] + [f"blocks.{b}.pwl.{i}" for b in range(2) for i in range(2)]
    result = prune(dense, synthetic(8, (3, 8, 8)), "l1", Target(params=0.7), example_inputs=x[:1], steps=1,
                   ignored_layers=ignored, progress=False)
    pruned, reference = result.model, _mixnet()
    for block, kept in zip(reference.blocks, pruned.blocks):
        assert kept.pw.splits == [c.in_channels for c in kept.pw.values()]
        assert kept.pwl.splits == [c.in_channels for c in kept.pwl.values()] == [c.out_channels for c in kept.pw.values()]
        for half in range(2):
            rows = {tuple(r.flatten().tolist()) for r in kept.pw[str(half)].weight}
            removed = [i for i, r in enumerate(block.pw[str(half)].weight) if tuple(r.flatten().tolist()) not in rows]
            assert len(removed) == 12 - kept.pw[str(half)].out_channels
            with torch.no_grad():
                block.pwl[str(half)].weight[:, removed] = 0.0
    assert all(kept.pw[str(h)].out_channels < 12 for kept in pruned.blocks for h in range(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=0, atol=1e-10)
    reloaded = load(save(pruned, tmp_path / "mix.pt"), model=_mixnet())
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x))


def test_the_whole_mixnet_prunes_in_two_steps_and_runs() -> None:
    result = prune(_mixnet(), synthetic(8, (3, 8, 8)), "l1", Target(macs=0.5),
                   example_inputs=torch.zeros(1, 3, 8, 8, dtype=torch.float64),
                   steps=2, progress=False)
    for mixed in [m for m in result.model.modules() if isinstance(m, Mixed)]:
        assert mixed.splits == [c.in_channels for c in mixed.values()]
    assert result.macs_ratio == pytest.approx(0.5, abs=0.05)
    with torch.no_grad():
        assert result.model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 4)


class CrossStage(nn.Module):
    """timm's CSP stage, reduced: an expansion split in two equal halves by a plain attribute, one half through a
    block, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.exp = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.inner, self.inner2 = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 1)
        self.join, self.head = nn.Conv2d(16, 16, 1), nn.Linear(16, 4)
        self.expand_chs = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.exp(torch.relu(self.stem(x))).split(self.expand_chs // 2, dim=1)
        xb = xb + self.inner2(torch.relu(self.inner(xb)))
        return self.head(torch.relu(self.join(torch.cat([xs, xb], 1))).mean((2, 3)))


def test_channels_into_an_equal_split_stay_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model = CrossStage().eval()
    x = torch.zeros(1, 3, 8, 8)
    assert has_fixed_channel_views(model, x)
    kept = layers_into_fixed_views(adapter_for(model).dependency_graph(model, x))
    assert {id(m) for m in kept} == {id(model.exp), id(model.inner2)}
    result = prune(model, synthetic(8, (3, 8, 8)), "l1", Target(macs=0.7), example_inputs=x, steps=1, progress=False)
    assert result.model.exp.out_channels == 16 and result.model.inner.out_channels < 12
    with torch.no_grad():
        assert result.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_which_views_fix_channel_counts() -> None:
    x = torch.randn(1, 6, 4, 4, requires_grad=True)
    assert is_fixed_channel_view(x.split(3, dim=1)[0].grad_fn)  # equal pieces
    assert is_fixed_channel_view(x.chunk(2, dim=1)[0].grad_fn)
    assert is_fixed_channel_view(x[:, :4].grad_fn) and is_fixed_channel_view(x[:, 2:].grad_fn)  # DPN's slices
    assert not is_fixed_channel_view(x[:, :6].grad_fn)  # keeps every channel (GhostNet's [:, :out_chs])
    assert not is_fixed_channel_view(x[:, :, :2].grad_fn)  # not the channel dimension
    assert not is_fixed_channel_view(torch.split(x, [2, 4], 1)[0].grad_fn)  # sizes as a list: mapped, and synced
    sequence = torch.randn(1, 5, 6, requires_grad=True)
    assert is_fixed_channel_view(sequence[..., :3].grad_fn) and not is_fixed_channel_view(sequence[:, :3].grad_fn)


def test_capped_importance_keeps_the_best_share_of_every_group() -> None:
    class Fixed(tp.importance.Importance):
        def __call__(self, group):
            return torch.tensor([0.5, 0.1, 0.4, 0.3, 0.2, 0.0, 0.6, 0.7, 0.9, 0.8])

    scores = CappedImportance(Fixed(), max_ratio=0.75)(None)
    assert torch.isinf(scores).nonzero().flatten().tolist() == [7, 8, 9]  # the best ceil(0.25 * 10) = 3
    assert scores[:7].tolist() == pytest.approx([0.5, 0.1, 0.4, 0.3, 0.2, 0.0, 0.6])
    assert torch.isinf(CappedImportance(Fixed(), max_ratio=1.0)(None)).sum() == 1  # always one channel left


def test_a_layer_scored_low_everywhere_is_capped_not_skipped() -> None:
    """One layer's channels all score below every other: torch-pruning's global ranking alone skips it (all its
    channels under the threshold); capped, it loses at most max_layer_ratio of them and the rest is removed
    elsewhere, so MACs fall as the channel ratio grows."""

    class LowFirstLayer(tp.importance.Importance):
        def __call__(self, group):
            scores = torch.arange(len(group[0].idxs), dtype=torch.float32)  # pruning works on a copy: match by name
            return scores * 1e-6 if group[0].dep.target.name.startswith("blocks.0.pw.0 ") else scores + 1.0

    torch.manual_seed(0)
    model = _mixnet().float()
    result = prune(model, synthetic(8, (3, 8, 8)), LowFirstLayer(), Target(macs=0.5), example_inputs=torch.zeros(1, 3, 8, 8),
                   steps=1, max_layer_ratio=0.5, tolerance=0.05, progress=False)
    assert result.model.blocks[0].pw["0"].out_channels == 6  # capped at half of 12
    assert result.macs_ratio == pytest.approx(0.5, abs=0.05)


class ConstantTable(nn.Module):
    """A layer on a constant table added to every sample, as Swin V2's position-bias MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(1, 16))
        self.table_mlp, self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.flatten(1)) + self.table_mlp(self.table)))


def test_a_layer_on_constants_is_folded_and_listed(tmp_path) -> None:
    torch.manual_seed(0)
    model = ConstantTable().eval()
    x = torch.randn(1, 1, 4, 4)
    data = synthetic(16, (1, 4, 4))
    q = quantize(model, plan_bits(model, data, budget=Budget(avg_bits=8), example_inputs=x))
    result = export_onnx(q, x, tmp_path / "table.onnx")
    assert result.float_layers["table_mlp"] == FOLDED
    assert "fc" in {layer.name for layer in result.packed}
    assert check(result.path, reference=q, data=[torch.randn(4, 1, 4, 4)], latency_runs=1, batch_sizes=(1,)).passed
