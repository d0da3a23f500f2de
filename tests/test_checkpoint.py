"""Pickle-free save/load: plain, torchvision and pruned models round-trip; unsafe or broken files are refused."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from compress import CompressError, load, resolve, save
from compress.checkpoint import read_state_dict
from compress.models import attach_spec, spec_of


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 1, 28, 28)) -> bool:
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_round_trip_small_resnet(tmp_path):
    model = resolve("small_resnet")
    path = save(model, tmp_path / "m.pt", metadata={"note": "x"})
    loaded = load(path)
    assert _same_outputs(model, loaded) and spec_of(loaded) == spec_of(model)


def test_round_trip_unrecorded_torchvision_module(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)  # built by the user, not by us
    loaded = load(save(model, tmp_path / "r18.pt"))
    assert spec_of(loaded).arch == "resnet18" and spec_of(loaded).kwargs == {"num_classes": 7}
    assert _same_outputs(model, loaded, (1, 3, 64, 64))


def test_unknown_module_cannot_be_saved(tmp_path):
    with pytest.raises(CompressError, match="cannot tell which architecture"):
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_pruned_model_is_rebuilt_from_its_history(tmp_path):
    model = resolve("small_resnet")
    x = torch.randn(1, 1, 28, 28)
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.4,
                                  global_pruning=True, ignored_layers=[model.fc])
    pruner.step()
    history = pruner.pruning_history()
    attach_spec(model, replace(spec_of(model), pruning_history=tuple((n, o, tuple(i)) for n, o, i in history)))
    loaded = load(save(model, tmp_path / "pruned.pt"))
    assert loaded.conv1.out_channels == model.conv1.out_channels < 16
    assert _same_outputs(model, loaded)


def test_save_never_overwrites_and_is_atomic(tmp_path, monkeypatch):
    model = resolve("small_resnet")
    path = save(model, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(CompressError, match="already exists"):
        save(model, path)
    assert path.read_bytes() == before

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "new.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no target, no temp file left


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)  # torch.save pickles; the payload runs on unpickle
    with pytest.raises(CompressError, match="refusing to load"):
        load(path)
    with pytest.raises(CompressError, match="refusing to load"):
        resolve("small_resnet", weights=str(path))
    assert not (tmp_path / "pwned").exists()


def test_corrupt_and_missing_checkpoints(tmp_path):
    good = save(resolve("small_resnet"), tmp_path / "m.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CompressError, match="corrupt"):
        load(bad)
    with pytest.raises(CompressError, match="does not exist"):
        load(tmp_path / "nope.pt")


def test_bare_state_dict_is_weights_not_a_model(tmp_path):
    model = resolve("small_resnet")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CompressError, match="not a compress checkpoint"):
        load(tmp_path / "sd.pth")
    again = resolve("small_resnet", weights=str(tmp_path / "sd.pth"))
    assert _same_outputs(model, again)
    assert set(read_state_dict(tmp_path / "sd.pth")) == set(model.state_dict())
    with pytest.raises(CompressError, match="does not fit"):
        resolve("small_resnet", weights=str(tmp_path / "sd.pth"), kwargs={"widths": (8, 16, 32)})


def test_state_dict_versions_survive_the_round_trip(tmp_path) -> None:
    """torchvision's MNASNet reads its state_dict version on load (and refuses None): the versions are saved."""
    model = resolve("mnasnet0_5", kwargs={"num_classes": 10}, input_shape=(3, 64, 64)).eval()
    loaded = load(save(model, tmp_path / "mnasnet.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
