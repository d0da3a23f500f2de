"""``check``: run an exported ONNX file in onnxruntime (CPU) and compare it with the PyTorch model it came from.

Reports top-1 (labelled data), parity with the reference (max |onnx − ref| and that over max |ref|), agreement and
KL with the dense fp32 model, median latency per batch size at a stated thread count, and the file size. A file
passes when its parity and agreement meet the thresholds; every failure is one line in ``failures``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from torch import nn

from compress.batches import Inputs, at_last_positions, is_named, rows
from compress.data import inputs_of, labels_of
from compress.errors import CompressError
from compress.evaluate import predict

from .onnx_graph import METADATA_PREFIX
from .runtimes import RUNTIMES, Runner, latency_ms, onnxruntime_runner, openvino_runner

__all__ = ["CheckReport", "check", "open_session"]

RANDOM_BATCHES, RANDOM_BATCH_SIZE = 2, 8  # inputs used for parity when no data is given


@dataclass
class CheckReport:
    """The outcome of :func:`check`; ``passed`` is true exactly when ``failures`` is empty.

    ``rel_diff`` = max |onnx − reference| / max |reference| over all checked logits. ``dense_kl`` is
    KL(dense ‖ onnx) per sample, in nats. ``latency_ms`` maps batch size to the median milliseconds per run in the
    session :func:`open_session` makes; ``default_latency_ms`` the same in a default onnxruntime session (what a
    deployment that sets no option gets; it differs for weight-only packed files, see ``qdq_disabled``).
    """

    path: str
    passed: bool
    failures: list[str]
    file_size_bytes: int
    num_samples: int
    threads: int
    top1: float | None = None
    reference_agreement: float | None = None
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    parity_checked: bool = False
    dense_agreement: float | None = None
    dense_kl: float | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)
    default_latency_ms: dict[int, float] = field(default_factory=dict)
    latency_runs: int = 0
    qdq_disabled: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (latency keys become strings)."""
        d = asdict(self)
        d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        d["default_latency_ms"] = {str(k): v for k, v in self.default_latency_ms.items()}
        return d


def _read_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise CompressError(f"ONNX file {path} does not exist", "pass the path export_onnx wrote")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx raises ValueError/OSError for bad files
        raise CompressError(f"{path} is not an ONNX model ({type(err).__name__})", "pass a .onnx file written by export_onnx") from err
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise CompressError(f"{path} is not an ONNX model with inputs and outputs", "pass a .onnx file written by export_onnx")
    return model


def _weight_only_dequantize(model: onnx.ModelProto) -> bool:
    """True when DequantizeLinear only unpacks weights (no QuantizeLinear): then ORT should fold it once at load."""
    ops = {node.op_type for node in model.graph.node}
    return "DequantizeLinear" in ops and "QuantizeLinear" not in ops


def open_session(path: str | Path, threads: int = 2, *, tuned: bool = True) -> tuple[Any, bool]:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads, and whether QDQ fusion was disabled.

    The session options a file needs, applied when ``tuned``: for weight-only packed files
    ``session.disable_quant_qdq=1`` makes ORT fold each DequantizeLinear of a weight into a float initializer at
    load time, so runs do not re-dequantize (a default session re-dequantizes on every run). ``tuned=False``: the
    default session a deployment gets without options (threads aside).
    """
    import onnxruntime as ort

    model = _read_model(Path(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    disable_qdq = tuned and _weight_only_dequantize(model)
    if disable_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidGraph / InvalidProtobuf types
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CompressError(f"onnxruntime cannot load {path}: {first}", "re-export the model with export_onnx") from err
    return session, disable_qdq


def _fit(x: torch.Tensor, shape: tuple[int | None, ...], path: Path) -> np.ndarray:
    """``x`` as float32 numpy, or a CompressError when it does not fit the file's input shape."""
    if x.dim() != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        expected = tuple("N" if d is None else d for d in shape)
        raise CompressError(f"inputs of shape {tuple(x.shape)} do not fit {path.name}, which expects {expected}",
                            "pass data of the shape the model was exported with")
    return x.detach().float().cpu().numpy()


def _fit_named(x: Inputs, runner: Runner, path: Path) -> dict[str, np.ndarray]:
    """Named inputs as numpy arrays in the file's input dtypes, or a CompressError naming a missing input or a
    rank that does not fit."""
    if not is_named(x):
        raise CompressError(f"{path.name} takes named inputs ({', '.join(runner.inputs)}), got one tensor",
                            "pass dict batches (a tokenizer's output)")
    feed = {}
    for name, (shape, dtype) in runner.inputs.items():
        if name not in x:
            raise CompressError(f"the data has no input {name!r}, which {path.name} takes (got {', '.join(x)})",
                                f"pass batches with {', '.join(runner.inputs)}")
        if x[name].dim() != len(shape):
            raise CompressError(f"input {name!r} of shape {tuple(x[name].shape)} does not fit {path.name}, which expects "
                                f"{len(shape)} dimensions", "pass data of the shape the model was exported with")
        feed[name] = x[name].detach().cpu().numpy().astype(dtype)
    return feed


def _random_batches(shape: tuple[int | None, ...], seed: int = 0) -> list[torch.Tensor]:
    if any(d is None for d in shape[1:]):
        raise CompressError(f"the file's input shape {shape} has dynamic dimensions besides the batch", "pass data=")
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(RANDOM_BATCH_SIZE, *shape[1:], generator=g) for _ in range(RANDOM_BATCHES)]


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return predict(model, x).float().cpu()


def open_runner(path: Path, runtime: str, threads: int, *, tuned: bool = True) -> Runner:
    """A runner of ``path`` in ``runtime`` (onnxruntime: with the session options the file wants when ``tuned``)."""
    if runtime == "openvino":
        return openvino_runner(path, threads)
    session, disabled = open_session(path, threads, tuned=tuned)
    return onnxruntime_runner(session, disabled)


def _file_size(path: Path, model: onnx.ModelProto) -> int:
    locations = {entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def check(onnx_path: str | Path, reference: nn.Module | None = None, data: Iterable[Any] | None = None, *,
          dense: nn.Module | None = None, threads: int = 2, parity_rtol: float | None = 1e-4, min_agreement: float = 0.99,
          min_dense_agreement: float | None = None, latency_runs: int = 20,
          batch_sizes: tuple[int, ...] = (1, 32), runtime: str = "onnxruntime") -> CheckReport:
    """Run ``onnx_path`` in onnxruntime on ``data`` and compare it with ``reference`` (and ``dense``).

    ``data``: input batches or ``(input, label)`` batches; without it, seeded random inputs of the file's input
    shape are used (no top-1). Failures: relative parity with ``reference`` above ``parity_rtol`` (skipped for
    int8-activation QDQ files, which are not meant to match exactly, or when ``parity_rtol`` is None); agreement
    with ``reference`` below ``min_agreement``; agreement with ``dense`` below ``min_dense_agreement`` (when given).
    Latency: median of ``latency_runs`` runs after warm-up, per batch size, ``threads`` intra-op threads.
    ``runtime``: "onnxruntime", or "openvino" (the ``openvino`` extra; CPU, float32 precision).
    """
    path = Path(onnx_path)
    if latency_runs < 1 or threads < 1:
        raise CompressError(f"latency_runs and threads must be >= 1, got {latency_runs}, {threads}", "pass positive values")
    if runtime not in RUNTIMES:
        raise CompressError(f"unknown runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
    proto = _read_model(path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    runner = open_runner(path, runtime, threads)
    qdq_disabled = runtime == "onnxruntime" and runner.tuned
    shape = runner.input_shape
    batches = _random_batches(shape) if data is None else data
    models = [m for m in (reference, dense) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    total = correct = ref_same = dense_same = 0
    example = None  # the first batch's named inputs: what a file with token inputs is timed on
    labelled = data is not None
    max_abs = max_ref = kl = 0.0
    try:
        for batch in batches:
            x, labels = inputs_of(batch), labels_of(batch)
            feed = _fit_named(x, runner, path) if is_named(x) or len(runner.inputs) > 1 else _fit(x, shape, path)
            example = example if example is not None or not is_named(x) else feed
            out = torch.from_numpy(runner(feed)).float()
            if out.dim() == 3 and is_named(x):  # a language model's logits per position: the next token's
                out = at_last_positions(out, x)
            pred = out.argmax(1)
            if labels is None:
                labelled = False
            else:
                correct += int((pred == labels.cpu()).sum())
            if reference is not None:
                ref = _logits(reference, x)
                max_abs = max(max_abs, float((out - ref).abs().max()))
                max_ref = max(max_ref, float(ref.abs().max()))
                ref_same += int((pred == ref.argmax(1)).sum())
            if dense is not None:
                den = _logits(dense, x)
                dense_same += int((pred == den.argmax(1)).sum())
                kl += float(torch.nn.functional.kl_div(out.log_softmax(1), den.log_softmax(1), log_target=True, reduction="sum"))
            total += rows(x)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if total == 0:
        raise CompressError("check got no data", "pass a non-empty iterable of input batches")
    report = CheckReport(path=str(path), passed=False, failures=[], file_size_bytes=_file_size(path, proto),
                         num_samples=total, threads=threads, top1=correct / total if labelled else None,
                         latency_runs=latency_runs, qdq_disabled=qdq_disabled, metadata=metadata, runtime=runtime)
    quantized_activations = metadata.get(f"{METADATA_PREFIX}activations") == "int8"
    if reference is not None:
        report.reference_agreement = ref_same / total
        report.max_abs_diff = max_abs
        report.rel_diff = max_abs / max(max_ref, 1e-12)
        report.parity_checked = parity_rtol is not None and not quantized_activations
        if report.parity_checked and report.rel_diff > parity_rtol:
            report.failures.append(f"parity: max |onnx - reference| / max |reference| = {report.rel_diff:.2e} "
                                   f"> {parity_rtol:.0e} (max abs diff {max_abs:.2e}) on {total} inputs")
        if report.reference_agreement < min_agreement:
            report.failures.append(f"agreement with the reference {report.reference_agreement:.4f} < {min_agreement} on {total} inputs")
    if dense is not None:
        report.dense_agreement, report.dense_kl = dense_same / total, kl / total
        if min_dense_agreement is not None and report.dense_agreement < min_dense_agreement:
            report.failures.append(f"agreement with the dense model {report.dense_agreement:.4f} < {min_dense_agreement}")
    report.latency_ms = {bs: latency_ms(runner, bs, latency_runs, example) for bs in batch_sizes}
    report.default_latency_ms = report.latency_ms
    if qdq_disabled:  # the tuned session differs from a default one: time that too
        default = open_runner(path, runtime, threads, tuned=False)
        report.default_latency_ms = {bs: latency_ms(default, bs, latency_runs, example) for bs in batch_sizes}
    report.passed = not report.failures
    return report

