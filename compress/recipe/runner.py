"""Run a recipe end to end: model -> dense eval -> prune -> recover -> plan bits -> quantize -> export -> check.

Everything is written into a staging folder beside ``out`` and renamed onto ``out`` only when the run finishes
(PASS or FAIL), so an interrupted run leaves no half-written file. User errors (missing data, unknown weights,
an existing output folder) are raised before any work is done.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import CompressError
from .config import Recipe

IMAGENET_ENV = "IMAGENET_DIR"


@dataclass
class RecipeRun:
    """The outcome of :func:`run_recipe`: the verdict and every number (``report`` is report.json's content)."""

    recipe: Recipe
    out: Path
    passed: bool
    failures: list[str]
    report: dict[str, Any]


@dataclass
class _Data:
    calibration: Dataset  # label-free scoring, traces, BN recalibration (deterministic transforms)
    distill: Dataset  # recovery training inputs
    evaluation: Dataset  # held-out, labelled
    description: str


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


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` items (sorted indices), or the dataset itself."""
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist())


def imagenet_dir(recipe: Recipe) -> Path:
    """The ImageNet folder from the recipe / --data, else $IMAGENET_DIR; a one-line error when neither exists."""
    folder = recipe.data.dir or os.environ.get(IMAGENET_ENV)
    if not folder:
        raise CompressError(f"recipe {recipe.name} needs ImageNet and none was given",
                            f"pass --data DIR (DIR/train/class/*.JPEG and DIR/val/class/*.JPEG) or set {IMAGENET_ENV}; "
                            "--data synthetic --weights random runs the pipeline for timing only")
    if not Path(folder).is_dir():
        raise CompressError(f"ImageNet folder {folder} does not exist", f"pass --data DIR or set {IMAGENET_ENV} to an existing folder")
    return Path(folder)


def preflight(recipe: Recipe, out: Path, overwrite: bool) -> None:
    """Every user error that can be found without doing work: device, data, weights file, output folder."""
    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device {recipe.device} requested but CUDA is not available here", "pass --device cpu")
    if recipe.data.source == "imagenet":
        imagenet_dir(recipe)
    elif recipe.data.source == "fashion-mnist":
        from ..data import fashion_mnist_dir

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


def _datasets(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int) -> _Data:
    from ..data import FashionMNIST, image_folder, synthetic

    d, size = recipe.data, input_shape[-1]
    if d.source == "synthetic":
        n = d.synthetic_samples
        train = synthetic(n, input_shape, num_classes, seed=recipe.seed)
        test = synthetic(n, input_shape, num_classes, seed=recipe.seed + 1)
        return _Data(train, train, _subset(test, d.eval_samples, recipe.seed), f"synthetic random inputs ({n} samples)")
    if d.source == "fashion-mnist":
        train = FashionMNIST("train", d.dir, channels=input_shape[0], image_size=size)
        test = FashionMNIST("test", d.dir, channels=input_shape[0], image_size=size)
        return _Data(train, train, _subset(test, d.eval_samples, recipe.seed), "Fashion-MNIST")
    folder = imagenet_dir(recipe)
    train_split = "train" if (folder / "train").is_dir() else None
    calib = image_folder(folder, train_split or "val", image_size=size)
    augmented = image_folder(folder, train_split or "val", image_size=size, train=True)
    test = image_folder(folder, "val", image_size=size)
    note = "" if train_split else " (no train/ split: calibration uses val images, evaluation is not held out)"
    return _Data(calib, augmented, _subset(test, d.eval_samples, recipe.seed), f"ImageNet folder {folder}{note}")


def _loader(dataset: Dataset, batch_size: int, recipe: Recipe, shuffle: bool = False) -> Any:
    from ..data import loader

    return loader(dataset, batch_size, shuffle=shuffle, seed=recipe.seed, workers=recipe.data.workers)


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("tpv-compress", "torch", "torchvision", "torchao", "torch-pruning", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _evaluate(model: nn.Module, dense: nn.Module, data: Any, labelled: bool, progress: bool) -> dict[str, Any]:
    from ..evaluate import compare

    c = compare(model, dense, data, progress=progress)
    return {"top1": c.top1 if labelled else None, "dense_agreement": c.agreement, "dense_kl": c.kl, "output_mse": c.mse,
            "samples": c.total}


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
               log: Callable[[str], None] = print) -> RecipeRun:
    """Run every stage of ``recipe`` and write its outputs to ``out`` (see the module docstring)."""
    out = Path(out)
    preflight(recipe, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the permissions mkdir would
    try:
        report = _run(recipe, work, progress, log)
        _finalize(work, out, overwrite)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    verdict = report["verdict"]
    return RecipeRun(recipe, out, verdict["passed"], verdict["failures"], report)


def _run(recipe: Recipe, work: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from exporters import export_onnx
    from exporters.check import check

    from ..checkpoint import save
    from ..data import calibration
    from ..evaluate import accuracy
    from ..models import resolve, spec_of
    from ..plan import Budget, plan_bits
    from ..prune import Target, count_macs_params, prune
    from ..quantize import quantize
    from ..recover import distill, recalibrate_bn
    from . import report as report_writer

    torch.manual_seed(recipe.seed)
    stage = _Stages(log)
    timing_only = recipe.timing_only
    if timing_only:
        log("TIMING ONLY: synthetic data or random weights; every accuracy in this run is meaningless")
    device = torch.device(recipe.device)
    m, p, r, q, c = recipe.model, recipe.prune, recipe.recover, recipe.quantize, recipe.check

    with stage("model"):
        spec_shape = None
        if m.image_size:
            from ..models import default_input_shape

            channels = default_input_shape(m.arch, {})[0] if not os.path.exists(m.arch) else 3
            spec_shape = (channels, m.image_size, m.image_size)
        from ..train import TrainConfig

        train_config = TrainConfig(device=recipe.device) if device.type == "cuda" else None  # weights "train"
        dense = resolve(m.arch, None if m.weights == "random" else m.weights, input_shape=spec_shape,
                        train_config=train_config, progress=progress)
        dense = dense.to(device).eval()
        spec = spec_of(dense)
        input_shape = tuple(spec.input_shape) if spec else (3, m.image_size or 224, m.image_size or 224)
        num_classes = next(mod for mod in reversed(list(dense.modules())) if isinstance(mod, (nn.Linear, nn.Conv2d)))
        num_classes = num_classes.out_features if isinstance(num_classes, nn.Linear) else num_classes.out_channels
        example = torch.zeros(1, *input_shape)
        macs, params = count_macs_params(dense, example.to(device))
    stage.done("model", f"{spec.arch if spec else type(dense).__name__} (weights {m.weights}), input {input_shape}, "
                        f"{macs / 1e6:.1f}M MACs, {params / 1e6:.2f}M params")

    data = _datasets(recipe, input_shape, num_classes)
    labelled = recipe.data.source != "synthetic"
    evaluation = _loader(data.evaluation, recipe.data.eval_batch_size, recipe)
    calib = calibration(data.calibration, recipe.data.calibration_samples, recipe.data.batch_size, recipe.seed)
    variants: dict[str, dict[str, Any]] = {}

    with stage("dense-eval"):
        top1 = accuracy(dense, evaluation, progress=progress).top1 if labelled else None
        variants["dense"] = {"top1": top1, "dense_agreement": 1.0, "macs": macs, "params": params}
    stage.done("dense-eval", f"top-1 {_pct(top1)} on {len(data.evaluation)} {data.description} samples")

    prune_record: dict[str, Any] = {"enabled": p.enabled}
    model = copy.deepcopy(dense)
    if p.enabled:
        with stage("prune"):
            target = Target(macs=p.target_macs, params=p.target_params, latency=p.target_latency, threads=c.threads)
            result = prune(dense, calib, criterion=p.criterion, target=target, example_inputs=example.to(device),
                           steps=p.steps, round_to=p.round_to, ignored_layers=p.ignored_layers,
                           recalibrate=p.recalibrate,
                           max_layer_ratio=p.max_layer_ratio, seed=recipe.seed, progress=progress)
            model = result.model
            variants["pruned"] = {**_evaluate(model, dense, evaluation, labelled, progress), "macs": result.macs_after,
                                  "params": result.params_after}
        prune_record.update(criterion=p.criterion, target=target.metric, fraction=target.fraction,
                            macs_ratio=result.macs_ratio, params_ratio=result.params_ratio, steps=result.steps,
                            seconds=result.seconds, step_log=result.step_log, latency_ratio=result.latency_ratio,
                            latency_log=result.latency_log, ignored_layers=list(p.ignored_layers),
                            layers=[{"name": w.name, "before": w.before, "after": w.after} for w in result.layers],
                            history_entries=len(result.history))
        stage.done("prune", f"{result.summary()}; top-1 {_pct(variants['pruned']['top1'])}, "
                            f"agreement {_pct(variants['pruned']['dense_agreement'])}")

        if r.bn_recalibration or r.distill_steps:
            with stage("recover"):
                if r.bn_recalibration:
                    recalibrate_bn(model, calibration(data.calibration, recipe.data.recalibration_samples,
                                                      recipe.data.batch_size, recipe.seed + 1), progress=progress)
                if r.distill_steps:
                    batches = _loader(data.distill, r.distill_batch_size, recipe, shuffle=True)
                    distill(model, dense, batches, steps=r.distill_steps, lr=r.distill_lr, temperature=r.temperature,
                            seed=recipe.seed, progress=progress)
                variants["recovered"] = {**_evaluate(model, dense, evaluation, labelled, progress),
                                         "macs": result.macs_after, "params": result.params_after}
            stage.done("recover", f"BN recalibration {'on' if r.bn_recalibration else 'off'}, {r.distill_steps} "
                                  f"distillation steps; top-1 {_pct(variants['recovered']['top1'])}, "
                                  f"agreement {_pct(variants['recovered']['dense_agreement'])}")
    model = model.eval()
    final_macs, final_params = count_macs_params(model, example.to(device))

    # the CPU-side checks (torchao model, onnxruntime files) run on check.samples of the evaluation set
    check_data = _loader(_subset(data.evaluation, c.samples, recipe.seed), recipe.data.eval_batch_size, recipe)
    plan = None
    quantized = copy.deepcopy(model).cpu()
    if q.enabled:
        with stage("plan"):
            budget = Budget(avg_bits=q.avg_bits, bytes=q.bytes, bops=q.bops, latency=q.latency, threads=c.threads)
            plan = plan_bits(model, calib, budget, example_inputs=example.to(device), candidates=q.candidates,
                             group_size=q.group_size, allocator=q.allocator, predictor=q.predictor,
                             calibration_samples=q.calibration_samples, seed=recipe.seed)
        stage.done("plan", plan.summary())
        with stage("quantize"):
            quantized = quantize(copy.deepcopy(model).cpu(), plan)
            variants["quantized"] = {**_evaluate(quantized, dense.cpu(), check_data, labelled, progress), "macs": final_macs,
                                     "params": final_params}
        stage.done("quantize", f"torchao weight-only; top-1 {_pct(variants['quantized']['top1'])}, "
                               f"agreement {_pct(variants['quantized']['dense_agreement'])}")
    dense, model = dense.cpu(), model.cpu()

    meta = {"recipe": recipe.name, "criterion": p.criterion if p.enabled else "none",
            "target": f"{prune_record.get('target')}={prune_record.get('fraction')}" if p.enabled else "none",
            "timing_only": timing_only}
    # model_int8.onnx: int8 weights everywhere, or the plan's bits (16 = float) when asked or when the plan was made
    # under a latency budget (which is measured on exactly that file)
    int8_bits = plan.bits if plan is not None and (recipe.export.qdq_weights == "plan" or q.latency is not None) else None
    with stage("export"):
        exports = {}
        dense_onnx = work / ".dense_fp32.onnx"  # for the latency baseline only; deleted after the check
        exports["dense"] = export_onnx(dense, example, dense_onnx, opset=recipe.export.opset, metadata=meta)
        if q.enabled:
            exports["recovered" if "recovered" in variants else "pruned"] = export_onnx(
                model, example, work / "pruned_fp32.onnx", opset=recipe.export.opset, metadata=meta)
            exports["quantized"] = export_onnx(quantized, example, work / "model.onnx", opset=recipe.export.opset,
                                               metadata={**meta, "bit_plan": plan.bits})
        else:
            exports["final"] = export_onnx(model, example, work / "model.onnx", opset=recipe.export.opset, metadata=meta)
        if recipe.export.int8_activations:
            exports["int8"] = export_onnx(model, example, work / "model_int8.onnx", opset=recipe.export.opset,
                                          activations="int8", metadata=meta, weight_bits=int8_bits,
                                          calibration_data=calibration(data.calibration, min(512, recipe.data.calibration_samples),
                                                                       recipe.data.batch_size, recipe.seed + 2))
        save(model, work / "pruned.pt", metadata=meta)
        if q.enabled:
            save(quantized, work / "quantized.pt", metadata={**meta, "bit_plan": plan.bits})
        files = {k: {"path": e.path.name, "size_bytes": e.size_bytes, "weights": e.weights,
                     "float_layers": e.float_layers} for k, e in exports.items()}
    stage.done("export", ", ".join(f"{e.path.name} {e.size_bytes / 1e6:.2f} MB" for k, e in exports.items() if k != "dense"))

    with stage("check"):
        final_key = "quantized" if q.enabled else "final"
        final_source = quantized if q.enabled else model
        checks = {"dense": check(dense_onnx, reference=dense, data=check_data, threads=c.threads,
                                 parity_rtol=c.parity_rtol, min_agreement=c.min_agreement, latency_runs=c.latency_runs)}
        if q.enabled:
            key = "recovered" if "recovered" in variants else "pruned"
            checks[key] = check(work / "pruned_fp32.onnx", reference=model, data=check_data, dense=dense,
                                threads=c.threads, parity_rtol=c.parity_rtol, min_agreement=c.min_agreement,
                                latency_runs=c.latency_runs)
        checks[final_key] = check(work / "model.onnx", reference=final_source, data=check_data, dense=dense,
                                  threads=c.threads, parity_rtol=c.parity_rtol, min_agreement=c.min_agreement,
                                  min_dense_agreement=c.min_dense_agreement, latency_runs=c.latency_runs)
        if recipe.export.int8_activations:
            checks["int8"] = check(work / "model_int8.onnx", reference=model, data=check_data, dense=dense,
                                   threads=c.threads, parity_rtol=None, min_agreement=0.0, latency_runs=c.latency_runs)
    dense_onnx.unlink()
    final = checks[final_key]
    stage.done("check", f"model.onnx: agreement with its source {_pct(final.reference_agreement)}, relative "
                        f"diff {final.rel_diff:.1e}, latency b1 {final.latency_ms.get(1, float('nan')):.2f} ms "
                        f"(dense {checks['dense'].latency_ms.get(1, float('nan')):.2f} ms)")

    failures, skipped = _verdict(recipe, checks, final_key, variants, labelled, timing_only)
    report = {
        "recipe": recipe.name, "description": recipe.description, "timing_only": timing_only,
        "passed": not failures, "verdict": {"passed": not failures, "failures": failures, "skipped": skipped},
        "config": recipe.to_dict(), "seed": recipe.seed, "device": recipe.device, "versions": _versions(),
        "data": {"description": data.description, "evaluation_samples": len(data.evaluation), "labelled": labelled},
        "variants": variants, "prune": prune_record, "plan": plan.to_dict() if plan else None,
        "files": files, "checks": {k: v.to_dict() for k, v in checks.items()},
        "final": {"variant": final_key, "macs": final_macs, "params": final_params},
        "stage_seconds": stage.seconds,
    }
    report_writer.write(report, work)
    return report


def _verdict(recipe: Recipe, checks: dict[str, Any], final_key: str, variants: dict[str, Any], labelled: bool,
             timing_only: bool) -> tuple[list[str], list[str]]:
    """Failures and skipped checks: the recipe's thresholds on the shipped file (model.onnx) and on the pruned fp32
    file's parity. Accuracy thresholds are skipped (and listed) in timing-only runs, where accuracy means nothing."""
    c = recipe.check
    failures = [f"{k}: {f}" for k in (final_key, "recovered", "pruned") if k in checks for f in checks[k].failures]
    skipped = []
    final = checks[final_key]
    accuracy_checks = {"check.max_top1_drop": c.max_top1_drop, "check.min_dense_agreement": c.min_dense_agreement}
    if timing_only:
        skipped = [f"{k} (timing-only run)" for k, v in accuracy_checks.items() if v is not None]
        failures = [f for f in failures if "agreement with the dense model" not in f]
    elif c.max_top1_drop is not None:
        if not labelled or final.top1 is None:
            skipped.append("check.max_top1_drop (the evaluation data has no labels)")
        else:
            drop = 100 * (variants["dense"]["top1"] - final.top1)
            if drop > c.max_top1_drop:
                failures.append(f"top-1 drop {drop:.2f} points (dense {_pct(variants['dense']['top1'])}, model.onnx "
                                f"{_pct(final.top1)}) > check.max_top1_drop {c.max_top1_drop}")
    if c.max_latency_ms is not None and final.latency_ms.get(1, float("inf")) > c.max_latency_ms:
        failures.append(f"latency at batch 1 {final.latency_ms.get(1):.3f} ms > check.max_latency_ms {c.max_latency_ms}")
    return failures, skipped


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
