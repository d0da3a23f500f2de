"""``python -m compress.bench allocation``: separate *how many* channels each layer keeps (allocation) from *which*
channels it keeps (selection).

A criterion's result in a global-ranking pruner mixes the two: the normalised scores decide each layer's width,
and the scores within a layer decide its channels. Here the widths come from finished runs of ``python -m
compress.bench pruning`` (``--rows``: its ``pruning-rows.jsonl``, one run per allocation criterion, seed 0 by
default), and each selection criterion removes, one-shot from the dense model, its lowest-scored channels of every
group down to those widths; then BatchNorm recalibration, then top-1. The diagonal (a criterion's own widths,
one-shot) is the control: a row that leads whatever the selection says the allocation carries the result.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import criteria
from criteria.jbr import LAYERS, pruning_graph

from ..adapters import adapter_for
from ..adapters.spec import spec_of
from ..atomic import write_text
from ..batches import first_rows
from ..data import FashionMNIST, calibration, inputs_of, loader
from ..errors import CompressError
from ..evaluate import compare
from ..macs import count_macs_params
from ..nn_helpers import on_model
from ..output import machine, markdown_table, write_json
from ..recover import recalibrate_bn
from .pruning import ARCHS, dense_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="small_resnet", choices=ARCHS)
    p.add_argument("--train-epochs", type=int, default=None, help="as for the pruning benchmark (cache key)")
    p.add_argument("--train-samples", type=int, default=None, help="train the dense model on a subset (tests)")
    p.add_argument("--rows", type=Path, required=True, help="pruning-rows.jsonl of a pruning benchmark run")
    p.add_argument("--allocations", nargs="+", required=True, help="criteria whose widths (runs in --rows) to use")
    p.add_argument("--selections", nargs="+", required=True, choices=criteria.names())
    p.add_argument("--target", type=float, default=0.5, help="the MACs target of the runs to take widths from")
    p.add_argument("--seed", type=int, default=0, help="the seed of those runs, and of the calibration subset")
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--calibration-batch", type=int, default=64)
    p.add_argument("--recal-samples", type=int, default=2048)
    p.add_argument("--test-limit", type=int, default=None)


def widths_of(rows_path: Path, arch: str, criterion: str, target: float, seed: int) -> dict[str, int]:
    """The per-layer output widths of a finished mean-normalised run of ``criterion`` in ``rows_path``: of seed
    ``seed``, else of seed 0 (criteria that use neither data nor randomness run once)."""
    if not rows_path.is_file():
        raise CompressError(f"--rows {rows_path} is not a file", "pass the pruning-rows.jsonl of a pruning benchmark run")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    found = {r.get("seed", 0): r["widths"] for r in rows
             if r.get("arch") == arch and r.get("criterion") == criterion and r.get("target") == target
             and r.get("normalizer", "mean") == "mean" and "widths" in r and "error" not in r}
    widths = found.get(seed, found.get(0))
    if widths is not None:
        return widths
    raise CompressError(f"no finished run of {criterion} on {arch} at {target} in {rows_path}",
                        "run python -m compress.bench pruning for it first, or pick --allocations from that file")


def prune_to_widths(dense: nn.Module, widths: dict[str, int], criterion: str, calib: Any) -> nn.Module:
    """A copy of ``dense`` whose every group keeps ``widths[root layer]`` channels: the highest-scored by
    ``criterion`` (raw scores of the dense model, one shot)."""
    model = copy.deepcopy(dense).eval()
    adapter = adapter_for(model)
    ignored = adapter.never_pruned(model)
    graph = pruning_graph(model, first_rows(on_model(inputs_of(next(iter(calib))), model), 1))
    importance = criteria.get(criterion, calib, normalizer="none")
    torch.manual_seed(0)
    criteria.prepare(importance, model, calib, graph=graph, ignored_layers=ignored)
    names = {m: n for n, m in model.named_modules()}
    plan = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS):
        name = names.get(group[0].dep.target.module)
        count = len(group[0].idxs)
        keep = widths.get(name, count)
        if keep < count:
            scores = importance(group)
            order = torch.randperm(count) if scores is None else scores.double().argsort()
            plan.append((group[0].dep.target.module, group[0].dep.handler, order[:count - keep].tolist()))
    for layer, handler, idxs in plan:  # groups are disjoint: each prunes its own channels
        graph.get_pruning_group(layer, handler, idxs=idxs).prune()
    return model


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    allocations = {a: widths_of(args.rows, args.arch, a, args.target, args.seed) for a in args.allocations}
    dense = dense_model(args).eval()  # after the widths: a missing run is a one-line error before any training
    shape = spec_of(dense).input_shape
    train = FashionMNIST("train", channels=shape[0], image_size=shape[-1])
    test_set = FashionMNIST("test", channels=shape[0], image_size=shape[-1])
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, range(args.test_limit))
    test = loader(test_set, 500)
    calib = calibration(train, args.calibration, args.calibration_batch, seed=args.seed)
    recal = calibration(train, args.recal_samples, 128, seed=1000 + args.seed)
    example = adapter_for(dense).example_inputs(dense)
    dense_macs, _ = count_macs_params(dense, example)
    results = []
    for allocation, widths in allocations.items():
        for selection in args.selections:
            model = prune_to_widths(dense, widths, selection, calib)
            macs, _ = count_macs_params(model, example)
            recalibrate_bn(model, recal, progress=False)
            top1 = compare(model, dense, test).top1
            results.append({"allocation": allocation, "selection": selection, "macs_ratio": macs / dense_macs,
                            "top1_recal": top1})
            print(f"allocation {allocation}, selection {selection}: MACs {macs / dense_macs:.3f}, "
                  f"top-1 after BN recal {100 * top1:.1f}%", flush=True)
    payload = {"benchmark": "allocation", "machine": machine(), "settings": vars(args), "results": results}
    write_json(out / "allocation.json", payload)
    header = ["widths of \\ channels chosen by", *args.selections]
    table = [[a, *[f"{100 * r['top1_recal']:.1f}" for s in args.selections for r in results
                   if r["allocation"] == a and r["selection"] == s]] for a in args.allocations]
    write_text(out / "allocation.md", f"{args.arch}, MACs target {args.target}, seed {args.seed}: top-1 (%) after "
               f"BN recalibration\n\n{markdown_table(header, table)}", overwrite=True)
    return payload
