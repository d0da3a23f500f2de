"""Evaluation feeds each model its own device and floating dtype, so a bfloat16 model takes float32 batches."""

from __future__ import annotations

import copy

import torch

from compress import resolve
from compress.data import synthetic
from compress.evaluate import compare, predict


def test_a_bfloat16_model_takes_float32_batches() -> None:
    model = resolve("small_resnet", kwargs={"widths": (8, 8, 16)}).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    x = synthetic(16).tensors[0]
    with torch.no_grad():
        out = predict(half, x)
        assert out.dtype == torch.bfloat16 and predict(model, x).dtype == torch.float32
        c = compare(half, model, [(x, torch.zeros(16, dtype=torch.long))])
        assert c.agreement >= 0.75 and 0 < c.mse < float(model(x).pow(2).sum(1).mean())
