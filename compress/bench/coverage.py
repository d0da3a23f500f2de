"""``python -m compress.bench coverage``: every torchvision classifier (or timm model) through the whole pipeline.

Per model, at a small input (``--image-size``, or the model's minimum when larger): build (random weights) ->
``prune`` (``--criterion``, ``--target`` MACs) -> ``plan_bits`` (``--avg-bits``) -> ``quantize`` -> ``export_onnx``
-> onnxruntime parity with the quantized model -> ``save``/``load`` (identical outputs). The table gives the last
stage reached, the MACs kept, the parity, the seconds and a one-line reason for the first failure. Random inputs
and weights: it measures reach, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from exporters import export_onnx
from exporters.check import check

from ..atomic import write_text
from ..checkpoint import load, save
from ..data import synthetic
from ..errors import CompressError
from ..models import resolve, torchvision_archs
from ..output import machine, markdown_table, write_json
from ..plan import Budget, plan_bits
from ..prune import Target, prune
from ..quantize import quantize
from ..recover import recalibrate_bn

STAGES = ("build", "prune", "plan", "quantize", "export", "parity", "reload")
TIMM_FAMILIES = ("resnet18", "resnext26ts", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv4_conv_small",
                 "regnetx_002", "regnety_002", "ghostnet_100", "densenet121", "repvgg_a0", "convnext_atto",
                 "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixnet_s", "rexnet_100", "dla34", "dpn48b",
                 "hrnet_w18_small", "cspresnet50", "tinynet_a")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    p.add_argument("--models", nargs="+", default=None, help="names (default: every classifier of the zoo)")
    p.add_argument("--image-size", type=int, default=64, help="input size, raised to a model's minimum")
    p.add_argument("--criterion", default="jbr", help="pruning criterion (default: jbr, the criterion of the sweeps "
                   "in BENCHMARKS.md; prune's own default is jbr-centred@bn)")
    p.add_argument("--target", type=float, default=0.5, help="MACs fraction kept")
    p.add_argument("--avg-bits", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=16, help="calibration samples (random inputs)")
    p.add_argument("--steps", type=int, default=5, help="pruning steps (prune's default for jbr; one for SELECT@ALLOCATE)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per model: each model then runs in its own process, so a model that runs out of "
                        "time or memory becomes a row instead of ending the sweep")
    p.add_argument("--resume", action="store_true", help="keep the rows of coverage.json in --out, run the others")


NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _trained_like(model: nn.Module) -> nn.Module:
    """Undo the zero initialisations training moves away from: layers initialised to zero (torchvision ViT's head)
    get small random weights, norms whose scale is zero (timm's ``zero_init_last``) a scale of 1. With a zero head,
    or a zero scale on a block without a shortcut, the output ignores every channel, so no criterion that looks at
    the output can rank any."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.any():
                continue
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(layer, NORMS):
                weight.fill_(1.0)
    return model


def _runs_at(model: nn.Module, size: int) -> bool:
    """Whether ``model`` takes a (1, 3, size, size) input."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


def _torchvision_model(arch: str, size: int) -> tuple[nn.Module, int]:
    """A torchvision classifier with random weights at ``size``, raised when the structure needs more: ViTs are
    built for the nearest multiple of their patch; others that fail at ``size`` (MaxViT's 7x7 partitions) get the
    minimum of their weights' metadata."""
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": 10}
    if arch.startswith("vit_"):  # torchvision ViTs take any image size a multiple of the patch
        patch = int(arch.rsplit("_", 1)[1])
        size = -(-size // patch) * patch
        kwargs["image_size"] = size
    model = resolve(arch, kwargs=kwargs, input_shape=(3, size, size)).eval()
    if not _runs_at(model, size):
        try:
            minimum = int(torchvision.models.get_model_weights(arch).DEFAULT.meta.get("min_size", (1, 1))[0])
        except (ValueError, KeyError, AttributeError):
            minimum = size
        size = max(size, minimum)
        model = resolve(arch, kwargs=kwargs, input_shape=(3, size, size)).eval()
    return _trained_like(model), size


def _timm_model(name: str, size: int) -> tuple[nn.Module, int]:
    import timm  # optional dependency: the timm extra

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    if "vit" in name or "deit" in name:
        kwargs["img_size"] = size
    return _trained_like(timm.create_model(name, **kwargs).eval()), size


def _reason(stage: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    origin = f" ({Path(where.filename).parent.name}/{Path(where.filename).name}:{where.lineno})" if where and not isinstance(err, CompressError) else ""
    return f"{stage}: {type(err).__name__}: {text}{origin}"


def run_one(name: str, build: Callable[[str, int], tuple[nn.Module, int]], args: argparse.Namespace,
            folder: Path) -> dict[str, Any]:
    """One model through every stage; the row records how far it got and why it stopped."""
    row: dict[str, Any] = {"model": name, "reached": None, "size": None, "macs_ratio": None, "rel_diff": None,
                           "reload_max_diff": None, "seconds": 0.0, "reason": ""}
    start = time.perf_counter()
    state: dict[str, Any] = {}

    def step(stage: str) -> None:
        if stage == "build":
            state["dense"], row["size"] = build(name, args.image_size)
            state["x"] = torch.zeros(1, 3, row["size"], row["size"])
            state["data"] = synthetic(args.samples, (3, row["size"], row["size"]))
            # as after training: BN statistics that fit the activations (else, with small random weights, they
            # can fade to nothing, and the logits are the classifier's bias whatever the compression did)
            recalibrate_bn(state["dense"], DataLoader(state["data"], batch_size=8), progress=False)
        elif stage == "prune":
            result = prune(state["dense"], state["data"], args.criterion, Target(macs=args.target),
                           example_inputs=state["x"], steps=args.steps, calibration_samples=args.samples, batch_size=8,
                           progress=False)
            state["pruned"], row["macs_ratio"] = result.model, result.macs_ratio
        elif stage == "plan":
            state["plan"] = plan_bits(state["pruned"], state["data"], Budget(avg_bits=args.avg_bits),
                                      example_inputs=state["x"], calibration_samples=args.samples, batch_size=8)
        elif stage == "quantize":
            state["quantized"] = quantize(state["pruned"], state["plan"])
        elif stage == "export":
            state["onnx"] = export_onnx(state["quantized"], state["x"], folder / f"{name}.onnx", overwrite=True).path
        elif stage == "parity":
            x = torch.randn(4, *state["x"].shape[1:], generator=torch.Generator().manual_seed(0))
            report = check(state["onnx"], reference=state["quantized"], data=[x], latency_runs=1, batch_sizes=(1,))
            row["rel_diff"] = report.rel_diff
            if not report.passed:
                raise CompressError("; ".join(report.failures))
        elif stage == "reload":
            path = save(state["quantized"], folder / f"{name}.pt", overwrite=True)
            # torchvision models rebuild from their name; others (timm) are user models: load onto a fresh build
            reloaded = load(path) if args.zoo == "torchvision" else load(path, model=build(name, args.image_size)[0])
            x = torch.randn(2, *state["x"].shape[1:], generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                row["reload_max_diff"] = float((reloaded(x) - state["quantized"](x)).abs().max())
            if row["reload_max_diff"] != 0.0:
                raise CompressError(f"the reloaded model differs by {row['reload_max_diff']:.2e}")

    for stage in STAGES:
        try:
            step(stage)
        except Exception as err:  # the benchmark records every failure as a row instead of stopping
            row["reason"] = _reason(stage, err)
            break
        row["reached"] = stage
    row["seconds"] = time.perf_counter() - start
    return row


def run_isolated(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """``run_one`` in a child process limited to ``args.timeout`` seconds; a child that times out or dies (e.g.
    killed for memory) gives a row saying so."""
    child_out = folder / f"{name}.child"
    command = [sys.executable, "-m", "compress.bench", "coverage", "--out", str(child_out), "--zoo", args.zoo,
               "--models", name, "--image-size", str(args.image_size), "--criterion", args.criterion,
               "--target", str(args.target), "--avg-bits", str(args.avg_bits), "--samples", str(args.samples),
               "--steps", str(args.steps)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        rows = json.loads((child_out / "coverage.json").read_text())["rows"] if done.returncode == 0 else []
        if rows:
            return rows[0]
        reason = f"the process ended with exit code {done.returncode}" + (" (killed: out of memory?)" if done.returncode < 0 else "")
    except subprocess.TimeoutExpired:
        reason = f"timeout: not done in {args.timeout:.0f} s"
    return {"model": name, "reached": None, "size": None, "macs_ratio": None, "rel_diff": None, "reload_max_diff": None,
            "seconds": time.perf_counter() - start, "reason": reason}


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    done = sum(r["reached"] == STAGES[-1] for r in rows)
    header = (f"{args.zoo}: {done}/{len(rows)} models end to end ({100 * done / max(len(rows), 1):.0f}%), criterion "
              f"{args.criterion}, MACs target {args.target} in {args.steps} steps, {args.avg_bits} bits on average, random weights and "
              "inputs.\n\n")
    table = [[r["model"], r["size"] or "–", r["reached"] or "–", "–" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}",
              "–" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}", f"{r['seconds']:.0f}", r["reason"] or "–"]
             for r in rows]
    return header + markdown_table(["model", "input", "stage reached", "MACs kept", "ONNX parity", "s", "first failure"],
                                   table)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    if args.zoo == "timm":
        build, names = _timm_model, list(args.models or TIMM_FAMILIES)
    else:
        build, names = _torchvision_model, list(args.models or torchvision_archs())
    order = {n: i for i, n in enumerate(names)}
    rows: list[dict[str, Any]] = []
    if args.resume and (out / "coverage.json").exists():
        rows = [r for r in json.loads((out / "coverage.json").read_text())["rows"] if r["model"] in names]
        names = [n for n in names if n not in {r["model"] for r in rows}]
    with tempfile.TemporaryDirectory(prefix="compress-coverage-") as tmp:
        for name in names:
            row = run_isolated(name, args, Path(tmp)) if args.timeout else run_one(name, build, args, Path(tmp))
            rows = sorted(rows + [row], key=lambda r: order[r["model"]])
            print(f"{name}: {row['reached']} {row['reason']}", flush=True)
            _write(rows, args, out)  # after every model: a long sweep keeps what it measured
    return _write(rows, args, out)


def _write(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    payload = {"benchmark": "coverage", "machine": machine(), "settings": vars(args), "rows": rows}
    write_json(out / "coverage.json", payload)
    write_text(out / "coverage.md", _markdown(rows, args), overwrite=True)
    return payload
