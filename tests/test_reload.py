"""Any nn.Module reloads: a user's own class, pruned (and quantized) by compress, is saved with its pruning history
and rebuilt by ``compress.load(path, model=Fresh())``; without ``model=`` or with the wrong one, a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import Budget, CompressError, Target, load, plan_bits, prune, quantize, resolve, save
from compress.data import synthetic
from compress.models import spec_of
from compress.small_resnet import SmallResNet

SHAPE = (3, 16, 16)


class UserNet(nn.Module):
    """A small CNN no builder knows (not torchvision, not small_resnet)."""

    def __init__(self, width: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width, 24), nn.ReLU(), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class OtherNet(UserNet):
    pass


def _user_net() -> UserNet:
    torch.manual_seed(0)
    net = UserNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding and replay are really exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def pruned():
    return prune(_user_net(), synthetic(32, SHAPE, num_classes=5), criterion="l1", target=Target(macs=0.5), steps=2,
                 example_inputs=torch.zeros(1, *SHAPE), progress=False)


def _same(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_pruned_user_model_records_a_user_spec(pruned):
    spec = spec_of(pruned.model)
    assert spec.is_user and spec.arch.endswith(".UserNet") and spec.kwargs == {} and spec.weights == "user"
    assert spec.input_shape == SHAPE and len(spec.pruning_history) == len(pruned.history) > 0
    assert pruned.model.features[0].out_channels < 16


def test_pruned_user_model_reloads_onto_a_fresh_instance(pruned, tmp_path):
    path = save(pruned, tmp_path / "user.pt")
    record = torch.load(path, weights_only=True)  # plain data only
    assert record["spec"]["arch"].startswith("user:")
    loaded = load(path, model=UserNet())
    assert loaded.features[0].out_channels == pruned.model.features[0].out_channels
    assert _same(loaded, pruned.model) and spec_of(loaded) == spec_of(pruned.model)


def test_quantized_user_model_reloads(pruned, tmp_path):
    data = synthetic(32, SHAPE, num_classes=5)
    plan = plan_bits(pruned.model, data, Budget(avg_bits=6), candidates=(4, 8, 16), example_inputs=torch.zeros(1, *SHAPE),
                     calibration_samples=32, probes=1)
    q = quantize(pruned.model, plan)
    spec = spec_of(q)
    assert spec.is_user and spec.quantization and spec.pruning_history == spec_of(pruned.model).pruning_history
    loaded = load(save(q, tmp_path / "q.pt"), model=UserNet())
    assert _same(loaded, q)


def test_unpruned_user_model_quantized_then_reloaded(tmp_path):
    net = _user_net()
    plan = plan_bits(net, synthetic(32, SHAPE, num_classes=5), Budget(avg_bits=6), candidates=(4, 8, 16),
                     example_inputs=torch.zeros(1, *SHAPE), calibration_samples=32, probes=1)
    q = quantize(net, plan)
    assert _same(load(save(q, tmp_path / "q.pt"), model=UserNet()), q)


def test_plain_user_model_saves_with_an_input_shape(tmp_path):
    net = _user_net()
    with pytest.raises(CompressError, match=r"cannot tell which architecture.*model=UserNet"):
        save(net, tmp_path / "plain.pt")
    loaded = load(save(net, tmp_path / "plain.pt", input_shape=SHAPE), model=UserNet())
    assert _same(loaded, net) and spec_of(loaded).input_shape == SHAPE


def test_load_without_model_says_to_pass_one(pruned, tmp_path):
    path = save(pruned, tmp_path / "user.pt")
    with pytest.raises(CompressError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and "holds a user model" in message and "UserNet" in message
    assert "cannot be rebuilt from its name" in message and "model=UserNet()" in message


def test_wrong_model_is_a_one_line_error(pruned, tmp_path):
    path = save(pruned, tmp_path / "user.pt")
    with pytest.raises(CompressError, match="OtherNet.*UserNet") as err:
        load(path, model=OtherNet())
    assert "\n" not in str(err.value)
    with pytest.raises(CompressError, match="does not") as err:  # right class, other shapes
        load(path, model=UserNet(width=24))
    assert "\n" not in str(err.value)
    with pytest.raises(CompressError, match="already pruned"):
        load(path, model=load(path, model=UserNet()))


def test_known_architecture_accepts_model(tmp_path):
    small = resolve("small_resnet")
    result = prune(small, synthetic(32), criterion="l1", target=Target(macs=0.6), steps=1, progress=False)
    path = save(result, tmp_path / "small.pt")
    assert _same_small(load(path, model=SmallResNet()), result.model)
    assert _same_small(load(path), result.model)


def _same_small(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_load_inside_no_grad(tmp_path):
    """A pruned checkpoint loads inside torch.no_grad() (evaluation code often wraps everything in it), although
    torch-pruning's replay traces through autograd."""
    small = resolve("small_resnet")
    pruned = prune(small, synthetic(32), "l1", Target(macs=0.6), steps=1, progress=False).model
    path = save(pruned, tmp_path / "p.pt")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load(path)(x), pruned.eval()(x))
