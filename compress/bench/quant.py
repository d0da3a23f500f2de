"""``python -m compress.bench quant``: TPV bit allocation vs uniform, HAWQ-V2 and random plans under equal budgets.

On the Fashion-MNIST reference model (dense, and optionally pruned to 50% MACs by JBR with BN recalibration and
a short distillation), for each average-bit budget: each allocator's plan, applied with torchao, is compared
with the fp32 model on the 10k test images (top-1, agreement, KL, output MSE = measured TPV) and its predicted
TPV is ranked against the measured one across all plans (Spearman).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..data import FashionMNIST, calibration, loader
from ..evaluate import compare
from ..models import resolve
from ..plan import FLOAT, Budget, plan_bits
from ..quantize import quantize
from ..atomic import write_text
from .output import fmt, machine, markdown_table, save_figure, write_json

ALLOCATORS = {"tpv": dict(allocator="tpv"), "tpv-error": dict(allocator="tpv", predictor="error"),
              "hawq": dict(allocator="hawq"), "uniform": dict(allocator="uniform"), "random": dict(allocator="random")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", type=float, nargs="+", default=[3, 4, 5, 6, 8])
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, FLOAT])
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--calibration", type=int, default=512, help="calibration images for diag(H_eff)")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--pruned", action="store_true", help="also the 50%%-MACs JBR-pruned model (needs criteria jbr)")
    p.add_argument("--test-limit", type=int, default=None)


def _models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    dense = resolve("small_resnet", weights="train")
    models = {"dense": dense}
    if args.pruned:
        from ..prune import Target, prune
        from ..recover import distill, recalibrate_bn

        train = FashionMNIST("train")
        pruned = prune(dense, calibration(train, 512, 64, seed=0), "jbr", Target(macs=0.5), progress=False).model
        recalibrate_bn(pruned, calibration(train, 2048, 128, seed=1), progress=False)
        distill(pruned, dense, loader(train, 128, shuffle=True, seed=0), steps=len(train) // 128, progress=False)
        models["jbr-pruned-0.5"] = pruned
    return models


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    test_set = FashionMNIST("test")
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, range(args.test_limit))
    test = loader(test_set, 1000)
    calib = calibration(FashionMNIST("train"), args.calibration, 64, seed=0)
    rows: list[dict[str, Any]] = []
    plans: dict[str, dict[str, int]] = {}
    for model_name, model in _models(args).items():
        fp32 = compare(model, model, test)
        for budget in args.budgets:
            for name in args.allocators:
                seeds = range(args.random_seeds) if name == "random" else [0]
                for seed in seeds:
                    start = time.perf_counter()
                    try:
                        plan = plan_bits(model, calib, Budget(avg_bits=budget), candidates=args.candidates,
                                         probes=args.probes, seed=seed, **ALLOCATORS[name])
                    except Exception as err:  # an infeasible budget for this allocator is a result, not a crash
                        rows.append({"model": model_name, "budget": budget, "allocator": name, "seed": seed,
                                     "error": str(err)})
                        continue
                    plan_seconds = time.perf_counter() - start
                    c = compare(quantize(model, plan), model, test)
                    rows.append({"model": model_name, "budget": budget, "allocator": name, "seed": seed,
                                 "avg_bits": plan.avg_bits, "size_bytes": plan.size_bytes,
                                 "predicted_tpv": plan.predicted_tpv, "measured_tpv": c.mse, "top1": c.top1,
                                 "fp32_top1": fp32.top1, "agreement": c.agreement, "kl": c.kl,
                                 "plan_seconds": plan_seconds, "bits": plan.bits})
                    if name == "tpv":
                        plans[f"{model_name} @ {budget:g}"] = plan.bits
                    print(f"{model_name} avg<={budget:g} {name}[{seed}]: {plan.avg_bits:.2f} bits, agreement "
                          f"{100 * c.agreement:.2f}%, top-1 {100 * c.top1:.2f}%, pred {plan.predicted_tpv:.3g}, "
                          f"meas {c.mse:.3g}", flush=True)
    from criteria.qnoise import spearman

    ok = [r for r in rows if "error" not in r]
    summary = {m: spearman([r["predicted_tpv"] for r in ok if r["model"] == m],
                           [r["measured_tpv"] for r in ok if r["model"] == m]) for m in {r["model"] for r in ok}}
    payload = {"benchmark": "quant", "machine": machine(), "settings": vars(args), "rows": rows,
               "spearman_predicted_vs_measured": summary, "tpv_plans": plans}
    write_json(out / "quant.json", payload)
    write_text(out / "quant.md", _markdown(rows, summary, args), overwrite=True)
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
