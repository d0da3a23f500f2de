"""``python -m compress.bench pruning`` end to end on a small model trained on a subset: both protocols, both
normaliser arms, mean replacement, resumable rows."""

from __future__ import annotations

import json

import pytest

from compress.bench.__main__ import main
from compress.bench.pruning_protocols import PAPER_STEPS, paper_mean_top1

COMMON = ["pruning", "--arch", "small_resnet", "--train-samples", "512", "--test-limit", "200", "--seeds", "2",
          "--calibration", "64", "--calibration-batch", "32", "--recal-samples", "128"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One model cache for the module: the small model is trained once for both protocols."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("COMPRESS_CACHE", str(folder))
        yield folder


def _rows(folder):
    return [json.loads(line) for line in (folder / "pruning-rows.jsonl").read_text().splitlines()]


def test_the_grid_covers_every_arm_and_runs_seed_free_criteria_once():
    import argparse

    from compress.bench.pruning import _planned, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--criteria", "l1", "jbr-centred", "--mean-replacement", "both", "--targets", "0.5",
                              "0.3", "--seeds", "3"])
    runs = _planned(args)
    assert len(runs) == (1 + 3) * 2 * 2 * 2  # (l1 once, jbr-centred per seed) x normalisers x replacement x targets
    assert {(r["normalizer"], r["mean_replacement"]) for r in runs} == {(n, m) for n in ("none", "mean")
                                                                       for m in (False, True)}


def test_ours_protocol_runs_and_resumes(tmp_path, shared_cache):
    out = tmp_path / "bench"
    args = COMMON + ["--out", str(out), "--criteria", "l1", "jbr-centred", "--normalizers", "mean",
                     "--targets", "0.6", "--steps", "2", "--distill-epochs", "0.01", "--distill-criteria", "l1"]
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 1 + 2 and not [r for r in rows if "error" in r]  # l1 ignores the seed
    assert all(abs(r["macs_ratio"] - 0.6) <= 0.02 and 0 <= r["top1_recal"] <= 1 for r in rows)
    assert {r["criterion"] for r in rows if "top1_distill" in r} == {"l1"}
    assert main(args) == 0  # every run is already in the folder: nothing runs again
    assert len(_rows(out)) == len(rows)
    failed = dict(rows[0], error="RuntimeError: a bug since fixed")
    failed.pop("top1_recal")
    with (out / "pruning-rows.jsonl").open("a") as f:  # a failed row of the same run, written after the good one
        f.write(json.dumps(failed) + "\n")
    assert main(args) == 0  # the failed run is tried again and its new row replaces the failed one
    assert len(_rows(out)) == len(rows) + 2
    reported = json.loads((out / "pruning.json").read_text())["rows"]
    assert len(reported) == len(rows) and not [r for r in reported if "error" in r]
    text = (out / "pruning.md").read_text()
    assert "## small_resnet, protocol ours" in text and "| jbr-centred | mean | 2 |" in text
    assert (out / "pruning.png").stat().st_size > 0


def test_a_malformed_criterion_option_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["pruning", "--out", str(tmp_path), "--option", "jbr-ref=3"]) == 2
    assert "is not CRITERION:KEY=VALUE" in capsys.readouterr().err


def test_paper_protocol_prunes_by_share_of_filters_without_recovery(tmp_path, shared_cache):
    out = tmp_path / "bench"
    assert main(COMMON + ["--out", str(out), "--protocol", "paper", "--criteria", "jbr-ref", "jacobian",
                          "--seeds", "1",
                          "--normalizers", "none", "--option", "jbr-ref:confidence=0.0", "--mean-replacement", "on"]) == 0
    rows = _rows(out)
    assert [r["criterion"] for r in rows] == ["jbr-ref", "jacobian"]  # jacobian: given labelled batches
    for r in rows:
        assert "error" not in r, r.get("error")
        shares = [p["filters_removed"] for p in r["points"]]
        assert shares == [round(0.9 * s / PAPER_STEPS, 4) for s in range(2, PAPER_STEPS + 1, 2)]
        macs = [p["macs_ratio"] for p in r["points"]]
        assert macs == sorted(macs, reverse=True) and macs[-1] < 0.2  # 90% of the filters gone
        assert paper_mean_top1(r) is not None
    assert "## small_resnet, protocol paper" in (out / "pruning.md").read_text()


def test_a_preset_trains_for_its_recorded_epochs_and_layout(monkeypatch):
    import compress.models as models

    seen = []
    monkeypatch.setattr(models, "reference_model", lambda spec, config, progress=True: seen.append((spec, config)))
    models.resolve("resnet20_fmnist", weights="train")
    models.resolve("resnet18_fmnist", weights="train")
    models.resolve("small_resnet", weights="train")
    (r20, c20), (r18, c18), (small, c_small) = seen
    assert (r20.arch, r20.kwargs, r20.input_shape, c20.epochs) == ("small_resnet", {"blocks": [3, 3, 3]}, (1, 28, 28), 6)
    assert (r18.arch, r18.kwargs, r18.input_shape, c18.epochs) == ("resnet18", {"num_classes": 10}, (3, 32, 32), 5)
    assert (small.kwargs, c_small.epochs) == ({}, 3)
