"""The embedded Fashion-MNIST (real files from the Debian package), ImageFolder and calibration loaders."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from compress import CompressError
from compress.data import (FASHION_MNIST_FILES, FashionMNIST, calibration, fashion_mnist_dir, image_folder, inputs_of,
                           iter_inputs, loader, synthetic)


def test_fashion_mnist_is_the_real_data_set():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the published test set is balanced
    xs, _ = train.__getitems__(list(range(2000)))
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05  # normalised with the published stats


def test_batched_fetch_equals_item_fetch_and_upsampled_variant():
    ds = FashionMNIST("test", channels=3, image_size=32)
    xs, ys = ds.__getitems__([3, 7])
    assert xs.shape == (2, 3, 32, 32)
    assert torch.equal(xs[1], ds[7][0]) and ys.tolist() == [ds[3][1], ds[7][1]]
    batch = next(iter(loader(Subset(ds, [3, 7, 9]), batch_size=3)))
    assert torch.equal(batch[0][:2], xs)


def test_missing_data_folder_names_the_fix(tmp_path):
    with pytest.raises(CompressError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir(tmp_path)


def test_corrupt_data_file_is_reported(tmp_path):
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            (tmp_path / name).write_bytes(b"not gzip")
    with pytest.raises(CompressError, match="cannot read"):
        FashionMNIST("test", tmp_path)


def test_inconsistent_data_files_are_reported(tmp_path):
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            with gzip.open(tmp_path / name, "wb") as fh:
                fh.write(bytes(16) + bytes(28 * 28 * 2 if "images" in name else 3))
    with pytest.raises(CompressError, match="disagree"):
        FashionMNIST("train", tmp_path)


def test_calibration_is_label_free_seeded_and_sized():
    ds = FashionMNIST("train")
    calib = calibration(ds, num_samples=100, batch_size=32, seed=1)
    batches = list(calib)
    assert [len(b) for b in batches] == [32, 32, 32, 4] and len(calib) == 4
    assert all(isinstance(b, torch.Tensor) for b in batches)  # inputs only, no labels
    again = torch.cat(list(calibration(ds, 100, 32, seed=1)))
    other = torch.cat(list(calibration(ds, 100, 32, seed=2)))
    assert torch.equal(torch.cat(batches), again) and not torch.equal(again, other)
    assert torch.equal(torch.cat(list(calib)), again)  # re-iterable


def test_calibration_from_a_batch_iterable_stops_at_n():
    batches = [(torch.randn(8, 2), torch.zeros(8)) for _ in range(5)]
    got = list(calibration(batches, num_samples=20, batch_size=8))
    assert [len(b) for b in got] == [8, 8, 4]
    with pytest.raises(CompressError):
        calibration(batches, num_samples=0)


def test_inputs_of_accepts_tensors_pairs_and_named_tensors():
    x = torch.zeros(2, 3)
    assert inputs_of(x) is x and inputs_of((x, torch.zeros(2))) is x
    assert len(list(iter_inputs(loader(synthetic(10), 4)))) == 3
    assert inputs_of({"image": x, "labels": torch.zeros(2)}) == {"image": x}  # labels are not inputs
    for bad in ({"labels": torch.zeros(2)}, {"text": "a"}, "a", [1, 2]):
        with pytest.raises(CompressError, match="no input tensor"):
            inputs_of(bad)


def _write_png(path, value: int) -> None:
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(path)


def test_image_folder_reads_imagenet_layout(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            _write_png(tmp_path / "val" / cls / f"{i}.png", value)
    ds = image_folder(tmp_path, image_size=32)
    x, y = ds[3]
    assert len(ds) == 4 and ds.classes == ["cat", "dog"] and x.shape == (3, 32, 32) and y == 1
    assert x[0].mean() > 0  # bright image above the ImageNet mean after normalisation


def test_image_folder_errors(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        image_folder(tmp_path / "nope")
    with pytest.raises(CompressError, match="not an image folder"):
        image_folder(tmp_path)


def test_loader_workers_never_exceed_the_cores(tmp_path):
    import warnings

    from compress.data import available_cores

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        _write_png(tmp_path / c / "x.png", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the DataLoader warns when asked for more workers than cores
        batches = list(loader(image_folder(tmp_path, None, image_size=32), 2, workers=available_cores() + 6))
    assert len(batches) == 1 and loader(image_folder(tmp_path, None, image_size=32), 2, workers=64).num_workers <= available_cores()
