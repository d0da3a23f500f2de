"""``python -m compress.bench pruning``: every criterion at several MACs targets on the Fashion-MNIST reference model.

Per (criterion, target, seed): top-1 and agreement with the dense model right after pruning, after BatchNorm
recalibration, and after distillation from the dense model (``--distill-epochs``). The seed varies the
calibration subset and the random criterion. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import criteria

from ..atomic import write_text
from ..data import FashionMNIST, calibration, loader
from ..evaluate import compare
from ..models import resolve
from ..prune import Target, prune
from ..output import fmt, machine, markdown_table, mean_std, save_figure, write_json
from ..recover import distill, recalibrate_bn
from ..train import TrainConfig

STAGES = ("pruned", "recal", "distill")


ARCHS = ("small_resnet", "vit_fmnist")  # models trained on the embedded Fashion-MNIST (cached)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="small_resnet", choices=ARCHS,
                   help="vit_fmnist: a transformers ViT (patches of 7), MLP channels pruned")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs of the dense model's training "
                   "(default: TrainConfig's); part of its cache key")
    p.add_argument("--criteria", nargs="+", default=criteria.names(), choices=criteria.names())
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--recal-samples", type=int, default=2048)
    p.add_argument("--distill-epochs", type=float, default=1.0, help="0 skips distillation")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--recalibrate-steps", action="store_true",
                   help="re-estimate BN statistics on the calibration inputs between pruning steps")


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    train_config = TrainConfig() if args.train_epochs is None else TrainConfig(epochs=args.train_epochs)
    dense = resolve(args.arch, weights="train", train_config=train_config)
    train, test_set = FashionMNIST("train"), FashionMNIST("test")
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, range(args.test_limit))
    test = loader(test_set, 1000)
    dense_top1 = compare(dense, dense, test).top1
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        calib = calibration(train, args.calibration, 64, seed=seed)
        recal = calibration(train, args.recal_samples, 128, seed=1000 + seed)
        for target in args.targets:
            for name in args.criteria:
                torch.manual_seed(seed)
                row: dict[str, Any] = {"criterion": name, "target": target, "seed": seed}
                start = time.perf_counter()
                try:
                    r = prune(dense, calib, name, Target(macs=target), steps=args.steps,
                              recalibrate=args.recalibrate_steps, progress=False)
                except Exception as err:  # a criterion that cannot reach the target is a result
                    rows.append({**row, "error": str(err)})
                    print(f"{name} @ {target}: {err}", flush=True)
                    continue
                row.update(macs_ratio=r.macs_ratio, params_ratio=r.params_ratio, prune_seconds=time.perf_counter() - start,
                           widths={l.name: l.after for l in r.layers})
                for stage in STAGES:
                    if stage == "recal":
                        recalibrate_bn(r.model, recal, progress=False)
                    elif stage == "distill":
                        if args.distill_epochs <= 0:
                            break
                        steps = int(args.distill_epochs * len(train) // 128)
                        start = time.perf_counter()
                        distill(r.model, dense, loader(train, 128, shuffle=True, seed=seed), steps=steps, seed=seed,
                                progress=False)
                        row["distill_seconds"] = time.perf_counter() - start
                    c = compare(r.model, dense, test)
                    row[f"top1_{stage}"], row[f"agreement_{stage}"], row[f"kl_{stage}"] = c.top1, c.agreement, c.kl
                rows.append(row)
                print(f"{name} @ {target} seed {seed}: MACs {r.macs_ratio:.3f} "
                      + " ".join(f"{s} {100 * row[f'top1_{s}']:.1f}%" for s in STAGES if f"top1_{s}" in row), flush=True)
    payload = {"benchmark": "pruning", "machine": machine(), "settings": vars(args), "dense_top1": dense_top1, "rows": rows}
    write_json(out / "pruning.json", payload)
    write_text(out / "pruning.md", _markdown(rows, args, dense_top1), overwrite=True)
    _plot(rows, args, out, dense_top1)
    return payload


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace, dense_top1: float) -> str:
    header = ["criterion", "MACs", "params", "top-1 pruned", "top-1 BN-recal", "top-1 distilled", "agreement distilled",
              "prune s"]
    text = [f"{args.arch}: dense top-1 {100 * dense_top1:.2f}%; mean ± std over {args.seeds} seed(s); top-1 in %.\n"]
    for target in args.targets:
        table = []
        for name in args.criteria:
            sel = [r for r in rows if r["criterion"] == name and r["target"] == target]
            good = [r for r in sel if "error" not in r]
            if not good:
                table.append([name, "failed: " + (sel[0]["error"][:60] if sel else "?")] + [""] * 6)
                continue
            table.append([name, fmt([r["macs_ratio"] for r in good], 1, 3), fmt([r["params_ratio"] for r in good], 1, 3)]
                         + [fmt([r.get(f"top1_{s}") for r in good]) for s in STAGES]
                         + [fmt([r.get("agreement_distill") for r in good]), f"{mean_std([r['prune_seconds'] for r in good])[0]:.1f}"])
        text.append(f"### MACs target {target}\n\n" + markdown_table(header, table))
    return "\n".join(text)


def _plot(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path, dense_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(f"top1_{s}" in r for r in rows)]
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), sharey=True)
    for ax, stage in zip([axes] if len(stages) == 1 else axes, stages):
        for i, name in enumerate(args.criteria):
            points = []
            for target in args.targets:
                good = [r for r in rows if r["criterion"] == name and r["target"] == target and f"top1_{stage}" in r]
                if good:
                    m, s = mean_std([100 * r[f"top1_{stage}"] for r in good])
                    points.append((mean_std([r["macs_ratio"] for r in good])[0], m, s))
            if points:
                xs, ys, es = zip(*sorted(points))
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name, color=plt.cm.tab20(i % 20),
                            ls="-" if name.startswith(("jbr", "jacobian")) else "--")
        ax.axhline(100 * dense_top1, color="k", ls="--", lw=0.8, label="dense")
        ax.set(title=f"top-1 after: {stage}", xlabel="MACs kept (fraction of dense)", ylabel="top-1 %")
    (axes if len(stages) > 1 else [axes])[0].legend(fontsize=7)
    save_figure(fig, out / "pruning.png")
    plt.close(fig)
