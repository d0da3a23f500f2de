"""The stages of a recipe run, as one registered list the runner loops over.

A stage has a ``name``, says whether it runs for this recipe (``enabled``), does its work in ``run(context)`` and
returns a typed :class:`StageResult`, which the runner stores in ``context.results[name]`` for the later stages
and for report.json. A *timed* stage logs ``[name] ...`` and ``[name] <summary> (<seconds> s)`` and gets a
``stage_seconds`` entry; untimed ones (data loading, the final-model measurement, the verdict) run silently.

A result adds rows to report.json's ``variants`` (:meth:`StageResult.variants`) and owns top-level report sections
(:meth:`StageResult.report`). Adding a stage is one class here (or in its own module) plus ``register_stage(stage,
after="plan")``; its result reaches ``context.results`` and, through ``report()``, report.json.

The built-in order: model -> data -> dense-eval -> prune -> recover -> final -> plan -> quantize -> export ->
check -> verdict.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import exporters
from exporters import ExportResult
from exporters.check import CheckReport, check, open_runner
from exporters.runtimes import latency_ms

from ..checkpoint import save
from ..data import CalibrationData, FashionMNIST, calibration, image_folder, loader, synthetic
from ..errors import CompressError
from ..images import Unreadable
from ..evaluate import accuracy, compare
from ..macs import count_macs_params
from ..models import default_input_shape, resolve, spec_of
from ..plan import BitPlan, Budget, plan_bits
from ..prune import PruneResult, Target, prune
from ..quantize import quantize
from ..recover import distill, recalibrate_bn
from ..train import TrainConfig
from .config import Recipe
from .variants import DEPLOY_FILE, Variant, VariantMetrics, deploy_variant

IMAGENET_ENV = "IMAGENET_DIR"
R = TypeVar("R", bound="StageResult")


# --------------------------------------------------------------------------------------------------- the protocol

class StageResult:
    """What a stage produced. Subclasses are dataclasses holding the stage's models and numbers."""

    def variants(self) -> dict[Variant, VariantMetrics]:
        """The variants this stage measured: rows of report.json's ``variants``, in stage order."""
        return {}

    def report(self) -> dict[str, Any]:
        """The top-level report.json sections this stage owns (e.g. ``{"plan": ...}``)."""
        return {}


@dataclass
class Context:
    """One run's state: the recipe, the staging folder, and every result so far (stage name -> result)."""

    recipe: Recipe
    work: Path
    progress: bool = True
    log: Callable[[str], None] = print
    results: dict[str, StageResult] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.recipe.device)

    def get(self, kind: type[R]) -> R | None:
        """The latest result of type ``kind``, or None when no stage produced one."""
        return next((r for r in reversed(self.results.values()) if isinstance(r, kind)), None)

    def metrics(self, variant: Variant) -> VariantMetrics | None:
        """What a stage measured for ``variant`` (its row of report.json's ``variants``), or None."""
        return next((r.variants()[variant] for r in reversed(self.results.values()) if variant in r.variants()), None)

    def need(self, kind: type[R]) -> R:
        """The latest result of type ``kind``; a stage that needs an earlier one that did not run is a bug."""
        result = self.get(kind)
        if result is None:
            raise RuntimeError(f"no {kind.__name__} in this run (stages run: {', '.join(self.results)})")
        return result


class Stage:
    """One step of a recipe run. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str]
    timed: ClassVar[bool] = True  # log "[name] ..." lines and record stage_seconds[name]

    def enabled(self, context: Context) -> bool:
        """Whether the stage runs for this recipe (and after the stages that ran before it)."""
        return True

    def run(self, context: Context) -> StageResult:
        raise NotImplementedError

    def summary(self, context: Context, result: StageResult) -> str:
        """The text of the ``[name] <summary> (<seconds> s)`` line."""
        return "done"

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


# ----------------------------------------------------------------------------------------------- shared helpers

def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` items (sorted indices), or the dataset itself."""
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist())


def _loader(dataset: Dataset, batch_size: int, recipe: Recipe, shuffle: bool = False, shard: bool = False) -> Any:
    return loader(dataset, batch_size, shuffle=shuffle, seed=recipe.seed, workers=recipe.data.workers, shard=shard)


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


def _measure(model: nn.Module, dense: nn.Module, data: Any, labelled: bool, progress: bool, macs: int,
             params: int) -> VariantMetrics:
    c = compare(model, dense, data, progress=progress)
    return VariantMetrics(top1=c.top1 if labelled else None, dense_agreement=c.agreement, macs=macs, params=params,
                          dense_kl=c.kl, output_mse=c.mse, samples=c.total)


# ---------------------------------------------------------------------------------------------------- the stages

@dataclass
class ModelResult(StageResult):
    dense: nn.Module  # on the recipe's device until export moves it to the CPU
    spec: Any  # the model's ModelSpec, or None
    input_shape: tuple[int, ...]
    num_classes: int
    example: torch.Tensor  # one zero input, on the CPU
    macs: int
    params: int


class ModelStage(Stage):
    name = "model"

    def run(self, context: Context) -> ModelResult:
        recipe, m, device = context.recipe, context.recipe.model, context.device
        spec_shape = None
        if m.image_size:
            channels = default_input_shape(m.arch, {})[0] if not os.path.exists(m.arch) else 3
            spec_shape = (channels, m.image_size, m.image_size)
        options = {"device": recipe.device} if device.type == "cuda" else {}  # for weights "train"
        if m.train_epochs is not None:
            options["epochs"] = m.train_epochs
        train_config = TrainConfig(**options) if options else None
        dense = resolve(m.arch, None if m.weights == "random" else m.weights, input_shape=spec_shape,
                        train_config=train_config, progress=context.progress)
        dense = dense.to(device).eval()
        spec = spec_of(dense)
        input_shape = tuple(spec.input_shape) if spec else (3, m.image_size or 224, m.image_size or 224)
        last = next(mod for mod in reversed(list(dense.modules())) if isinstance(mod, (nn.Linear, nn.Conv2d)))
        num_classes = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        example = torch.zeros(1, *input_shape)
        macs, params = count_macs_params(dense, example.to(device))
        return ModelResult(dense, spec, input_shape, num_classes, example, macs, params)

    def summary(self, context: Context, result: ModelResult) -> str:
        r = result
        return (f"{r.spec.arch if r.spec else type(r.dense).__name__} (weights {context.recipe.model.weights}), "
                f"input {r.input_shape}, {r.macs / 1e6:.1f}M MACs, {r.params / 1e6:.2f}M params")


@dataclass
class DataResult(StageResult):
    calibration_set: Dataset  # label-free scoring, traces, BN recalibration (deterministic transforms)
    distill_set: Dataset  # recovery training inputs
    evaluation_set: Dataset  # held-out, labelled
    description: str
    labelled: bool
    evaluation: Any  # batches of the evaluation set
    calib: CalibrationData  # data.calibration_samples calibration inputs
    check_data: Any  # batches of check.samples evaluation items: the CPU-side checks (torchao model, onnxruntime)
    unreadable: list[Unreadable] = field(default_factory=list)  # image files skipped (image folders only)

    def report(self) -> dict[str, Any]:
        return {"data": {"description": self.description, "evaluation_samples": len(self.evaluation_set),
                         "labelled": self.labelled, "unreadable_images": [[u.path, u.reason] for u in self.unreadable]}}


class DataStage(Stage):
    name = "data"
    timed = False

    def run(self, context: Context) -> DataResult:
        recipe, model = context.recipe, context.need(ModelResult)
        d, seed = recipe.data, recipe.seed
        calib_set, distill_set, evaluation_set, description = self._datasets(recipe, model.input_shape, model.num_classes)
        unreadable = list(dict.fromkeys(u for s in (calib_set, evaluation_set) for u in getattr(s, "unreadable", [])))
        evaluation_set = _subset(evaluation_set, d.eval_samples, seed)
        return DataResult(
            calib_set, distill_set, evaluation_set, description, labelled=d.source != "synthetic",
            evaluation=_loader(evaluation_set, d.eval_batch_size, recipe),
            calib=calibration(calib_set, d.calibration_samples, d.batch_size, seed),
            check_data=_loader(_subset(evaluation_set, recipe.check.samples, seed), d.eval_batch_size, recipe),
            unreadable=unreadable)

    @staticmethod
    def _datasets(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int) -> tuple[Dataset, Dataset, Dataset, str]:
        """(calibration, distillation, evaluation, description) for the recipe's data source."""
        d, size = recipe.data, input_shape[-1]
        if d.source == "synthetic":
            n = d.synthetic_samples
            train = synthetic(n, input_shape, num_classes, seed=recipe.seed)
            test = synthetic(n, input_shape, num_classes, seed=recipe.seed + 1)
            return train, train, test, f"synthetic random inputs ({n} samples)"
        if d.source == "fashion-mnist":
            train = FashionMNIST("train", d.dir, channels=input_shape[0], image_size=size)
            test = FashionMNIST("test", d.dir, channels=input_shape[0], image_size=size)
            return train, train, test, "Fashion-MNIST"
        folder = imagenet_dir(recipe)
        train_split = "train" if (folder / "train").is_dir() else None
        check = recipe.data.check_images
        calib = image_folder(folder, train_split or "val", image_size=size, check_images=check)
        augmented = image_folder(folder, train_split or "val", image_size=size, train=True, check_images=check)
        test = image_folder(folder, "val", image_size=size, check_images=check)
        note = "" if train_split else " (no train/ split: calibration uses val images, evaluation is not held out)"
        return calib, augmented, test, f"ImageNet folder {folder}{note}"


@dataclass
class EvalResult(StageResult):
    variant: Variant
    metrics: VariantMetrics

    def variants(self) -> dict[Variant, VariantMetrics]:
        return {self.variant: self.metrics}


class DenseEvalStage(Stage):
    name = "dense-eval"

    def run(self, context: Context) -> EvalResult:
        model, data = context.need(ModelResult), context.need(DataResult)
        top1 = accuracy(model.dense, data.evaluation, progress=context.progress).top1 if data.labelled else None
        return EvalResult(Variant.DENSE, VariantMetrics(top1=top1, dense_agreement=1.0, macs=model.macs,
                                                        params=model.params))

    def summary(self, context: Context, result: EvalResult) -> str:
        data = context.need(DataResult)
        return f"top-1 {_pct(result.metrics.top1)} on {len(data.evaluation_set)} {data.description} samples"


@dataclass
class PruneStageResult(EvalResult):
    model: nn.Module  # the pruned model (recovery then changes it in place)
    result: PruneResult
    target: Target
    criterion: str
    ignored_layers: list[str]

    def report(self) -> dict[str, Any]:
        r = self.result
        return {"prune": {"enabled": True, "criterion": self.criterion, "target": self.target.metric,
                          "fraction": self.target.fraction, "macs_ratio": r.macs_ratio, "params_ratio": r.params_ratio,
                          "steps": r.steps, "seconds": r.seconds, "step_log": r.step_log,
                          "latency_ratio": r.latency_ratio, "latency_log": r.latency_log,
                          "ignored_layers": list(self.ignored_layers),
                          "layers": [{"name": w.name, "before": w.before, "after": w.after} for w in r.layers],
                          "history_entries": len(r.history)}}


class PruneStage(Stage):
    name = "prune"

    def enabled(self, context: Context) -> bool:
        return context.recipe.prune.enabled

    def run(self, context: Context) -> PruneStageResult:
        recipe, p = context.recipe, context.recipe.prune
        model, data, device = context.need(ModelResult), context.need(DataResult), context.device
        target = Target(macs=p.target_macs, params=p.target_params, latency=p.target_latency, threads=recipe.check.threads,
                        activations=p.latency_activations)
        result = prune(model.dense, data.calib, criterion=p.criterion, target=target,
                       example_inputs=model.example.to(device), steps=p.steps, round_to=p.round_to,
                       ignored_layers=p.ignored_layers, recalibrate=p.recalibrate, max_layer_ratio=p.max_layer_ratio,
                       normalizer=p.normalizer, mean_replacement=p.mean_replacement, prune_heads=p.heads,
                       prune_hidden=p.hidden, seed=recipe.seed, progress=context.progress)
        metrics = _measure(result.model, model.dense, data.evaluation, data.labelled, context.progress,
                           result.macs_after, result.params_after)
        return PruneStageResult(Variant.PRUNED, metrics, result.model, result, target, p.criterion,
                                list(p.ignored_layers))

    def summary(self, context: Context, result: PruneStageResult) -> str:
        return (f"{result.result.summary()}; top-1 {_pct(result.metrics.top1)}, "
                f"agreement {_pct(result.metrics.dense_agreement)}")


@dataclass
class RecoverResult(EvalResult):
    model: nn.Module  # the pruned model, recovered in place


class RecoverStage(Stage):
    name = "recover"

    def enabled(self, context: Context) -> bool:
        r = context.recipe.recover
        return context.get(PruneStageResult) is not None and bool(r.bn_recalibration or r.distill_steps)

    def run(self, context: Context) -> RecoverResult:
        recipe, r, d = context.recipe, context.recipe.recover, context.recipe.data
        dense, data, pruned = context.need(ModelResult).dense, context.need(DataResult), context.need(PruneStageResult)
        model = pruned.model
        if r.bn_recalibration:
            recalibrate_bn(model, calibration(data.calibration_set, d.recalibration_samples, d.batch_size, recipe.seed + 1),
                           progress=context.progress)
        if r.distill_steps:
            batches = _loader(data.distill_set, r.distill_batch_size, recipe, shuffle=True, shard=True)
            distill(model, dense, batches, steps=r.distill_steps, lr=r.distill_lr, temperature=r.temperature,
                    seed=recipe.seed, progress=context.progress)
        metrics = _measure(model, dense, data.evaluation, data.labelled, context.progress, pruned.result.macs_after,
                           pruned.result.params_after)
        return RecoverResult(Variant.RECOVERED, metrics, model)

    def summary(self, context: Context, result: RecoverResult) -> str:
        r = context.recipe.recover
        return (f"BN recalibration {'on' if r.bn_recalibration else 'off'}, {r.distill_steps} distillation steps; "
                f"top-1 {_pct(result.metrics.top1)}, agreement {_pct(result.metrics.dense_agreement)}")


@dataclass
class FinalModelResult(StageResult):
    """The fp32 model that goes on to quantization and export (pruned.pt), and which variant the accuracy
    thresholds are checked on (``shipped``)."""

    model: nn.Module
    macs: int
    params: int
    fp32_variant: Variant  # the key of pruned_fp32.onnx when quantization is on: recovered, else pruned
    shipped: Variant  # quantized (model_small.onnx), or the fp32 model itself (final: model.onnx)

    def report(self) -> dict[str, Any]:
        return {"final": {"variant": self.shipped.value, "macs": self.macs, "params": self.params}}


class FinalModelStage(Stage):
    name = "final"
    timed = False

    def run(self, context: Context) -> FinalModelResult:
        model_result = context.need(ModelResult)
        pruned, recovered = context.get(PruneStageResult), context.get(RecoverResult)
        model = recovered.model if recovered else pruned.model if pruned else copy.deepcopy(model_result.dense)
        model = model.eval()
        macs, params = count_macs_params(model, model_result.example.to(context.device))
        return FinalModelResult(model, macs, params, fp32_variant=Variant.RECOVERED if recovered else Variant.PRUNED,
                                shipped=Variant.QUANTIZED if context.recipe.quantize.enabled else Variant.FINAL)


@dataclass
class PlanResult(StageResult):
    plan: BitPlan

    def report(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict()}


class PlanStage(Stage):
    name = "plan"

    def enabled(self, context: Context) -> bool:
        return context.recipe.quantize.enabled

    def run(self, context: Context) -> PlanResult:
        recipe, q = context.recipe, context.recipe.quantize
        final, data = context.need(FinalModelResult), context.need(DataResult)
        example = context.need(ModelResult).example.to(context.device)
        budget = Budget(avg_bits=q.avg_bits, bytes=q.bytes, bops=q.bops, latency=q.latency, threads=recipe.check.threads)
        return PlanResult(plan_bits(final.model, data.calib, budget, example_inputs=example, candidates=q.candidates,
                                    group_size=q.group_size, allocator=q.allocator, predictor=q.predictor,
                                    calibration_samples=q.calibration_samples, seed=recipe.seed))

    def summary(self, context: Context, result: PlanResult) -> str:
        return result.plan.summary()


@dataclass
class QuantizeResult(EvalResult):
    model: nn.Module  # torchao weight-only, on the CPU


class QuantizeStage(Stage):
    name = "quantize"

    def enabled(self, context: Context) -> bool:
        return context.recipe.quantize.enabled and context.get(PlanResult) is not None

    def run(self, context: Context) -> QuantizeResult:
        dense, data, final = context.need(ModelResult).dense, context.need(DataResult), context.need(FinalModelResult)
        quantized = quantize(copy.deepcopy(final.model).cpu(), context.need(PlanResult).plan)
        metrics = _measure(quantized, dense.cpu(), data.check_data, data.labelled, context.progress, final.macs,
                           final.params)
        return QuantizeResult(Variant.QUANTIZED, metrics, quantized)

    def summary(self, context: Context, result: QuantizeResult) -> str:
        return (f"torchao weight-only; top-1 {_pct(result.metrics.top1)}, "
                f"agreement {_pct(result.metrics.dense_agreement)}")


@dataclass
class ExportResults(StageResult):
    exports: dict[Variant, ExportResult]  # the dense file is deleted after the check
    deploy: Variant  # model.onnx is this file (the same file under a second name when it is not FINAL)

    def report(self) -> dict[str, Any]:
        return {"files": {k.value: {"path": e.path.name, "size_bytes": e.size_bytes, "weights": e.weights,
                                    "float_layers": e.float_layers} for k, e in self.exports.items()},
                "deploy": {"path": DEPLOY_FILE, "variant": self.deploy.value, "same_as": self.exports[self.deploy].path.name}}


def link_deploy_file(exports: dict[Variant, ExportResult], work: Path) -> Variant:
    """model.onnx: the exported file that runs fast in a default onnxruntime session (a hard link, or a copy where
    the file system has none), so the name a deployment picks up needs no session option."""
    variant = deploy_variant(set(exports) - {Variant.DENSE})
    source, target = exports[variant].path, work / DEPLOY_FILE
    if source != target:
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return variant


class ExportStage(Stage):
    name = "export"

    def run(self, context: Context) -> ExportResults:
        recipe, p, q, e = context.recipe, context.recipe.prune, context.recipe.quantize, context.recipe.export
        work, model_result, final = context.work, context.need(ModelResult), context.need(FinalModelResult)
        pruned, plan = context.get(PruneStageResult), context.get(PlanResult)
        quantized = context.need(QuantizeResult) if final.shipped is Variant.QUANTIZED else None
        dense, model, example = model_result.dense.cpu(), final.model.cpu(), model_result.example
        meta = {"recipe": recipe.name, "criterion": p.criterion if pruned else "none",
                "target": f"{pruned.target.metric}={pruned.target.fraction}" if pruned else "none",
                "timing_only": recipe.timing_only}
        # model_int8.onnx: int8 weights everywhere, or the plan's bits (16 = float) when asked or when the plan was
        # made under a latency budget (which is measured on exactly that file)
        int8_bits = plan.plan.bits if plan is not None and (e.qdq_weights == "plan" or q.latency is not None) else None
        # exporters.export_onnx is looked up at call time (tests interrupt a run by patching it)
        exports = {Variant.DENSE: exporters.export_onnx(dense, example, work / ".dense_fp32.onnx", opset=e.opset,
                                                        metadata=meta)}  # the latency baseline only
        if quantized:
            exports[final.fp32_variant] = exporters.export_onnx(model, example, work / "pruned_fp32.onnx",
                                                                opset=e.opset, metadata=meta)
            exports[Variant.QUANTIZED] = exporters.export_onnx(quantized.model, example, work / "model_small.onnx",
                                                               opset=e.opset, metadata={**meta, "bit_plan": plan.plan.bits})
        else:
            exports[Variant.FINAL] = exporters.export_onnx(model, example, work / DEPLOY_FILE, opset=e.opset,
                                                           metadata=meta)
        if e.int8_activations:
            calib = calibration(context.need(DataResult).calibration_set, min(512, recipe.data.calibration_samples),
                                recipe.data.batch_size, recipe.seed + 2)
            exports[Variant.INT8] = exporters.export_onnx(model, example, work / "model_int8.onnx", opset=e.opset,
                                                          activations="int8", metadata=meta, weight_bits=int8_bits,
                                                          calibration_data=calib)
        save(model, work / "pruned.pt", metadata=meta)
        if quantized:
            save(quantized.model, work / "quantized.pt", metadata={**meta, "bit_plan": plan.plan.bits})
        return ExportResults(exports, link_deploy_file(exports, work))

    def summary(self, context: Context, result: ExportResults) -> str:
        return ", ".join(f"{e.path.name} {e.size_bytes / 1e6:.2f} MB" for k, e in result.exports.items()
                         if k != Variant.DENSE) + f"; {DEPLOY_FILE} = {result.exports[result.deploy].path.name}"


@dataclass
class CheckResults(StageResult):
    checks: dict[Variant, CheckReport]  # onnxruntime against each file's source model (and the dense model)
    shipped: Variant  # the file the accuracy thresholds apply to
    openvino_ms: dict[Variant, dict[int, float]] = field(default_factory=dict)  # check.openvino: latency per batch

    def report(self) -> dict[str, Any]:
        checks = {k.value: v.to_dict() for k, v in self.checks.items()}
        for k, ms in self.openvino_ms.items():
            checks[k.value]["openvino_latency_ms"] = {str(b): t for b, t in ms.items()}
        return {"checks": checks}


def openvino_latencies(files: dict[Variant, ExportResult], batch_sizes: tuple[int, ...], threads: int,
                       runs: int) -> dict[Variant, dict[int, float]]:
    """Median milliseconds per batch of every file compiled by OpenVINO for the CPU (float32 precision)."""
    out = {}
    for variant, export in files.items():
        runner = open_runner(export.path, "openvino", threads)
        out[variant] = {b: latency_ms(runner, b, runs) for b in batch_sizes}
        del runner  # release OpenVINO's compiled model and infer request now, not at some later collection
        gc.collect()
    return out


class CheckStage(Stage):
    name = "check"

    def run(self, context: Context) -> CheckResults:
        c = context.recipe.check
        dense, data, final = context.need(ModelResult).dense, context.need(DataResult), context.need(FinalModelResult)
        files = context.need(ExportResults).exports
        quantized = context.need(QuantizeResult) if final.shipped is Variant.QUANTIZED else None
        common = dict(data=data.check_data, threads=c.threads, latency_runs=c.latency_runs)
        checks = {Variant.DENSE: check(files[Variant.DENSE].path, reference=dense, parity_rtol=c.parity_rtol,
                                       min_agreement=c.min_agreement, **common)}
        if quantized:
            checks[final.fp32_variant] = check(files[final.fp32_variant].path, reference=final.model, dense=dense,
                                               parity_rtol=c.parity_rtol, min_agreement=c.min_agreement, **common)
        checks[final.shipped] = check(files[final.shipped].path, reference=quantized.model if quantized else final.model,
                                      dense=dense, parity_rtol=c.parity_rtol, min_agreement=c.min_agreement,
                                      min_dense_agreement=c.min_dense_agreement, **common)
        if Variant.INT8 in files:
            checks[Variant.INT8] = check(files[Variant.INT8].path, reference=final.model, dense=dense, parity_rtol=None,
                                         min_agreement=0.0, **common)
        openvino_ms = (openvino_latencies(files, tuple(int(b) for b in checks[Variant.DENSE].latency_ms), c.threads,
                                          c.latency_runs) if c.openvino else {})
        files[Variant.DENSE].path.unlink()  # exported for the latency baseline only
        return CheckResults(checks, final.shipped, openvino_ms)

    def summary(self, context: Context, result: CheckResults) -> str:
        final, dense = result.checks[result.shipped], result.checks[Variant.DENSE]
        return (f"{context.need(ExportResults).exports[result.shipped].path.name}: agreement with its source "
                f"{_pct(final.reference_agreement)}, relative diff {final.rel_diff:.1e}, latency b1 "
                f"{final.latency_ms.get(1, float('nan')):.2f} ms (dense {dense.latency_ms.get(1, float('nan')):.2f} ms)")


@dataclass
class VerdictResult(StageResult):
    failures: list[str]
    skipped: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def report(self) -> dict[str, Any]:
        return {"passed": self.passed, "verdict": {"passed": self.passed, "failures": self.failures,
                                                   "skipped": self.skipped}}


class VerdictStage(Stage):
    """Failures and skipped checks: the recipe's thresholds on the shipped file (model_small.onnx when quantizing,
    else model.onnx), the top-1 drop also on model.onnx, the pruned fp32 file's parity. Accuracy thresholds are
    skipped (and listed) in timing-only runs, where accuracy means nothing."""

    name = "verdict"
    timed = False

    def run(self, context: Context) -> VerdictResult:
        c = context.recipe.check
        checks_result, data = context.need(CheckResults), context.need(DataResult)
        checks, shipped = checks_result.checks, checks_result.shipped
        dense_top1 = context.metrics(Variant.DENSE).top1
        failures = [f"{k}: {f}" for k in (shipped, Variant.RECOVERED, Variant.PRUNED) if k in checks
                    for f in checks[k].failures]
        skipped = []
        final = checks[shipped]
        accuracy_checks = {"check.max_top1_drop": c.max_top1_drop, "check.min_dense_agreement": c.min_dense_agreement}
        if context.recipe.timing_only:
            skipped = [f"{k} (timing-only run)" for k, v in accuracy_checks.items() if v is not None]
            failures = [f for f in failures if "agreement with the dense model" not in f]
        elif c.max_top1_drop is not None:
            deploy = context.need(ExportResults).deploy
            for key in dict.fromkeys((shipped, deploy)):  # the planned file and model.onnx (the same file or two)
                file = checks[key]
                if not data.labelled or file.top1 is None:
                    skipped.append(f"check.max_top1_drop on {Path(file.path).name} (the evaluation data has no labels)")
                    continue
                drop = 100 * (dense_top1 - file.top1)
                if drop > c.max_top1_drop:
                    failures.append(f"top-1 drop {drop:.2f} points (dense {_pct(dense_top1)}, {Path(file.path).name} "
                                    f"{_pct(file.top1)}) > check.max_top1_drop {c.max_top1_drop}")
        if c.max_latency_ms is not None and final.latency_ms.get(1, float("inf")) > c.max_latency_ms:
            failures.append(f"latency at batch 1 {final.latency_ms.get(1):.3f} ms > check.max_latency_ms {c.max_latency_ms}")
        return VerdictResult(failures, skipped)


# ------------------------------------------------------------------------------------------------- the registry

STAGES: list[Stage] = [ModelStage(), DataStage(), DenseEvalStage(), PruneStage(), RecoverStage(), FinalModelStage(),
                       PlanStage(), QuantizeStage(), ExportStage(), CheckStage(), VerdictStage()]


def stage_names(stages: list[Stage] | None = None) -> list[str]:
    return [s.name for s in (STAGES if stages is None else stages)]


def register_stage(stage: Stage, *, after: str | None = None, before: str | None = None) -> Stage:
    """Insert ``stage`` into :data:`STAGES` right after (or before) the stage of that name, else at the end."""
    names = stage_names()
    if stage.name in names:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    if after is not None and before is not None:
        raise ValueError("pass after= or before=, not both")
    anchor = after if after is not None else before
    if anchor is not None and anchor not in names:
        raise ValueError(f"no stage named {anchor!r} (stages: {', '.join(names)})")
    index = len(STAGES) if anchor is None else names.index(anchor) + (after is not None)
    STAGES.insert(index, stage)
    return stage


def unregister_stage(name: str) -> Stage:
    """Remove the stage called ``name`` from :data:`STAGES` and return it."""
    names = stage_names()
    if name not in names:
        raise ValueError(f"no stage named {name!r} (stages: {', '.join(names)})")
    return STAGES.pop(names.index(name))
