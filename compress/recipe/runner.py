"""Run a recipe end to end: the registered stages (compress.recipe.stages) in order, then report.json.

The built-in stages: model -> dense eval -> prune -> recover -> plan bits -> quantize -> export -> check ->
verdict. Everything is written into a staging folder beside ``out`` and renamed onto ``out`` only when the run
finishes (PASS or FAIL), so an interrupted run leaves no half-written file. User errors (missing data, unknown
weights, an existing output folder) are raised before any work is done.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..backends.candidates import FLOAT8
from ..data import fashion_mnist_dir
from ..distributed import barrier, is_main, rank_and_world
from ..errors import CompressError
from . import report as report_writer
from .config import Recipe
from .stages import STAGES, Context, Stage, VerdictResult, imagenet_dir


@dataclass
class RecipeRun:
    """The outcome of :func:`run_recipe`: the verdict and every number (``report`` is report.json's content)."""

    recipe: Recipe
    out: Path
    passed: bool
    failures: list[str]
    report: dict[str, Any]
    context: Context | None = None  # every stage's typed result (its file paths name the staging folder)


@dataclass
class _Stages:
    """Per-stage timer and one-line summaries."""

    log: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start

    def done(self, name: str, summary: str) -> None:
        self.log(f"[{name}] {summary} ({self.seconds.get(name, 0.0):.1f} s)")


def preflight(recipe: Recipe, out: Path, overwrite: bool) -> None:
    """Every user error that can be found without doing work: device, data, weights file, output folder."""
    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device {recipe.device} requested but CUDA is not available here", "pass --device cpu")
    if recipe.quantize.enabled and FLOAT8 in recipe.quantize.candidates:
        raise CompressError("quantize.candidates has 'float8', but a recipe quantizes for the CPU (torchao weight-only, "
                            "ONNX files) and float8 needs a CUDA GPU of compute capability >= 8.9",
                            "drop 'float8' from quantize.candidates")
    _check_world(recipe)
    if recipe.check.openvino and importlib.util.find_spec("openvino") is None:
        raise CompressError("check.openvino is set, but the openvino package is not installed",
                            "pip install -e '.[openvino]', or set check.openvino=false")
    if recipe.data.source == "imagenet":
        imagenet_dir(recipe)
    elif recipe.data.source == "fashion-mnist":
        fashion_mnist_dir(recipe.data.dir)
    weights = recipe.model.weights
    if (os.sep in weights or weights.endswith((".pt", ".pth", ".safetensors"))) and not Path(weights).is_file():
        raise CompressError(f"weights file {weights} does not exist", "pass --weights with an existing file, a torchvision enum or random")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output {out} exists and is not a folder", "pass --out with a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CompressError(f"output folder {out} already holds a run", "pass another --out or --overwrite")
    inputs = [Path(p).resolve() for p in (weights, recipe.data.dir, recipe.model.arch) if p and Path(p).exists()]
    for path in inputs:
        if path == out.resolve() or out.resolve() in path.parents:
            raise CompressError(f"input {path} lies inside the output folder {out}", "pass an --out folder that holds none of the inputs")


def _check_world(recipe: Recipe) -> None:
    """Under torch.distributed: sample counts every rank can share and a global distillation batch that splits
    evenly (found before any work rather than at the stage that needs it)."""
    _, world = rank_and_world()
    if world == 1:
        return
    d, r, q = recipe.data, recipe.recover, recipe.quantize
    counts = {"data.calibration_samples": d.calibration_samples, "data.recalibration_samples": d.recalibration_samples,
              "quantize.calibration_samples": q.calibration_samples}
    for key, count in counts.items():
        if count < world:
            raise CompressError(f"{key}={count} cannot be shared by {world} processes", f"set {key} to at least {world}")
    if r.distill_steps and r.distill_batch_size % world:
        raise CompressError(f"recover.distill_batch_size={r.distill_batch_size} cannot be split over {world} processes",
                            f"use a multiple of {world}")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("tpv-compress", "torch", "torchvision", "torchao", "torch-pruning", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _finalize(work: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging folder onto ``out`` (an old run there is replaced only with ``overwrite``)."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise CompressError(f"output folder {out} appeared during the run", "pass another --out or --overwrite")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(work, out)
        shutil.rmtree(trash)
    else:
        os.replace(work, out)


def run_recipe(recipe: Recipe, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, stages: Sequence[Stage] | None = None) -> RecipeRun:
    """Run every stage of ``recipe`` and write its outputs to ``out`` (see the module docstring).

    ``stages``: the stages to run, in order (default: the registered :data:`compress.recipe.stages.STAGES`).
    Under torch.distributed every rank runs every stage (the statistics are reduced across ranks, so all make the
    same decisions); rank 0 alone writes ``out``, the others work in a private temporary folder, and no rank
    returns before ``out`` is complete."""
    out = Path(out)
    preflight(recipe, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = is_main()
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if writer else None))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the permissions mkdir would
    try:
        context, report = _run(recipe, work, progress, log, STAGES if stages is None else stages)
        if writer:
            _finalize(work, out, overwrite)
        barrier()
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    verdict = context.need(VerdictResult)
    return RecipeRun(recipe, out, verdict.passed, verdict.failures, report, context)


def _run(recipe: Recipe, work: Path, progress: bool, log: Callable[[str], None],
         stages: Sequence[Stage]) -> tuple[Context, dict[str, Any]]:
    """Run ``stages`` in order (timing and logging the timed ones), then write the report files into ``work``."""
    torch.manual_seed(recipe.seed)
    timer = _Stages(log)
    if recipe.timing_only:
        log("TIMING ONLY: synthetic data or random weights; every accuracy in this run is meaningless")
    context = Context(recipe, work, progress, log)
    for stage in stages:
        if not stage.enabled(context):
            continue
        if not stage.timed:
            context.results[stage.name] = stage.run(context)
            continue
        with timer(stage.name):
            context.results[stage.name] = stage.run(context)
        timer.done(stage.name, stage.summary(context, context.results[stage.name]))
    report = build_report(context, timer.seconds)
    report_writer.write(report, work)
    return context, report


def build_report(context: Context, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """report.json's content: the recipe, then each result's variants and sections (in stage order).

    The skeleton fixes the order of the built-in sections and holds what a section is when its stage did not run
    (``prune``: ``{"enabled": false}``, ``plan``: null); sections of added stages follow ``stage_seconds``."""
    recipe = context.recipe
    report: dict[str, Any] = {
        "recipe": recipe.name, "description": recipe.description, "timing_only": recipe.timing_only,
        "passed": None, "verdict": None, "config": recipe.to_dict(), "seed": recipe.seed, "device": recipe.device,
        "versions": _versions(), "data": None, "variants": {}, "prune": {"enabled": recipe.prune.enabled},
        "plan": None, "files": {}, "deploy": None, "checks": {}, "final": None, "stage_seconds": stage_seconds,
    }
    for result in context.results.values():
        report["variants"].update({k.value: v.to_dict() for k, v in result.variants().items()})
        report.update(result.report())
    return report
