"""Whole-model latency as deployed: export fp32 ONNX to a temp file and time it in onnxruntime on this machine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def onnx_latency_ms(model: nn.Module, example_inputs: torch.Tensor, *, batch_size: int = 1, runs: int = 20,
                    threads: int = 2, **export_options: Any) -> float:
    """Median milliseconds per onnxruntime CPU run of ``model`` exported by ``export_onnx`` (fp32, BN folded, unless
    ``export_options`` say otherwise, e.g. ``activations="int8"``) on a batch of ``batch_size`` inputs shaped like
    ``example_inputs``, after warm-up, with ``threads`` intra-op threads."""
    from exporters import export_onnx
    from exporters.check import input_spec, open_session, session_latency_ms

    with tempfile.TemporaryDirectory(prefix="compress-latency-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, example_inputs[:1].detach().cpu(), path, **export_options)
        session, _ = open_session(path, threads)
        name, shape = input_spec(session)
        return session_latency_ms(session, name, shape, batch_size, runs)
