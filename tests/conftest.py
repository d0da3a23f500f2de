"""Shared fixtures: a per-test cache folder unless a test asks for the real one, seeded torch, the tiny CNN."""

from __future__ import annotations

import pytest
import torch
from tiny_resnet import batches, tiny  # noqa: F401  (fixtures: the float64 tiny residual CNN and its batches)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty model cache, so a test sees a first run."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_CACHE", str(folder))
    return folder
