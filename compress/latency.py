"""Whole-model latency: as deployed on the CPU (export ONNX to a temp file, time it in onnxruntime), or eager
PyTorch on the model's own device (a GPU)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters import export_onnx
from exporters.check import open_runner
from exporters.runtimes import latency_ms

from .batches import first_rows, is_named, map_tensors


def onnx_latency_ms(model: nn.Module, example_inputs: Any, *, batch_size: int = 1, runs: int = 20,
                    threads: int = 2, **export_options: Any) -> float:
    """Median milliseconds per onnxruntime CPU run of ``model`` exported by ``export_onnx`` (fp32, BN folded, unless
    ``export_options`` say otherwise, e.g. ``activations="int8"``) on a batch of ``batch_size`` inputs shaped like
    ``example_inputs``, after warm-up, with ``threads`` intra-op threads."""
    with tempfile.TemporaryDirectory(prefix="compress-latency-") as folder:
        path = Path(folder) / "model.onnx"
        example = map_tensors(first_rows(example_inputs, 1), lambda t: t.detach().cpu())
        export_onnx(model, example, path, **export_options)
        feed = {k: v.numpy() for k, v in example.items()} if is_named(example) else None  # token ids: time these
        return latency_ms(open_runner(path, "onnxruntime", threads), batch_size, runs, feed)


@torch.no_grad()
def torch_latency_ms(model: nn.Module, example_inputs: torch.Tensor, *, batch_size: int = 1, runs: int = 30,
                     warmup: int = 5) -> float:
    """Median milliseconds per eager forward of ``model`` on a batch of ``batch_size`` random inputs shaped like
    ``example_inputs``, on the model's device and floating dtype (CUDA: each run timed with CUDA events)."""
    first = next(model.parameters())
    x = torch.randn(batch_size, *example_inputs.shape[1:], device=first.device, dtype=first.dtype)
    cuda = first.device.type == "cuda"
    times = []
    for i in range(warmup + runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model(x)
            elapsed = 1000 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)
