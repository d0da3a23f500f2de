"""``python -m compress.bench pruning``: every criterion, under each normaliser, in two protocols, on the Fashion-MNIST
benchmark models.

Protocols (:mod:`compress.bench.pruning_protocols`): ``ours`` (MACs targets, then BN recalibration, then
distillation) and ``paper`` (the TPV paper's: global share of filters 10–90%, no recovery). Arms: ``--normalizers``
(each criterion's scores rescaled the same way, :mod:`criteria.normalize`) and ``--mean-replacement``. The seed
varies the calibration subset and the random criterion; criteria that use neither run once. Every finished run is
appended to ``pruning-rows.jsonl`` in the output folder and skipped when the command is run again, so the grid can
be run in parts (and resumed) into one folder; a run that failed is tried again, its new row replacing the failed
one. JSON, Markdown and plots cover every run of the folder, each by its latest row.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import criteria

from ..adapters.spec import spec_of
from ..atomic import write_text
from ..data import FashionMNIST, calibration, loader
from ..errors import CompressError
from ..evaluate import compare
from ..models import HF_PRESETS, IMAGE_PRESETS, default_train_config, resolve
from ..output import fmt, machine, markdown_table, mean_std, save_figure, write_json
from .pruning_protocols import STAGES, paper_mean_top1, run_ours, run_paper, seeded

ARCHS = ("small_resnet", *IMAGE_PRESETS, *HF_PRESETS)  # models trained on the embedded Fashion-MNIST (cached)
DEFAULT_CRITERIA = [n for n in criteria.names() if n != "jbr-mac"]  # jbr-mac is jbr under --normalizers macs
ROWS_FILE = "pruning-rows.jsonl"
KEY = ("protocol", "arch", "criterion", "normalizer", "mean_replacement", "target", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="small_resnet", choices=ARCHS)
    p.add_argument("--train-epochs", type=int, default=None, help="epochs of the dense model's training (default: "
                   "compress.models.PRESET_TRAIN_EPOCHS of the arch, else TrainConfig's); part of its cache key")
    p.add_argument("--train-samples", type=int, default=None, help="train the dense model on a subset (tests)")
    p.add_argument("--protocol", default="ours", choices=("ours", "paper"))
    p.add_argument("--criteria", nargs="+", default=DEFAULT_CRITERIA, type=criterion_arg,
                   help="registered names, or SELECT@ALLOCATE (e.g. jbr-centred@bn)")
    p.add_argument("--normalizers", nargs="+", default=["none", "mean"], choices=criteria.NORMALIZERS)
    p.add_argument("--mean-replacement", default="off", choices=("off", "on", "both"))
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3], help="MACs fractions (ours)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5,
                   help="pruning steps (ours), the same for every criterion; prune itself takes one for SELECT@ALLOCATE")
    p.add_argument("--calibration", type=int, default=512, help="calibration samples")
    p.add_argument("--calibration-batch", type=int, default=64)
    p.add_argument("--recal-samples", type=int, default=2048)
    p.add_argument("--distill-epochs", type=float, default=1.0, help="0 skips distillation (ours)")
    p.add_argument("--distill-criteria", nargs="+", default=None, help="distil only these (default: all)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--option", action="append", default=[], metavar="CRITERION:KEY=VALUE",
                   help="a criterion option (VALUE read as JSON), e.g. jbr-ref:samples=6400; repeatable")
    p.add_argument("--recalibrate-steps", action="store_true",
                   help="re-estimate BN statistics on the calibration inputs between pruning steps (ours)")


def criterion_arg(name: str) -> str:
    """``name`` when it is a registered criterion or SELECT@ALLOCATE of two (an argparse type)."""
    try:
        criteria.parts(name)
    except CompressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return name


def criterion_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["jbr-ref:samples=6400", ...]`` -> {"jbr-ref": {"samples": 6400}}; a one-line error for a malformed item."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, assignment = item.partition(":")
        key, equals, value = assignment.partition("=")
        if not (name and key and equals) or name not in criteria.names():
            raise CompressError(f"--option {item!r} is not CRITERION:KEY=VALUE with a registered criterion",
                                "e.g. --option jbr-ref:samples=6400")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(name, {})[key] = parsed
    return options


def dense_model(args: argparse.Namespace) -> torch.nn.Module:
    """The cached dense model of ``--arch`` (trained on first use with ``--train-epochs``/``--train-samples``)."""
    config = replace(default_train_config(args.arch), train_samples=args.train_samples)
    if args.train_epochs:
        config = replace(config, epochs=args.train_epochs)
    return resolve(args.arch, weights="train", train_config=config, progress=False)


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in KEY)


def _load_rows(path: Path) -> list[dict[str, Any]]:
    """Each run's latest row (a retried run's new row replaces its failed one), in the order runs first appear."""
    if not path.is_file():
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[_key(row)] = row
    return list(latest.values())


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:  # one line per finished run: an interrupted grid loses only the run in progress
        f.write(json.dumps(row, default=str) + "\n")


def _planned(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run the command asks for, in order (seed-free criteria once)."""
    replacements = {"off": [False], "on": [True], "both": [False, True]}[args.mean_replacement]
    targets = args.targets if args.protocol == "ours" else [None]
    runs = []
    for seed in range(args.seeds):
        for target in targets:
            for name in args.criteria:
                if seed > 0 and not seeded(name):
                    continue
                for normalizer in args.normalizers:
                    for replacement in replacements:
                        runs.append({"protocol": args.protocol, "arch": args.arch, "criterion": name,
                                     "normalizer": normalizer, "mean_replacement": replacement, "target": target,
                                     "seed": seed})
    return runs


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    options = criterion_options(args.option)
    dense = dense_model(args)
    channels, size = spec_of(dense).input_shape[0], spec_of(dense).input_shape[-1]
    train = FashionMNIST("train", channels=channels, image_size=size)
    test_set = FashionMNIST("test", channels=channels, image_size=size)
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, range(args.test_limit))
    test = loader(test_set, 500)
    dense_top1 = compare(dense, dense, test).top1
    rows_path = out / ROWS_FILE
    done = {_key(r) for r in _load_rows(rows_path) if "error" not in r}  # failed runs are tried again
    distill_steps = int(args.distill_epochs * len(train) // 128)
    for row in _planned(args):
        if _key(row) in done:
            continue
        seed = row["seed"]
        calib = calibration(train, args.calibration, args.calibration_batch, seed=seed,
                            with_labels=criteria.needs_labels(row["criterion"]))  # (input, label) for jacobian
        torch.manual_seed(seed)
        row["dense_top1"] = dense_top1
        try:
            if args.protocol == "ours":
                distilled = args.distill_criteria is None or row["criterion"] in args.distill_criteria
                run_ours(row, dense, calib, calibration(train, args.recal_samples, 128, seed=1000 + seed), test,
                         (lambda: loader(train, 128, shuffle=True, seed=seed)) if distilled else None, distill_steps,
                         args.steps, args.recalibrate_steps, options.get(row["criterion"]))
            else:
                run_paper(row, dense, calib, test, options.get(row["criterion"]))
        except Exception as err:  # a criterion that cannot reach the target is a result
            row["error"] = f"{type(err).__name__}: {err}"
        _append_row(rows_path, row)
        print(_progress_line(row), flush=True)
    rows = _load_rows(rows_path)
    payload = {"benchmark": "pruning", "machine": machine(), "settings": vars(args), "rows": rows}
    write_json(out / "pruning.json", payload)
    write_text(out / "pruning.md", markdown(rows), overwrite=True)
    plot(rows, out)
    return payload


def _progress_line(row: dict[str, Any]) -> str:
    name = f"{row['arch']} {row['protocol']} {row['criterion']}/{row['normalizer']}" + (
        "+mr" if row["mean_replacement"] else "") + f" seed {row['seed']}"
    if "error" in row:
        return f"{name}: {row['error']}"
    if row["protocol"] == "paper":
        return f"{name}: mean top-1 over 10-70% filters {100 * paper_mean_top1(row):.1f}% ({row['prune_seconds']:.0f} s)"
    return f"{name} @ {row['target']}: MACs {row['macs_ratio']:.3f} " + " ".join(
        f"{s} {100 * row[f'top1_{s}']:.1f}%" for s in STAGES if f"top1_{s}" in row)


def _arm(row: dict[str, Any]) -> str:
    return row["normalizer"] + (" + mean repl." if row["mean_replacement"] else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """One section per (arch, protocol): ours per MACs target, paper as top-1 per share of filters."""
    text = []
    for arch, protocol in sorted({(r["arch"], r["protocol"]) for r in rows}):
        sel = [r for r in rows if r["arch"] == arch and r["protocol"] == protocol]
        dense = sel[0].get("dense_top1", float("nan"))
        text.append(f"## {arch}, protocol {protocol} (dense top-1 {100 * dense:.2f}%; mean ± std over seeds; top-1 in %)\n")
        text.append(_ours_tables(sel) if protocol == "ours" else _paper_table(sel))
    return "\n".join(text)


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(criterion, arm, rows) in first-seen order."""
    order: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        order.setdefault((r["criterion"], _arm(r)), []).append(r)
    return [(c, a, rs) for (c, a), rs in order.items()]


def _ours_tables(rows: list[dict[str, Any]]) -> str:
    header = ["criterion", "normaliser", "seeds", "MACs", "top-1 pruned", "top-1 BN-recal", "top-1 distilled", "prune s"]
    text = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        table = []
        for name, arm, sel in _groups([r for r in rows if r["target"] == target]):
            good = [r for r in sel if "error" not in r]
            if not good:
                table.append([name, arm, len(sel), "failed: " + sel[0]["error"][:60], "", "", "", ""])
                continue
            table.append([name, arm, len(good), fmt([r["macs_ratio"] for r in good], 1, 3)]
                         + [fmt([r.get(f"top1_{s}") for r in good]) for s in STAGES]
                         + [f"{mean_std([r['prune_seconds'] for r in good])[0]:.0f}"])
        text.append(f"### MACs target {target}\n\n" + markdown_table(header, table))
    return "\n".join(text)


def _paper_table(rows: list[dict[str, Any]]) -> str:
    shares = sorted({p["filters_removed"] for r in rows for p in r.get("points", [])})
    header = ["criterion", "normaliser", "seeds", "mean 10–70%"] + [f"{round(100 * s)}%" for s in shares] + ["s"]
    table = []
    for name, arm, sel in _groups(rows):
        good = [r for r in sel if "points" in r]
        if not good:
            table.append([name, arm, len(sel), "failed: " + sel[0].get("error", "?")[:60]] + [""] * (len(shares) + 1))
            continue
        cells = [fmt([next((p["top1"] for p in r["points"] if p["filters_removed"] == s), None) for r in good])
                 for s in shares]
        table.append([name, arm, len(good), fmt([paper_mean_top1(r) for r in good])] + cells
                     + [f"{mean_std([r['prune_seconds'] for r in good])[0]:.0f}"])
    macs = {s: mean_std([p["macs_ratio"] for r in rows for p in r.get("points", []) if p["filters_removed"] == s])[0]
            for s in shares}
    note = "MACs kept (mean over criteria): " + ", ".join(f"{round(100 * s)}%: {macs[s]:.2f}" for s in shares)
    return markdown_table(header, table) + "\n" + note + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """pruning.png: per (arch, protocol), top-1 against MACs (ours: one panel per stage; paper: against the share
    of filters, MACs and parameters), one line per criterion and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for arch, protocol in sorted({(r["arch"], r["protocol"]) for r in rows}):
        sel = [r for r in rows if r["arch"] == arch and r["protocol"] == protocol and "error" not in r]
        if protocol == "ours":
            panels += [(arch, protocol, sel, s) for s in STAGES if any(f"top1_{s}" in r for r in sel)]
        else:
            panels += [(arch, protocol, sel, axis) for axis in ("filters_removed", "macs_ratio", "params_ratio")]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (arch, protocol, sel, what) in zip(axes[0], panels):
        for i, (name, arm, group) in enumerate(_groups(sel)):
            points = _curve(group, protocol, what)
            if points:
                xs, ys, es = zip(*sorted(points))
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=f"{name} ({arm})",
                            color=plt.cm.tab20(i % 20), ls="-" if name.startswith(("jbr", "jacobian")) else "--")
        xlabel = {"filters_removed": "share of filters removed", "macs_ratio": "MACs kept", "params_ratio": "params kept"}
        ax.set(title=f"{arch} {protocol}: " + (f"after {what}" if protocol == "ours" else "no recovery"),
               xlabel=xlabel.get(what, "MACs kept (fraction of dense)"), ylabel="top-1 %")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, out / "pruning.png")
    plt.close(fig)


def _curve(rows: list[dict[str, Any]], protocol: str, what: str) -> list[tuple[float, float, float]]:
    if protocol == "ours":
        points = []
        for target in sorted({r["target"] for r in rows}):
            good = [r for r in rows if r["target"] == target and f"top1_{what}" in r]
            if good:
                m, s = mean_std([100 * r[f"top1_{what}"] for r in good])
                points.append((mean_std([r["macs_ratio"] for r in good])[0], m, s))
        return points
    shares = sorted({p["filters_removed"] for r in rows for p in r["points"]})
    points = []
    for share in shares:
        at = [p for r in rows for p in r["points"] if p["filters_removed"] == share]
        m, s = mean_std([100 * p["top1"] for p in at])
        points.append((mean_std([p[what] for p in at])[0], m, s))
    return points

