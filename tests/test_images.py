"""Unreadable images in an ImageNet-layout folder: skipped, counted and listed up to 1% of a split; above that, one
line and exit 2 before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compress.data import image_folder
from compress.errors import CompressError
from compress.images import scan
from compress.recipe.__main__ import main


def _folder(root: Path, good: int, split: str = "val") -> list[Path]:
    """``good`` small JPEGs over two classes, plus a truncated JPEG and a text file named .JPEG; returns the bad two."""
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / split / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG", quality=90)
    truncated, text = root / split / "class0" / "truncated.JPEG", root / split / "class1" / "notes.JPEG"
    whole = (root / split / "class0" / "0.JPEG").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])  # passes PIL's verify(); only decoding finds it
    text.write_text("not an image")
    scan.cache_clear()
    return [truncated, text]


def test_unreadable_images_are_dropped_and_listed(tmp_path) -> None:
    bad = _folder(tmp_path, good=250)
    dataset = image_folder(tmp_path, "val", image_size=32)
    assert len(dataset) == 250 and {u.path for u in dataset.unreadable} == {str(p) for p in bad}
    reasons = {Path(u.path).name: u.reason for u in dataset.unreadable}
    assert "truncated" in reasons["truncated.JPEG"] and "UnidentifiedImageError" in reasons["notes.JPEG"]
    x, label = dataset[0]
    assert tuple(x.shape) == (3, 32, 32) and label in (0, 1)


def test_more_than_one_percent_unreadable_is_one_line(tmp_path) -> None:
    _folder(tmp_path, good=20)
    with pytest.raises(CompressError, match=r"2 of 22 images in .* cannot be read \(9\.1% > 1%") as err:
        image_folder(tmp_path, "val", image_size=32)
    assert len(str(err.value).splitlines()) == 1


RUN = ["resnet50_jbr", "--weights", "random", "--no-progress", "--set", "model.arch=resnet18", "--set",
       "model.image_size=32", "--set", "prune.enabled=false", "--set", "quantize.enabled=false", "--set",
       "recover.distill_steps=0", "--set", "export.int8_activations=false", "--set", "data.calibration_samples=16",
       "--set", "data.recalibration_samples=16", "--set", "data.eval_samples=32", "--set", "data.workers=0",
       "--set", "check.samples=16", "--set", "check.latency_runs=1", "--set", "check.max_top1_drop=none"]


def test_recipe_lists_the_skipped_images(tmp_path) -> None:
    bad = _folder(tmp_path / "data", good=250)
    out = tmp_path / "run"
    assert main([*RUN, "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p for p, _ in report["data"]["unreadable_images"]) == sorted(str(p) for p in bad)
    text = (out / "report.md").read_text()
    assert "## Unreadable images skipped (2)" in text and "truncated.JPEG" in text


def test_recipe_stops_before_work_when_a_split_is_unreadable(tmp_path, capsys) -> None:
    _folder(tmp_path / "data", good=20)
    out = tmp_path / "run"
    assert main([*RUN, "--data", str(tmp_path / "data"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be read" in err and len(err.splitlines()) == 1 and not out.exists()
