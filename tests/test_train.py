"""Deterministic, cached training of the reference model on the real Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch

from compress import load
from compress.checkpoint import metadata
from compress.data import FashionMNIST, loader
from compress.evaluate import accuracy
from compress.models import make_spec, resolve
from compress import train as train_module
from compress.train import TrainConfig, cache_dir, reference_model

SMALL = TrainConfig(epochs=1, batch_size=64, train_samples=640, seed=3)
NARROW = make_spec("small_resnet", {"widths": (8, 8, 16)})


def test_training_is_deterministic_and_cached(tmp_cache, monkeypatch):
    first = reference_model(NARROW, SMALL, progress=False)
    files = list(tmp_cache.glob("*.pt"))
    assert len(files) == 1 and metadata(files[0])["train_config"]["train_samples"] == 640

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this config")

    monkeypatch.setattr(train_module, "train", must_not_train)
    cached = reference_model(NARROW, SMALL, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), cached.state_dict().values()))
    monkeypatch.undo()
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_cache / "other"))
    retrained = reference_model(NARROW, SMALL, progress=False)  # same seed, new cache: bit-identical weights
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), retrained.state_dict().values()))
    different = reference_model(NARROW, TrainConfig(epochs=1, batch_size=64, train_samples=640, seed=4), progress=False)
    assert len(list(cache_dir().glob("*.pt"))) == 2
    assert not torch.equal(different.fc.weight, first.fc.weight)


def test_damaged_cache_entry_is_retrained(tmp_cache, capsys):
    reference_model(NARROW, SMALL, progress=False)
    (entry,) = tmp_cache.glob("*.pt")
    entry.write_bytes(b"garbage")
    model = reference_model(NARROW, SMALL, progress=False)
    assert "retraining" in capsys.readouterr().out and load(entry) is not None and model is not None


def test_reference_model_reaches_90_percent():
    """The default demo model (trained once, ~3 min on 2 cores, then cached) on the 10k real test images."""
    model = resolve("small_resnet", weights="train")
    top1 = accuracy(model, loader(FashionMNIST("test"), 1000), progress=False).top1
    assert top1 >= 0.90, top1


def test_a_training_device_gets_its_own_cache_entry():
    on_gpu = TrainConfig(**{**SMALL.__dict__, "device": "cuda"})
    assert train_module.cache_key(NARROW, SMALL) != train_module.cache_key(NARROW, on_gpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_returns_the_model_where_it_was(tmp_cache):
    model = reference_model(NARROW, TrainConfig(epochs=1, batch_size=64, train_samples=640, seed=3, device="cuda"),
                            progress=False)
    assert next(model.parameters()).device.type == "cpu"
