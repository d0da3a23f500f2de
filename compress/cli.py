"""Command line: ``python -m compress COMMAND``. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Sequence

from .errors import CompressError


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

    from .data import FashionMNIST, image_folder, loader

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
    from .evaluate import accuracy
    from .models import resolve, spec_of

    start = time.perf_counter()
    model = resolve(args.model, args.weights)
    spec = spec_of(model)
    print(f"model: {spec.arch if spec else type(model).__name__} (weights: {spec.weights if spec else '?'}) "
          f"ready in {time.perf_counter() - start:.1f} s")
    result = accuracy(model, _eval_data(args, spec.input_shape if spec else (3, 224, 224)))
    where = "Fashion-MNIST test" if args.data == "fashion-mnist" else args.data
    print(f"top-1 on {where}: {100 * result.top1:.2f}% ({result.correct}/{result.total})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="load or train a model and print its top-1")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)
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
