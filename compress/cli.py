"""Command line: ``python -m compress COMMAND``. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Sequence

from exporters import export_onnx
from exporters.check import check
from exporters.runtimes import RUNTIMES

from .atomic import write_text
from .checkpoint import load
from .data import FashionMNIST, image_folder, loader
from .errors import CompressError
from .evaluate import accuracy
from .models import resolve, spec_of


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_resnet", help="torchvision name, small_resnet, or a checkpoint path")
    p.add_argument("--weights", default="train",
                   help="random | train (Fashion-MNIST, cached) | torchvision enum (IMAGENET1K_V2, DEFAULT) | file path")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist (embedded) or an ImageNet-layout folder (DIR[/val]/class/img)")
    p.add_argument("--fmnist-dir", default=None, help="folder with the four Fashion-MNIST idx .gz files")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")


def _eval_data(args: argparse.Namespace, input_shape: tuple[int, ...]):
    from torch.utils.data import Subset

    size = args.image_size or input_shape[-1]
    if args.data == "fashion-mnist":
        dataset = FashionMNIST("test", channels=input_shape[0], image_size=size)
    else:
        dataset = image_folder(args.data, "val", image_size=size)
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    return loader(dataset, args.batch_size)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Resolve (train or load) a model and print its top-1 on the evaluation data."""
    start = time.perf_counter()
    model = resolve(args.model, args.weights)
    spec = spec_of(model)
    print(f"model: {spec.arch if spec else type(model).__name__} (weights: {spec.weights if spec else '?'}) "
          f"ready in {time.perf_counter() - start:.1f} s")
    result = accuracy(model, _eval_data(args, spec.input_shape if spec else (3, 224, 224)))
    where = "Fashion-MNIST test" if args.data == "fashion-mnist" else args.data
    print(f"top-1 on {where}: {100 * result.top1:.2f}% ({result.correct}/{result.total})")
    return 0


def _onnx_input_shape(path: str) -> tuple[int, ...]:
    """(C, H, W) of an ONNX file's single input, read without loading the weights."""
    import onnx

    try:
        dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    except Exception as err:
        raise CompressError(f"{path} is not a readable ONNX file ({type(err).__name__})", "pass a .onnx file written by export") from err
    shape = tuple(d.dim_value for d in dims[1:])
    if len(shape) != 3 or not all(shape):
        raise CompressError(f"{path} has input shape {shape}, not (C, H, W)", "check an image classifier exported by compress")
    return shape


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def cmd_check(args: argparse.Namespace) -> int:
    """Run an ONNX file in onnxruntime (or OpenVINO) against its source model; exit 1 when a threshold fails."""
    import json

    shape = _onnx_input_shape(args.onnx)
    reference = load(args.reference) if args.reference else None
    dense = load(args.dense) if args.dense else None
    data = None if args.data == "random" else _eval_data(args, shape)
    report = check(args.onnx, reference=reference, data=data, dense=dense, threads=args.threads,
                   parity_rtol=None if args.parity_rtol < 0 else args.parity_rtol, min_agreement=args.min_agreement,
                   min_dense_agreement=args.min_dense_agreement, latency_runs=args.runs, runtime=args.runtime)
    print(f"{args.onnx}: {report.file_size_bytes / 1e6:.2f} MB, {report.num_samples} inputs, top-1 {_pct(report.top1)}")
    if reference is not None:
        rel = "n/a" if report.rel_diff is None else f"{report.rel_diff:.1e}"
        print(f"  vs reference: agreement {_pct(report.reference_agreement)}, relative diff {rel}"
              f"{'' if report.parity_checked else ' (parity not checked)'}")
    if dense is not None:
        print(f"  vs dense: agreement {_pct(report.dense_agreement)}, KL {report.dense_kl:.4g}")
    print("  latency (%s CPU, %d threads): %s" % (report.runtime, report.threads, ", ".join(
        f"batch {b}: {ms:.2f} ms" for b, ms in report.latency_ms.items())))
    if report.default_latency_ms != report.latency_ms:
        print("  latency in a default session: %s" % ", ".join(
            f"batch {b}: {ms:.2f} ms" for b, ms in report.default_latency_ms.items()))
    if args.json:
        write_text(args.json, json.dumps(report.to_dict(), indent=2), overwrite=args.overwrite)
    print("PASS" if report.passed else "FAIL")
    for failure in report.failures:
        print(f"  - {failure}")
    return 0 if report.passed else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model (name + weights, or a compress checkpoint, possibly pruned/quantized) to ONNX."""
    import torch

    model = resolve(args.model, args.weights)
    spec = spec_of(model)
    size = args.image_size or (spec.input_shape[-1] if spec else 224)
    channels = spec.input_shape[0] if spec else 3
    result = export_onnx(model, torch.zeros(1, channels, size, size), args.out, overwrite=args.overwrite)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.weights} weights, opset {result.opset}; "
          f"{len(result.packed)} packed layers, {len(result.float_layers)} float)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="load or train a model and print its top-1")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a model or compress checkpoint to ONNX")
    p.add_argument("--model", default="small_resnet", help="torchvision name, small_resnet, or a checkpoint path")
    p.add_argument("--weights", default=None, help="random | train | torchvision enum | file (not for checkpoints)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("out", help="the .onnx file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="run an ONNX file in onnxruntime or OpenVINO; exit 1 when a threshold fails")
    p.add_argument("onnx", help="the .onnx file")
    p.add_argument("--reference", help="compress checkpoint the file was exported from (parity, agreement)")
    p.add_argument("--dense", help="compress checkpoint of the dense model (agreement, KL)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist | random | an ImageNet-layout folder")
    p.add_argument("--fmnist-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="check on the first N samples only")
    p.add_argument("--parity-rtol", type=float, default=1e-4, help="max relative diff vs --reference (< 0: off)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="min top-1 agreement with --reference")
    p.add_argument("--min-dense-agreement", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20, help="latency runs per batch size (median)")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="where to run the file (openvino: the "
                   "openvino extra)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_check)
    return parser


@contextlib.contextmanager
def _fashion_mnist_dir(folder: str | None):
    """Point the data loaders at ``folder`` for the duration of one command (restored afterwards)."""
    old = os.environ.get("FASHION_MNIST_DIR")
    if folder:
        os.environ["FASHION_MNIST_DIR"] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASHION_MNIST_DIR", None)
        else:
            os.environ["FASHION_MNIST_DIR"] = old


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _fashion_mnist_dir(getattr(args, "fmnist_dir", None)):
            return int(args.func(args))
    except CompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
