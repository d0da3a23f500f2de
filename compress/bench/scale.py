"""``python -m compress.bench scale``: JBR scoring memory against the calibration-set size, and calibration and
distillation throughput at world sizes 1 and 2 (torch.distributed, gloo, processes spawned here).

Memory: the state JBR keeps after a pass (its per-group sums; with ``keep_rows`` also every per-sample row),
counted in bytes, for growing calibration sets, and the largest relative difference between the two modes'
scores. Throughput: one JBR pass over the same calibration set (split across the ranks) and ``--distill-steps``
distillation steps with the same global batch, wall time of the slowest rank, each rank with
``cores // world`` threads.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import criteria

from ..adapters import adapter_for
from ..atomic import write_text
from ..data import available_cores, calibration, loader, synthetic
from ..models import resolve, spec_of
from ..output import machine, markdown_table, write_json
from ..recover import distill


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_resnet")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="calibration samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=2048, help="calibration samples of the throughput runs")
    p.add_argument("--distill-steps", type=int, default=20)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])


def memory_rows(model: torch.nn.Module, sizes: list[int], batch_size: int) -> list[dict[str, Any]]:
    """JBR's kept state and score agreement of the summed (default) and kept-rows modes at each size."""
    shape = spec_of(model).input_shape
    example = torch.zeros(1, *shape)
    adapter = adapter_for(model)
    ignored = adapter.never_pruned(model)
    groups = list(adapter.dependency_graph(model, example).get_all_groups(
        root_module_types=(torch.nn.Conv2d, torch.nn.Linear), ignored_layers=ignored))
    rows = []
    for size in sizes:
        data = calibration(synthetic(size, shape), size, batch_size)
        summed, kept = criteria.get("jbr", data), criteria.get("jbr", data, keep_rows=True)
        criteria.prepare(summed, model, ignored_layers=ignored), criteria.prepare(kept, model)
        diff = max(float(((summed(g) - kept(g)).abs() / kept(g).abs().clamp_min(1e-30)).max()) for g in groups)
        targets = sum(t.nbytes for t in summed.dense_targets)
        rows.append({"samples": size, "summed_bytes": summed.state_bytes, "rows_bytes": kept.state_bytes,
                     "dense_targets_bytes": targets, "max_rel_diff": diff})
    return rows


def _worker(rank: int, world: int, folder: str, model_name: str, samples: int, batch_size: int, steps: int) -> None:
    torch.set_num_threads(max(1, available_cores() // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    model = resolve(model_name, "random").eval()
    shape = spec_of(model).input_shape
    data = calibration(synthetic(samples, shape), samples, batch_size)
    times = {}
    for name, work in (("calibration", lambda: criteria.prepare(criteria.get("jbr", data), model,
                                                                      ignored_layers=[])),
                       ("distillation", lambda: distill(resolve(model_name, "random"), model,
                                                        loader(synthetic(samples, shape), batch_size, shuffle=True,
                                                               shard=True),
                                                        steps=steps, progress=False))):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        work()
        if world > 1:
            dist.barrier()
        times[name] = time.perf_counter() - start
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(times, Path(folder) / "times.pt")


def throughput_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory(prefix="compress-scale-") as folder:
            work = (world, folder, args.model, args.samples, args.batch_size, args.distill_steps)
            if world == 1:
                _worker(0, *work)
            else:
                mp.start_processes(_worker, args=work, nprocs=world, start_method="spawn")
            times = torch.load(Path(folder) / "times.pt")
        rows.append({"world": world, "threads_per_rank": max(1, available_cores() // world),
                     "calibration_images_per_s": args.samples / times["calibration"],
                     "distill_steps_per_s": args.distill_steps / times["distillation"]})
    return rows


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    model = resolve(args.model, "random").eval()
    memory = memory_rows(model, args.sizes, args.batch_size)
    speed = throughput_rows(args)
    payload = {"machine": machine(), "model": args.model, "memory": memory, "throughput": speed}
    write_json(out / "scale.json", payload)
    base = speed[0]
    text = ["# Scale-out: JBR memory and data-parallel throughput", "",
            markdown_table(["calibration samples", "JBR state, summed (bytes)", "JBR state, kept rows (bytes)",
                            "dense predictions (bytes)", "max rel. score diff"],
                           [[r["samples"], r["summed_bytes"], r["rows_bytes"], r["dense_targets_bytes"],
                             f"{r['max_rel_diff']:.1e}"] for r in memory]), "",
            markdown_table(["world size", "threads per rank", "calibration images/s", "x", "distillation steps/s", "x"],
                           [[r["world"], r["threads_per_rank"], f"{r['calibration_images_per_s']:.0f}",
                             f"{r['calibration_images_per_s'] / base['calibration_images_per_s']:.2f}",
                             f"{r['distill_steps_per_s']:.2f}",
                             f"{r['distill_steps_per_s'] / base['distill_steps_per_s']:.2f}"] for r in speed])]
    write_text(out / "scale.md", "\n".join(text) + "\n", overwrite=True)
    return payload
