"""The runtimes an ONNX file is checked in: onnxruntime (the default) and OpenVINO (the ``openvino`` extra).

A runner maps one float32 input batch (or named arrays: a tokenized batch) to the first output, knows the file's
input names, shapes (None for a dynamic dimension) and dtypes, and says whether it applied the session options the
file wants (:func:`open_session`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from compress.errors import CompressError

WARMUP_RUNS = 3
RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class Runner:
    """``runner(x)`` -> the first output of the file on ``x``: one float32 batch, or named arrays by input name."""

    runtime: str
    inputs: dict[str, tuple[tuple[int | None, ...], Any]]  # input name -> (shape, None for dynamic; numpy dtype)
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    tuned: bool = False  # session options beyond the runtime's defaults were applied

    @property
    def input_name(self) -> str:
        return next(iter(self.inputs))

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self.inputs[self.input_name][0]

    def __call__(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        return self.run(dict(x) if isinstance(x, Mapping) else {self.input_name: x})


ONNX_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def onnxruntime_runner(session: Any, tuned: bool) -> Runner:
    """A runner over an onnxruntime ``InferenceSession``."""
    inputs = {meta.name: (tuple(d if isinstance(d, int) else None for d in meta.shape), ONNX_TYPES.get(meta.type, np.float32))
              for meta in session.get_inputs()}
    return Runner("onnxruntime", inputs, lambda feed: session.run(None, feed)[0], tuned)


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
    inputs = {port.get_any_name(): (tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape()),
                                    port.get_element_type().to_dtype()) for port in compiled.inputs}
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return Runner("openvino", inputs, lambda feed: np.asarray(request.infer(feed)[output]), True)


def latency_feed(runner: Runner, batch_size: int, example: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A batch of ``batch_size`` for timing: the first sample of ``example`` (named arrays) repeated, else random
    float32 inputs of the file's shape (dynamic dimensions besides the batch need an example)."""
    if example is not None:
        return {name: np.repeat(np.asarray(value)[:1], batch_size, axis=0) for name, value in example.items()}
    feed = {}
    for name, (shape, dtype) in runner.inputs.items():
        if any(d is None for d in shape[1:]) or not np.issubdtype(dtype, np.floating):
            raise CompressError(f"input {name!r} of shape {shape} ({np.dtype(dtype).name}) cannot be made up for "
                                "timing", "pass data (e.g. tokenized batches) to time the file on")
        feed[name] = np.random.default_rng(0).standard_normal((batch_size, *shape[1:])).astype(dtype)
    return feed


def latency_ms(runner: Runner, batch_size: int, runs: int, example: Mapping[str, np.ndarray] | None = None) -> float:
    """Median milliseconds of ``runs`` runs of ``runner`` on one batch of ``batch_size`` (see :func:`latency_feed`),
    after warm-up."""
    x = latency_feed(runner, batch_size, example)
    for _ in range(WARMUP_RUNS):
        runner(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
