"""Recovery: BN recalibration re-estimates statistics label-free; distillation is deterministic and pulls the
student towards the teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress import CompressError, resolve
from compress.data import synthetic, loader
from compress.recover import distill, recalibrate_bn


def _assert_stem_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """The stem BatchNorm's running statistics are those of its inputs on ``x``."""
    with torch.no_grad():
        stem = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.bn1.running_var, stem.var((0, 2, 3)), atol=1e-3, rtol=1e-3)


def test_recalibration_matches_the_data_statistics():
    model = resolve("small_resnet").eval()
    x = torch.randn(64, 1, 28, 28) * 3 + 1
    recalibrate_bn(model, [x[:32], x[32:]], progress=False)
    _assert_stem_statistics(model, x)
    assert model.bn1.momentum == 0.1 and not model.training  # settings restored
    try:
        recalibrate_bn(model, [], progress=False)
    except CompressError as err:
        assert "no data" in str(err)
    else:
        raise AssertionError("empty data must be refused")


def test_distillation_is_deterministic_and_reduces_the_gap():
    torch.manual_seed(0)
    teacher = resolve("small_resnet", kwargs={"widths": (8, 8, 16)}).eval()
    student0 = resolve("small_resnet", kwargs={"widths": (4, 8, 8)}).eval()
    data = loader(synthetic(64), 32)
    runs = []
    for _ in range(2):
        student = copy.deepcopy(student0)
        losses = distill(student, teacher, data, steps=30, lr=3e-3, seed=1, progress=False)
        runs.append((losses, student))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].state_dict().values(), runs[1][1].state_dict().values()))
    assert sum(runs[0][0][-5:]) < sum(runs[0][0][:5])
    assert not teacher.training and isinstance(teacher.fc, nn.Linear)


def test_recalibration_forgets_stale_statistics():
    """A model whose BN statistics came from other data (a pruned network's, or a trained one's) ends with exactly
    the new data's statistics: the old running averages and their batch counts are reset first."""
    model = resolve("small_resnet").eval()
    recalibrate_bn(model, [torch.randn(64, 1, 28, 28) * 10 - 5] * 3, progress=False)  # stale: other data, 3 batches
    x = torch.randn(64, 1, 28, 28) * 3 + 1
    recalibrate_bn(model, [x[:32], x[32:]], progress=False)
    _assert_stem_statistics(model, x)
    assert int(model.bn1.num_batches_tracked) == 2


def test_distillation_loss_is_t_squared_kl():
    """The first loss is T²·KL(softmax(t/T) || softmax(s/T)) of the untrained student (Hinton et al. 2015: the T²
    keeps the soft-target gradients' scale independent of T)."""
    torch.manual_seed(0)
    teacher = resolve("small_resnet", kwargs={"widths": (8, 8, 16)}).eval()
    student = resolve("small_resnet", kwargs={"widths": (8, 8, 16)}).eval()
    x = torch.randn(16, 1, 28, 28)
    for temperature in (2.0, 4.0):
        s = copy.deepcopy(student)
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(x) / temperature, 1)
            s.train()
            s_logp = torch.log_softmax(s(x) / temperature, 1)  # distill's first forward, in train mode
        s = copy.deepcopy(student)
        expected = temperature**2 * float((t_logp.exp() * (t_logp - s_logp)).sum(1).mean())
        loss = distill(s, teacher, [x], steps=1, temperature=temperature, progress=False)[0]
        assert abs(loss - expected) <= 1e-5 * max(1.0, expected), (temperature, loss, expected)
