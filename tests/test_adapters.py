"""Model adapters: the pipeline learns what a model is only through its adapter; prune takes any Importance."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import criteria
from compress import CompressError, resolve
from compress.adapters import ImageClassifierAdapter, adapter_for, adapters_registered, register, unregister
from compress.data import synthetic
from compress.evaluate import compare, predict
from compress.prune import Target, prune


class TwoHeads(nn.Module):
    """A user model: a CNN with an auxiliary head whose width must not change, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.aux = nn.Conv2d(32, 8, 1)  # a side output a downstream system reads: never pruned
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.head(self.pool(h).flatten(1)), "aux": self.aux(h)}


class TwoHeadsAdapter(ImageClassifierAdapter):
    name = "two-heads"

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, TwoHeads)

    def example_inputs(self, model, batch=1, device=None):
        return torch.zeros(batch, 1, 12, 12)

    def forward(self, model, inputs):
        return model(inputs.to(next(model.parameters()).device))["logits"]

    def never_pruned(self, model):
        return [model.head, model.aux]


class CountingL1(tp.importance.GroupMagnitudeImportance):
    """A user's own criterion: torch-pruning's group L1 that counts the groups it scored."""

    def __init__(self) -> None:
        super().__init__(p=1)
        self.calls = 0

    def __call__(self, group):
        self.calls += 1
        return super().__call__(group)


def tiny_aux() -> TwoHeads:
    """TwoHeads whose aux head has the smallest L1 norms, so any adapter that lets it be pruned loses it first."""
    model = TwoHeads().eval()
    with torch.no_grad():
        model.aux.weight.mul_(1e-3)
    return model


@pytest.fixture
def two_heads_adapter():
    adapter = register(TwoHeadsAdapter())
    yield adapter
    unregister(adapter.name)


def test_any_module_gets_the_image_adapter_and_a_one_line_error_without_inputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    adapter = adapter_for(model)
    assert isinstance(adapter, ImageClassifierAdapter)
    assert adapter.identify(model) is None
    with pytest.raises(CompressError, match="cannot infer the input shape") as err:
        adapter.example_inputs(model)
    assert "\n" not in str(err.value)


def test_image_adapter_knows_the_demo_network() -> None:
    model = resolve("small_resnet")
    adapter = adapter_for(model)
    assert adapter.never_pruned(model) == [model.fc]
    assert adapter.example_inputs(model).shape == (1, 1, 28, 28)
    assert adapter.round_to(model) is None
    assert adapter.input_spec(model).names == ("input",)


def test_vit_heads_fix_the_channel_multiple() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    adapter = adapter_for(vit)
    assert adapter.round_to(vit) == 4
    assert set(adapter.attention_heads(vit).values()) == {4}


def test_registered_adapter_decides_what_prune_keeps_and_how_outputs_are_read(two_heads_adapter) -> None:
    model = tiny_aux()
    assert adapter_for(model) is two_heads_adapter and adapters_registered()[0] is two_heads_adapter
    data = synthetic(32, (1, 12, 12))
    result = prune(model, data, criterion="l1", target=Target(params=0.7), steps=2, progress=False)
    assert result.model.aux.out_channels == 8 and result.model.head.out_features == 10
    assert result.model.body[0].out_channels < 16 or result.model.body[3].out_channels < 32
    x = torch.randn(4, 1, 12, 12)
    assert predict(result.model, x).shape == (4, 10)
    assert compare(result.model, model, [(x, torch.zeros(4, dtype=torch.long))]).total == 4


def test_without_its_adapter_the_aux_head_is_pruned() -> None:
    """The control of the test above: the catch-all adapter keeps only the last Linear, so aux shrinks."""
    model = tiny_aux()
    result = prune(model, synthetic(32, (1, 12, 12)), criterion="l1", target=Target(params=0.5), steps=2,
                   example_inputs=torch.zeros(1, 1, 12, 12), progress=False)
    assert result.model.aux.out_channels < 8


def test_adapter_names_are_unique(two_heads_adapter) -> None:
    with pytest.raises(CompressError, match="already registered"):
        register(TwoHeadsAdapter())
    with pytest.raises(CompressError, match="cannot be removed"):
        unregister(ImageClassifierAdapter.name)


def test_prune_takes_a_users_own_importance_object() -> None:
    small = resolve("small_resnet")
    importance = CountingL1()
    result = prune(small, synthetic(64), criterion=importance, target=Target(macs=0.6), steps=2, progress=False)
    assert importance.calls > 0
    assert result.criterion == "CountingL1"
    assert abs(result.macs_ratio - 0.6) <= 0.02
    reference = prune(small, synthetic(64), criterion="l1", target=Target(macs=0.6), steps=2, progress=False)
    assert [l.after for l in result.layers] == [l.after for l in reference.layers]  # same scores, same channels


def test_prune_refuses_a_criterion_that_is_neither_a_name_nor_an_importance() -> None:
    with pytest.raises(CompressError, match="registered name or a torch-pruning Importance"):
        prune(resolve("small_resnet"), synthetic(16), criterion=42, target=Target(macs=0.6), progress=False)
    with pytest.raises(CompressError, match="criterion_options apply to a criterion given by name"):
        prune(resolve("small_resnet"), synthetic(16), criterion=CountingL1(), criterion_options={"p": 2},
              target=Target(macs=0.6), progress=False)


def test_a_registered_criterion_prunes_by_name() -> None:
    criteria.register("counting-l1", CountingL1, "group L1, counted")
    try:
        assert "counting-l1" in criteria.names()
        result = prune(resolve("small_resnet"), synthetic(64), criterion="counting-l1", target=Target(macs=0.6),
                       steps=2, progress=False)
        assert result.criterion == "counting-l1" and abs(result.macs_ratio - 0.6) <= 0.02
    finally:
        from criteria import registry

        registry._REGISTRY.pop("counting-l1", None)


def test_traceable_shufflenet_block_matches_torchvision_in_float64() -> None:
    """The opaque split / concatenation / shuffle nodes torch-pruning traces compute exactly torchvision's block,
    and their backward passes are the true gradients (gradcheck in float64)."""
    from torchvision.models.shufflenetv2 import InvertedResidual

    from compress.adapters.shuffle import _CatShuffle, _HalfOf, opaque_shuffle

    torch.manual_seed(0)
    original = InvertedResidual.forward
    for stride, channels in ((1, 8), (2, 4)):
        block = InvertedResidual(channels, 8, stride).double().eval()
        x = torch.randn(2, channels, 6, 6, dtype=torch.float64)
        expected = block(x)
        with opaque_shuffle(block):
            got = block(x)
            assert "CatShuffle" in type(got.grad_fn).__name__  # one opaque node, as torch-pruning sees it
        assert torch.equal(got, expected) and InvertedResidual.forward is original
    a, b = (torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_CatShuffle.apply, (a, b))
    assert torch.autograd.gradcheck(lambda t: _HalfOf.apply(t, 1), (torch.randn(2, 8, 3, 3, dtype=torch.float64,
                                                                               requires_grad=True),))
