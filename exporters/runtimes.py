"""The runtimes an ONNX file is checked in: onnxruntime (the default) and OpenVINO (the ``openvino`` extra).

A runner maps one float32 input batch to the first output, knows the file's input name and shape (None for a
dynamic dimension), and says whether it applied the session options the file wants (:func:`open_session`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.errors import CompressError

WARMUP_RUNS = 3
RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class Runner:
    """``runner(x)`` -> the first output of the file on the float32 batch ``x``."""

    runtime: str
    input_name: str
    input_shape: tuple[int | None, ...]
    run: Callable[[np.ndarray], np.ndarray]
    tuned: bool = False  # session options beyond the runtime's defaults were applied

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def onnxruntime_runner(session: Any, tuned: bool) -> Runner:
    """A runner over an onnxruntime ``InferenceSession``."""
    meta = session.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) else None for d in meta.shape)
    return Runner("onnxruntime", meta.name, shape, lambda x: session.run(None, {meta.name: x})[0], tuned)


def openvino_runner(path: str | Path, threads: int) -> Runner:
    """The file compiled by OpenVINO for the CPU with ``threads`` inference threads, float32 precision (this CPU
    would otherwise run float models in bfloat16) and no dynamic quantization of activations (OpenVINO would
    otherwise quantize the inputs of weight-compressed layers on the fly): the numbers the file means, to 1e-4."""
    try:
        import openvino as ov  # optional dependency: the openvino extra
    except ImportError as err:
        raise CompressError("checking in OpenVINO needs the openvino package", "pip install -e '.[openvino]'") from err
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                     "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressError(f"OpenVINO cannot compile {path}: {first}", "re-export the model with export_onnx") from err
    port = compiled.input(0)
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return Runner("openvino", port.get_any_name(), shape, lambda x: np.asarray(request.infer([x])[output]), True)


def latency_ms(runner: Runner, batch_size: int, runs: int) -> float:
    """Median milliseconds of ``runs`` runs of ``runner`` on one random batch of ``batch_size``, after warm-up."""
    x = np.random.default_rng(0).standard_normal((batch_size, *runner.input_shape[1:])).astype(np.float32)
    for _ in range(WARMUP_RUNS):
        runner(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
