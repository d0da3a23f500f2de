"""torch.distributed with gloo, two processes spawned here: each rank reads its shard of the calibration set, and
scores, pruning decisions, bit plans and BatchNorm statistics equal one process on the union of the shards."""

from __future__ import annotations

import datetime
import json
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import criteria
from compress import Budget, plan_bits
from compress.adapters import adapter_for
from compress.data import calibration, synthetic
from compress.errors import CompressError
from compress.prune import Target, prune
from compress.recover import recalibrate_bn

WORLD = 2
SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.bn3(self.conv3(x))).mean((2, 3)))


def _model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _calib() -> Any:
    return calibration(synthetic(24, SHAPE), num_samples=24, batch_size=4, seed=0)


def _example() -> torch.Tensor:
    return torch.zeros(1, *SHAPE, dtype=torch.float64)


# --- what each rank (and the single-process reference) computes ---------------------------------------------------

def jbr_scores() -> list[torch.Tensor]:
    model, importance = _model(), criteria.get("jbr")
    criteria.prepare(importance, model, _calib())
    graph = adapter_for(model).dependency_graph(model, _example())
    return [importance(g) for g in graph.get_all_groups(ignored_layers=[model.fc], root_module_types=(nn.Conv2d,))]


def pruned_history() -> list:
    result = prune(_model(), _calib(), "jbr", Target(macs=0.6), example_inputs=_example(), steps=2, tolerance=0.1,
                   progress=False)
    return [(n, o, list(i)) for n, o, i in result.history]


def bit_plan() -> dict[str, tuple[int, float]]:
    plan = plan_bits(_model(), _calib(), budget=Budget(avg_bits=6), example_inputs=_example())
    return {n: (layer.bits, layer.predicted_tpv) for n, layer in plan.layers.items()}


def bn_statistics() -> dict[str, torch.Tensor]:
    model = recalibrate_bn(_model().float(), _calib(), progress=False)
    return {n: t.clone() for n, t in model.state_dict().items() if "running" in n or "batches" in n}


def mismatched_targets() -> str:
    target = 0.5 if dist.get_rank() == 0 else 0.8  # windows [0.35, 0.5] and [0.65, 0.8]: different channels
    try:
        prune(_model(), _calib(), "l1", Target(macs=target), example_inputs=_example(), steps=1, tolerance=0.15,
              progress=False)
    except CompressError as err:
        return str(err)
    return "no error"


# --- spawning ------------------------------------------------------------------------------------------------------

def _worker(rank: int, fn: Callable[[], Any], folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result: Any = fn()
    except BaseException:  # the test shows the rank's traceback
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def _on_two_ranks(fn: Callable[[], Any], tmp_path: Path) -> list[Any]:
    mp.start_processes(_worker, args=(fn, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        assert not (isinstance(r, dict) and "error" in r), r.get("error") if isinstance(r, dict) else r
    return results


# --- tests ---------------------------------------------------------------------------------------------------------

def test_each_rank_reads_a_disjoint_shard_of_the_same_subset(monkeypatch) -> None:
    from compress import distributed

    subset = list(range(10))
    shards = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 3))
        shards.append(distributed.rank_share(subset))
    assert sorted(i for s in shards for i in s) == subset and shards[0] == [0, 3, 6, 9]


@pytest.mark.parametrize("fn", [jbr_scores, pruned_history, bit_plan])
def test_two_ranks_equal_one_process_on_the_union(fn, tmp_path) -> None:
    expected = fn()
    for got in _on_two_ranks(fn, tmp_path):
        if fn is jbr_scores:
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
        elif fn is bit_plan:
            assert {n: bits for n, (bits, _) in got.items()} == {n: bits for n, (bits, _) in expected.items()}
            for n, (_, tpv) in got.items():
                assert tpv == pytest.approx(expected[n][1], rel=1e-9, abs=1e-15)
        else:
            assert got == expected


def test_batchnorm_statistics_are_pooled_over_ranks(tmp_path) -> None:
    union = bn_statistics()
    ranks = _on_two_ranks(bn_statistics, tmp_path)
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name])  # every rank holds the same statistics
        if name.endswith("running_mean") and "bn1" in name:  # equal-size batches: the mean of batch means
            torch.testing.assert_close(value, union[name], rtol=1e-5, atol=1e-6)
    assert int(ranks[0]["bn1.num_batches_tracked"]) == int(union["bn1.num_batches_tracked"]) == 6


def test_ranks_that_disagree_stop_with_one_line(tmp_path) -> None:
    messages = _on_two_ranks(mismatched_targets, tmp_path)
    for message in messages:
        assert message.startswith("the ranks differ in the channels pruned at step 1") and "\n" not in message


def measured_on_rank_zero() -> tuple[int, str]:
    """A measurement that differs per rank: every rank gets rank 0's; an error on rank 0 reaches every rank."""
    from compress.distributed import on_main

    value = on_main(lambda: dist.get_rank() + 10)

    def fail() -> int:
        raise CompressError("rank 0 could not time the file", "retry")

    try:
        on_main(fail)
    except CompressError as err:
        return value, str(err)
    return value, "no error"


def latency_tables() -> dict[str, dict[int, float]]:
    from compress.layer_latency import layer_latency_table

    return layer_latency_table(_model().float(), _example().float(), candidates=(8,), runs=2).ms


STUCK_S = 20  # how long the failed rank stays alive without joining the collective


def one_rank_fails() -> tuple[str, float]:
    """Rank 1 fails before a collective and stays alive for STUCK_S seconds (a hung worker); rank 0 must give up
    after the group's timeout rather than wait for it."""
    import time

    from compress.distributed import all_reduce_sum

    if dist.get_rank() == 1:
        time.sleep(STUCK_S)
        return "rank 1 stopped", 0.0
    start = time.perf_counter()
    try:
        all_reduce_sum(torch.ones(1))
    except Exception as err:  # gloo: the group's timeout expired
        return f"{type(err).__name__}", time.perf_counter() - start
    return "no error", time.perf_counter() - start


def _env_worker(rank: int, fn: Callable[[], Any], folder: str, port: int) -> None:
    """A rank that joins the group as ``python -m compress.recipe`` does under torchrun: from the environment,
    with a 3-second $COMPRESS_DIST_TIMEOUT_S."""
    import os

    from compress.distributed import init_from_env

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), COMPRESS_DIST_TIMEOUT_S="3")
    assert init_from_env()
    try:
        result: Any = fn()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def test_measurements_are_made_on_rank_zero_and_sent_to_every_rank(tmp_path) -> None:
    for value, error in _on_two_ranks(measured_on_rank_zero, tmp_path):
        assert value == 10 and error == "rank 0 could not time the file; fix: retry"
    (tmp_path / "tables").mkdir()
    tables = _on_two_ranks(latency_tables, tmp_path / "tables")
    assert tables[0] == tables[1] and set(tables[0]) == {"conv1", "conv2", "conv3", "fc"}


def test_a_rank_that_fails_makes_the_others_stop_instead_of_hanging(tmp_path) -> None:
    """With $COMPRESS_DIST_TIMEOUT_S=3 rank 0 stops within seconds; with the default (600 s) it would wait until
    the stuck rank exits after STUCK_S seconds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_env_worker, args=(one_rank_fails, str(tmp_path), port), nprocs=WORLD, start_method="spawn")
    (error, waited), stopped = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert stopped == ("rank 1 stopped", 0.0) and error != "no error" and waited < STUCK_S / 2


# --- distillation and the recipe --------------------------------------------------------------------------------

class NoNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, *SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]


def distilled_weights() -> dict[str, torch.Tensor]:
    """Three distillation steps on global batches of 8; under two ranks each rank feeds its half of each."""
    from compress.recover import distill

    torch.manual_seed(1)
    student, teacher = NoNormNet().double(), NoNormNet().double()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = [b[rank * 8 // world:(rank + 1) * 8 // world] for b in _global_batches()]
    distill(student, teacher, share, steps=3, lr=1e-2, progress=False)
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def test_distillation_on_two_ranks_equals_one_process_with_the_same_global_batch(tmp_path) -> None:
    expected = distilled_weights()
    for got in _on_two_ranks(distilled_weights, tmp_path):
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12)
    assert not torch.equal(expected["fc.weight"], (lambda: (torch.manual_seed(1), NoNormNet().double())[1])().fc.weight)


RECIPE = ["fmnist_jbr", "--data", "synthetic", "--weights", "random", "--no-progress",
          *[a for item in ("data.synthetic_samples=64", "data.calibration_samples=32", "data.recalibration_samples=32",
                           "data.eval_samples=64", "prune.steps=1", "recover.distill_steps=2",
                           "quantize.calibration_samples=32", "check.samples=32", "check.latency_runs=1",
                           "export.int8_activations=false") for a in ("--set", item)]]


def _decisions(report: dict) -> tuple[str, dict[str, int]]:
    """The pruned widths and the bit plan of a recipe's report."""
    return json.dumps(report["prune"]["layers"], sort_keys=True), {n: v["bits"] for n, v in report["plan"]["layers"].items()}


def test_the_recipe_under_torchrun_makes_the_decisions_of_one_process(tmp_path) -> None:
    import subprocess
    import sys

    from compress.recipe.__main__ import main

    assert main([*RECIPE, "--out", str(tmp_path / "one")]) in (0, 1)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "compress.recipe", *RECIPE, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    assert run.stdout.count("PASS:") + run.stdout.count("FAIL:") == 1  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert _decisions(one) == _decisions(two)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no rank left a staging folder


def test_a_recipe_that_cannot_be_shared_stops_before_any_work(monkeypatch, tmp_path) -> None:
    from compress.recipe import load_recipe
    from compress.recipe import runner

    monkeypatch.setattr(runner, "rank_and_world", lambda: (0, 4))
    for override, message in (("recover.distill_batch_size=130", "recover.distill_batch_size=130 cannot be split over 4"),
                              ("data.calibration_samples=3", "data.calibration_samples=3 cannot be shared by 4")):
        recipe = load_recipe("fmnist_jbr", [override], {"data.source": "synthetic", "model.weights": "random"})
        with pytest.raises(CompressError, match=message):
            runner.preflight(recipe, tmp_path / "out", overwrite=False)
    assert not (tmp_path / "out").exists()
