"""``python -m compress.bench quant``: TPV bit allocation vs uniform, HAWQ-V2 and random plans under equal budgets.

On a model trained on Fashion-MNIST (default the small reference ResNet; ``--arch resnet50 --image-size 32`` a
torchvision ResNet-50), dense and optionally pruned to 50% MACs by JBR with BN recalibration and a short
distillation, for each average-bit budget: each allocator's plan, applied with torchao for ``--device`` (cpu, or
cuda with its own configs), is compared with the float model on the 10k test images (top-1, agreement, KL, output
MSE = measured TPV) and its predicted TPV is ranked against the measured one across all plans (Spearman). On CUDA
each plan's eager latency (fp32 and bf16 activations) is timed against the float model in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from criteria.qnoise import hawq_traces, spearman
from criteria.tpv import weight_layers

from ..atomic import write_text
from ..data import FashionMNIST, calibration, loader
from ..errors import CompressError
from ..evaluate import compare
from ..latency import torch_latency_ms
from ..models import HF_PRESETS, resolve
from ..output import fmt, machine, markdown_table, save_figure, write_json
from ..plan import FLOAT, Budget, plan_bits
from ..prune import Target, prune
from ..quantize import quantize
from ..recover import distill, recalibrate_bn
from ..train import TrainConfig

ALLOCATORS = {"tpv": dict(allocator="tpv", predictor="noise"), "tpv-error": dict(allocator="tpv", predictor="error"),
              "tpv-jvp": dict(allocator="tpv", predictor="jvp"),
              "hawq": dict(allocator="hawq"), "uniform": dict(allocator="uniform"), "random": dict(allocator="random")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="small_resnet", help="small_resnet, vit_fmnist (a transformers ViT) or a "
                   "torchvision classifier, trained on Fashion-MNIST")
    p.add_argument("--image-size", type=int, default=28, help="input side (torchvision archs get 3 channels)")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--train-samples", type=int, default=None, help="train on a seeded subset (quick runs); default all 60k")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the plans are made, applied and run")
    p.add_argument("--latency-batches", type=int, nargs="*", default=None,
                   help="batch sizes for eager latency (default: 1 and 256 on cuda, none on cpu)")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (default mode) instead of eager")
    p.add_argument("--latency-image-size", type=int, default=None,
                   help="input side for the latency runs (default --image-size; convnets take any size)")
    p.add_argument("--budgets", type=float, nargs="+", default=[3, 4, 5, 6, 8])
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, FLOAT])
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--calibration", type=int, default=512, help="calibration images for diag(H_eff)")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--pruned", action="store_true", help="also the 50%%-MACs JBR-pruned model (needs criteria jbr)")
    p.add_argument("--test-limit", type=int, default=None)


def _one_channel(arch: str) -> bool:
    """Whether ``arch`` takes Fashion-MNIST's own single channel (the toolkit's models) rather than RGB."""
    return arch == "small_resnet" or arch in HF_PRESETS


def _data(args: argparse.Namespace, split: str) -> torch.utils.data.Dataset:
    channels = 1 if _one_channel(args.arch) else 3
    return FashionMNIST(split, channels=channels, image_size=args.image_size)


def _models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    train_config = TrainConfig(epochs=args.train_epochs, train_samples=args.train_samples,
                               device=None if args.device == "cpu" else args.device)
    if args.arch in HF_PRESETS:  # its config fixes the classes and the input
        dense = resolve(args.arch, weights="train", train_config=train_config).to(args.device)
    else:
        kwargs = {} if args.arch == "small_resnet" else {"num_classes": 10}
        shape = (1 if args.arch == "small_resnet" else 3, args.image_size, args.image_size)
        dense = resolve(args.arch, weights="train", kwargs=kwargs, input_shape=shape, train_config=train_config).to(args.device)
    models = {"dense": dense}
    if args.pruned:
        train = _data(args, "train")
        pruned = prune(dense, calibration(train, 512, 64, seed=0), "jbr", Target(macs=0.5), progress=False).model
        recalibrate_bn(pruned, calibration(train, 2048, 128, seed=1), progress=False)
        distill(pruned, dense, loader(train, 128, shuffle=True, seed=0), steps=len(train) // 128, progress=False)
        models["jbr-pruned-0.5"] = pruned
    return models


def _hawq_trace_signs(model: torch.nn.Module, calib: Any, probes: int) -> dict[str, Any]:
    """The loss-Hessian traces HAWQ-V2 ranks layers by: a layer whose estimate is <= 0 scores <= 0 at every width."""
    traces = hawq_traces(model, calib, params=[f"{n}.weight" for n in weight_layers(model)], probes=probes)
    values = {p[: -len(".weight")]: (float(t.value), float(t.stderr)) for p, t in traces.items()}
    return {"layers": len(values), "nonpositive": [n for n, (v, _) in values.items() if v <= 0], "traces": values}


def _latencies(model: torch.nn.Module, x: torch.Tensor, batches: list[int], bf16: torch.nn.Module,
               compile_: bool = False) -> dict[str, Any]:
    """Latency (ms) of ``model`` and of its bfloat16 variant ``bf16`` at each batch size, eager or compiled; a model
    that fails to compile gets its error instead."""
    out: dict[str, Any] = {}
    for key, m in (("latency", model), ("latency_bf16", bf16)):
        try:
            run = torch.compile(m) if compile_ else m
            out.update({f"{key}_b{b}_ms": torch_latency_ms(run, x, batch_size=b) for b in batches})
        except Exception as err:  # a compile failure is a result to report, not a crash
            out[f"{key}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return out


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import copy

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda needs a CUDA GPU, and this machine has none", "run with --device cpu")
    batches = ([1, 256] if args.device == "cuda" else []) if args.latency_batches is None else args.latency_batches
    test_set = _data(args, "test")
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, range(args.test_limit))
    test = loader(test_set, 1000)
    calib = calibration(_data(args, "train"), args.calibration, 64, seed=0)
    rows: list[dict[str, Any]] = []
    plans: dict[str, dict[str, int]] = {}
    baselines: dict[str, dict[str, Any]] = {}
    hawq_signs: dict[str, dict[str, Any]] = {}
    for model_name, model in _models(args).items():
        fp32 = compare(model, model, test)
        x = next(iter(test))[0][:1]
        if args.latency_image_size:
            x = torch.zeros(1, x.shape[1], args.latency_image_size, args.latency_image_size)
        if "hawq" in args.allocators:
            hawq_signs[model_name] = _hawq_trace_signs(model, calib, args.probes)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        baselines[model_name] = {"fp32_top1": fp32.top1, "bf16_agreement": compare(bf16, model, test).agreement,
                                 **_latencies(model, x, batches, bf16, args.compile)}
        for budget in args.budgets:
            for name in args.allocators:
                seeds = range(args.random_seeds) if name == "random" else [0]
                for seed in seeds:
                    start = time.perf_counter()
                    try:
                        plan = plan_bits(model, calib, Budget(avg_bits=budget), candidates=args.candidates,
                                         probes=args.probes, seed=seed, device=args.device, **ALLOCATORS[name])
                    except Exception as err:  # an infeasible budget for this allocator is a result, not a crash
                        rows.append({"model": model_name, "budget": budget, "allocator": name, "seed": seed,
                                     "error": str(err)})
                        continue
                    plan_seconds = time.perf_counter() - start
                    quantized = quantize(model, plan)
                    c = compare(quantized, model, test)
                    timed = (_latencies(quantized, x, batches, quantize(bf16, plan), args.compile)
                             if batches and name != "random" else {})
                    rows.append({"model": model_name, "budget": budget, "allocator": name, "seed": seed,
                                 "avg_bits": plan.avg_bits, "size_bytes": plan.size_bytes,
                                 "predicted_tpv": plan.predicted_tpv, "measured_tpv": c.mse, "top1": c.top1,
                                 "fp32_top1": fp32.top1, "agreement": c.agreement, "kl": c.kl,
                                 "plan_seconds": plan_seconds, "bits": plan.bits, "constrained": plan.constrained,
                                 **timed})
                    if name == "tpv":
                        plans[f"{model_name} @ {budget:g}"] = plan.bits
                    print(f"{model_name} avg<={budget:g} {name}[{seed}]: {plan.avg_bits:.2f} bits, agreement "
                          f"{100 * c.agreement:.2f}%, top-1 {100 * c.top1:.2f}%, pred {plan.predicted_tpv:.3g}, "
                          f"meas {c.mse:.3g}", flush=True)

    ok = [r for r in rows if "error" not in r]
    summary = {m: spearman([r["predicted_tpv"] for r in ok if r["model"] == m],
                           [r["measured_tpv"] for r in ok if r["model"] == m]) for m in {r["model"] for r in ok}}
    payload = {"benchmark": "quant", "machine": machine(), "settings": vars(args), "rows": rows,
               "spearman_predicted_vs_measured": summary, "tpv_plans": plans, "float_baselines": baselines,
               "hawq_traces": hawq_signs}
    write_json(out / "quant.json", payload)
    notes = "".join(f"\nHAWQ-V2 on {m}: {len(h['nonpositive'])} of {h['layers']} layer traces Tr(∇²L_l) estimated <= 0 "
                    f"({args.probes} probes): {', '.join(h['nonpositive'][:8]) or 'none'}\n" for m, h in hawq_signs.items())
    write_text(out / "quant.md", _markdown(rows, summary, args) + notes + _latency_markdown(rows, baselines, batches, args.compile),
               overwrite=True)
    _plot(rows, plans, out)
    return payload


def _markdown(rows: list[dict[str, Any]], spearman: dict[str, float], args: argparse.Namespace) -> str:
    text = []
    for model in dict.fromkeys(r["model"] for r in rows):
        table = []
        for budget in args.budgets:
            for name in args.allocators:
                sel = [r for r in rows if r["model"] == model and r["budget"] == budget and r["allocator"] == name]
                good = [r for r in sel if "error" not in r]
                if not good:
                    table.append([f"{budget:g}", name, "infeasible", "", "", "", "", ""])
                    continue
                table.append([f"{budget:g}", name, f"{sum(r['avg_bits'] for r in good) / len(good):.2f}",
                              fmt([r["agreement"] for r in good], digits=2), fmt([r["top1"] for r in good], digits=2),
                              fmt([r["kl"] for r in good], scale=1, digits=4),
                              f"{sum(r['predicted_tpv'] for r in good) / len(good):.3g}",
                              f"{sum(r['measured_tpv'] for r in good) / len(good):.3g}"])
        text.append(f"### {model} (fp32 top-1 {100 * next(r['fp32_top1'] for r in rows if r['model'] == model and 'fp32_top1' in r):.2f}%)\n\n"
                    + markdown_table(["avg-bit budget", "allocator", "avg bits", "agreement %", "top-1 %", "KL",
                                      "predicted TPV", "measured TPV"], table)
                    + f"\nSpearman(predicted TPV, measured output MSE) across all plans: {spearman.get(model, float('nan')):.3f}\n")
    return "\n".join(text)


def _latency_markdown(rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], batches: list[int],
                      compiled: bool) -> str:
    if not batches:
        return ""

    def cells(r: dict[str, Any]) -> list[str]:
        return [f"{r[f'{k}_b{b}_ms']:.2f}" if f"{k}_b{b}_ms" in r else r.get(f"{k}_error", "–")[:60]
                for k in ("latency", "latency_bf16") for b in batches]

    text = [f"\n### {'Compiled' if compiled else 'Eager'} latency (ms, median), quantized vs float\n"]
    header = ["model", "variant"] + [f"{dtype} b{b}" for dtype in ("fp32", "bf16") for b in batches]
    table = []
    for model, base in baselines.items():
        table.append([model, "float (no quantization)"] + cells(base))
        table += [[model, f"{r['allocator']} @ {r['budget']:g} bits"] + cells(r)
                  for r in rows if r["model"] == model and any(k.startswith("latency") for k in r)]
    text.append(markdown_table(header, table))
    return "\n".join(text)


def _plot(rows: list[dict[str, Any]], plans: dict[str, dict[str, int]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5))
    for ax, model in zip(axes, models):
        for name in dict.fromkeys(r["allocator"] for r in ok):
            sel = sorted((r for r in ok if r["model"] == model and r["allocator"] == name), key=lambda r: r["size_bytes"])
            style = "o" if name == "random" else "o-"  # random: several seeds per budget, no line
            ax.plot([r["size_bytes"] / 1024 for r in sel], [100 * r["agreement"] for r in sel], style, label=name, alpha=0.8)
        ax.set(title=f"{model}: agreement with fp32 vs weight size", xlabel="quantized weights (KiB)", ylabel="agreement %")
        ax.legend()
    ax = axes[-1]
    if plans:
        keys = list(plans)
        layer_names = list(plans[keys[0]])
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar([j + i * width for j in range(len(layer_names))], [plans[key].get(n, 0) for n in layer_names],
                   width, label=key)
        ax.set_xticks([j + 0.4 for j in range(len(layer_names))], layer_names, rotation=70, fontsize=7)
        ax.set(title="TPV plan: bits per layer (16 = float)", ylabel="bits")
        ax.legend(fontsize=7)
    save_figure(fig, out / "quant.png")
    plt.close(fig)
