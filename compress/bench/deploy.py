"""``python -m compress.bench deploy``: dense fp32 vs pruned fp32 vs pruned + mixed weight-only vs pruned + int8 QDQ.

Each model goes through the recipe runner (compress.recipe) with the same settings: prune to ``--target`` MACs,
recover, allocate ``--avg-bits`` by TPV, quantize with torchao, export ONNX and run every file in onnxruntime
(CPU, ``--threads``). Per model and variant: file size, latency at batch 1 and 32 (median of ``--runs`` after
warm-up; speed-ups are ratios within one run), top-1 on the Fashion-MNIST test set for the trained reference
model; the torchvision models use random weights and random inputs at 224x224 (structure and speed only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..output import machine, markdown_table, save_figure, write_json
from ..recipe.config import (CheckSection, DataSection, ExportSection, ModelSection, PruneSection, QuantizeSection,
                             Recipe, RecoverSection)
from ..recipe.report import rows
from ..recipe.runner import run_recipe
from ..recipe.variants import Variant

# the recipe variants this benchmark compares, and how its table names them
VARIANTS = {Variant.DENSE: "dense fp32", Variant.RECOVERED: "pruned fp32", Variant.QUANTIZED: "pruned + mixed weight-only",
            Variant.INT8: "pruned + int8 QDQ"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["small_resnet", "resnet18", "resnet50"],
                   help="small_resnet (trained on Fashion-MNIST) and/or torchvision names (random weights, 224x224)")
    p.add_argument("--criterion", default="jbr-mac", help="pruning criterion for the trained model")
    p.add_argument("--criterion-random", default="l1", help="criterion for random-weight models (scores mean nothing)")
    p.add_argument("--target", type=float, default=0.5, help="MACs fraction kept")
    p.add_argument("--target-latency", type=float, default=None,
                   help="instead of --target: the pruned + int8 file's latency as a fraction of the dense fp32 file's "
                        "(batch 1, --threads), searched by prune's latency target")
    p.add_argument("--round-to", type=int, default=8, help="channel multiple kept by pruning (4 for small_resnet)")
    p.add_argument("--avg-bits", type=float, default=5.0)
    p.add_argument("--distill-steps", type=int, default=469, help="recovery for the trained model (0: BN recal only)")
    p.add_argument("--runs", type=int, default=20, help="latency runs per batch size (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="CI-sized: few samples, steps and runs (numbers meaningless)")
    p.add_argument("--no-openvino", dest="openvino", action="store_false",
                   help="skip the OpenVINO latency columns (they need the openvino extra)")


def _recipe(name: str, args: argparse.Namespace) -> Recipe:
    trained = name == "small_resnet"
    quick = args.quick
    # quick (CI-sized): every width reachable, so a run on few samples cannot miss the MACs target by one jump of 4
    round_to = (None if quick else 4) if trained else args.round_to
    return Recipe(
        name=f"deploy-{name}", description=f"compress.bench deploy: {name}", seed=0,
        model=ModelSection(arch=name, weights="train" if trained else "random"),
        data=DataSection(source="fashion-mnist" if trained else "synthetic", calibration_samples=64 if quick else 512,
                         recalibration_samples=128 if quick else 2048, eval_samples=500 if quick else None,
                         synthetic_samples=16 if quick else 64, batch_size=32, eval_batch_size=500 if trained else 16),
        prune=PruneSection(criterion=args.criterion if trained else args.criterion_random,
                           target_macs=None if args.target_latency else args.target, target_latency=args.target_latency,
                           latency_activations="int8", steps=None if trained else 2,  # None: prune's default for the criterion
                           round_to=round_to),
        recover=RecoverSection(distill_steps=(5 if quick else args.distill_steps) if trained else 0),
        quantize=QuantizeSection(avg_bits=args.avg_bits, calibration_samples=32 if quick else (256 if trained else 32)),
        export=ExportSection(int8_activations=True),
        check=CheckSection(samples=200 if quick else (None if trained else 32), latency_runs=3 if quick else args.runs,
                           threads=args.threads, openvino=args.openvino),
    )


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    results = []
    for name in args.models:
        recipe = _recipe(name, args)
        run_ = run_recipe(recipe, out / f"deploy-{name}", overwrite=True, progress=False)
        by_key = {r["variant"]: r for r in rows(run_.report)}
        dense = by_key[Variant.DENSE]
        for key, label in VARIANTS.items():
            r = by_key.get(key)
            if r is None:
                continue
            b1, b32 = float(r["latency_b1"]), float(r["latency_b32"])
            openvino = {f"openvino_{b}_ms": None if r[f"openvino_{b}"] == "–" else float(r[f"openvino_{b}"]) for b in ("b1", "b32")}
            results.append({"model": name, "variant": label, "size_mb": r["size_bytes"] / 1e6,
                            "size_ratio": r["size_bytes"] / dense["size_bytes"], "latency_b1_ms": b1,
                            "latency_b32_ms": b32, "speedup_b1": float(dense["latency_b1"]) / b1,
                            "speedup_b32": float(dense["latency_b32"]) / b32, "macs": r["macs"],
                            "top1": r["top1"] if not run_.report["timing_only"] else None,
                            "dense_agreement": r["dense_agreement"] if not run_.report["timing_only"] else None,
                            "check_passed": run_.passed, "default_b1_ms": float(r["default_b1"]), **openvino})
    payload = {"benchmark": "deploy", "args": {k: v for k, v in vars(args).items() if k != "out"},
               "machine": machine(), "rows": results}
    write_json(out / "deploy.json", payload)
    write_text(out / "deploy.md", _markdown(results, args), overwrite=True)
    _plot(results, out / "deploy.png")
    return payload


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    goal = (f"the pruned + int8 file to {args.target_latency} of the dense latency" if args.target_latency
            else f"{args.target} MACs")
    head = (f"Prune to {goal}, {args.avg_bits} avg bits, onnxruntime CPU {args.threads} threads, median "
            f"of {args.runs} runs{' (QUICK: numbers meaningless)' if args.quick else ''}.\n\n")
    table = [[r["model"], r["variant"], f"{r['size_mb']:.2f}", f"{r['size_ratio']:.2f}", f"{r['latency_b1_ms']:.2f}",
              f"{r['speedup_b1']:.2f}x", f"{r['latency_b32_ms']:.1f}", f"{r['speedup_b32']:.2f}x",
              f"{r['default_b1_ms']:.2f}", _ms(r["openvino_b1_ms"]), _ms(r["openvino_b32_ms"]),
              "–" if r["top1"] is None else f"{100 * r['top1']:.2f}"] for r in results]
    return head + markdown_table(["model", "variant", "MB", "size vs dense", "b1 ms", "speed-up b1", "b32 ms",
                                  "speed-up b32", "default session b1 ms", "OpenVINO b1 ms", "OpenVINO b32 ms",
                                  "top-1 %"], table) + (
        "\nonnxruntime columns with the session options `exporters.open_session` applies; the default-session column "
        "without any; OpenVINO: CPU plugin, float32 precision, no dynamic activation quantization.\n")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in results if r["model"] == model]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["speedup_b1"] for r in mine], 0.4, label="batch 1")
        ax.bar([i + 0.2 for i in x], [r["speedup_b32"] for r in mine], 0.4, label="batch 32")
        ax.set_xticks(list(x), [r["variant"] for r in mine], rotation=30, ha="right", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("speed-up vs dense fp32")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)

