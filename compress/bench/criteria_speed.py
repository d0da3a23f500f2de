"""``python -m compress.bench criteria``: cost of each criterion's scoring per calibration image, relative to a
plain forward+backward of the same model on the same batches (throughput ratio, measured in one run).

Scoring = ``criteria.prepare`` (the calibration passes, told the groups to score as :func:`compress.prune` does) +
one ``__call__`` per prunable group. Plain = cross-entropy forward + backward per batch. On CUDA: bf16 autocast and
channels_last for both. "state": what a gate criterion keeps between passes (per-group sums and moments, kept
rows), the frozen dense targets excluded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import criteria

from ..adapters import adapter_for
from ..atomic import write_text
from ..errors import CompressError
from ..models import resolve, spec_of
from ..output import machine, markdown_table, write_json
from ..prune import DEFAULT_CRITERION
from .pruning import criterion_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_resnet")
    p.add_argument("--weights", default="random")
    p.add_argument("--criteria", nargs="+", default=[DEFAULT_CRITERION, *criteria.names()], type=criterion_arg,
                   help="registered names or SELECT@ALLOCATE (default: prune's default and every registered one)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timings are the minimum over repeats")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    model = resolve(args.model, args.weights).to(device).eval()
    shape = spec_of(model).input_shape
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, *shape, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(args.batches)]
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = args.batch_size * args.batches

    def plain() -> None:
        for x, _ in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            F.cross_entropy(logits.float(), logits.detach().argmax(1)).backward()
        model.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    plain()  # warm-up
    base = timed(plain)
    adapter, example = adapter_for(model), batches[0][0][:1]
    graph = adapter.dependency_graph(model, example)
    ignored = adapter.never_pruned(model) + adapter.outside_pruning_scope(model, example)
    groups = list(graph.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear], ignored_layers=ignored))
    rows = []
    for name in args.criteria:
        state = [0]

        def score() -> None:
            imp = criteria.get(name)
            criteria.prepare(imp, model, batches, graph, ignored)
            for group in groups:
                imp(group)
            model.zero_grad(set_to_none=True)
            state[0] = getattr(imp, "state_bytes", 0)  # a NormalizedImportance reads it from its criterion

        try:
            seconds = timed(score)
        except CompressError as err:  # e.g. jbr-ref on random weights: no confident sample
            rows.append({"criterion": name, "error": str(err)})
            print(f"{name}: {err}", flush=True)
            continue
        rows.append({"criterion": name, "ms_per_image": 1000 * seconds / images,
                     "throughput_vs_fwd_bwd": base / seconds, "state_bytes": state[0]})
        print(f"{name}: {1000 * seconds / images:.3f} ms/image, {base / seconds:.2f}x plain fwd+bwd throughput, "
              f"state {state[0] / 1e3:.1f} kB", flush=True)
    payload = {"benchmark": "criteria", "machine": machine(), "settings": vars(args),
               "plain_fwd_bwd_ms_per_image": 1000 * base / images, "rows": rows}
    write_json(out / "criteria.json", payload)
    table = [[r["criterion"], "failed: " + r["error"][:60], "", ""] if "error" in r else
             [r["criterion"], f"{r['ms_per_image']:.3f}", f"{r['throughput_vs_fwd_bwd']:.2f}",
              f"{r['state_bytes'] / 1e3:.1f}"] for r in rows]
    write_text(out / "criteria.md", f"{args.model}, batch {args.batch_size} x {args.batches}, {device}; plain fwd+bwd "
               f"{1000 * base / images:.3f} ms/image\n\n" + markdown_table(["criterion", "ms / image", "throughput vs plain fwd+bwd", "state kB"], table),
               overwrite=True)
    return payload
