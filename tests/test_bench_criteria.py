"""``python -m compress.bench criteria``: every asked criterion gets a row (the SELECT@ALLOCATE default too), and a
name that is neither registered nor SELECT@ALLOCATE is refused before any work."""

from __future__ import annotations

import json

import pytest

from compress.bench.__main__ import main


def test_criteria_bench_times_a_registered_and_a_composite_criterion(tmp_path) -> None:
    assert main(["criteria", "--model", "small_resnet", "--weights", "random", "--criteria", "l2", "jbr-centred@bn",
                 "--batch-size", "4", "--batches", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "criteria.json").read_text())["rows"]
    assert [r["criterion"] for r in rows] == ["l2", "jbr-centred@bn"]
    assert all(r["ms_per_image"] > 0 and r["throughput_vs_fwd_bwd"] > 0 for r in rows)
    assert rows[1]["state_bytes"] > 0  # jbr-centred's per-group moments, reached through the composite
    assert "| jbr-centred@bn |" in (tmp_path / "criteria.md").read_text()


def test_criteria_bench_refuses_an_unknown_criterion(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["criteria", "--criteria", "jbr@nope", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
