"""``python -m compress.bench removal`` and ``allocation``: zeroing a channel is removing it, the rank correlation,
small runs, and the allocation control (a criterion's own widths and channels give its own result)."""

from __future__ import annotations

import json

import torch
import torch_pruning as tp

from compress.bench.__main__ import main
from compress.bench.removal import spearman, zero_channel
from compress.small_resnet import SmallResNet


def test_spearman_is_the_pearson_correlation_of_ranks():
    a = torch.tensor([1.0, 5.0, 2.0, 9.0])
    assert abs(spearman(a, a ** 3) - 1.0) < 1e-12  # monotone: the ranks agree
    assert abs(spearman(a, -a) + 1.0) < 1e-12
    b = torch.tensor([2.0, 9.0, 1.0, 5.0])  # ranks 0 2 1 3 against 1 3 0 2: 1 − 6·4/(4·15)
    assert abs(spearman(a, b) - 0.6) < 1e-12


def test_zeroing_a_channel_gives_the_outputs_of_the_model_without_it():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    for layer_name in ("layers.1.0.conv1", "layers.1.0.conv2"):  # an inner channel, a residual-stream channel
        zeroed, removed = SmallResNet().eval(), SmallResNet().eval()
        removed.load_state_dict(zeroed.state_dict())
        groups = []
        for model in (zeroed, removed):
            graph = tp.DependencyGraph().build_dependency(model, x[:1])
            layer = model.get_submodule(layer_name)
            groups.append(graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=[3]))
        zero_channel(groups[0], 3)
        groups[1].prune()
        assert removed.get_submodule(layer_name).out_channels == zeroed.get_submodule(layer_name).out_channels - 1
        torch.testing.assert_close(zeroed(x), removed(x), rtol=1e-5, atol=1e-5)


def test_a_small_run_ranks_every_criterion(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["removal", "--arch", "small_resnet", "--train-samples", "256", "--channels", "12",
                 "--calibration", "32", "--calibration-batch", "16", "--criteria", "jbr-recal", "l1",
                 "--out", str(out)]) == 0
    payload = json.loads((out / "removal.json").read_text())
    assert len(payload["rows"]) == 12 and all(r["T_recal"] >= 0 and r["T_frozen"] >= 0 for r in payload["rows"])
    assert [s["criterion"] for s in payload["summary"]] == ["jbr-recal", "l1", "T frozen"]
    assert all(-1 <= s["recal"] <= 1 for s in payload["summary"])
    assert "Spearman" in (out / "removal.md").read_text()


def test_allocation_with_a_criterions_own_widths_and_channels_reproduces_its_run(tmp_path, monkeypatch):
    """In one pruning step the run's channels are the lowest by the dense model's l1 scores: its own widths filled
    one shot by l1 are its own model, and give its own top-1."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    common = ["--arch", "small_resnet", "--train-samples", "256", "--test-limit", "200", "--calibration", "32",
              "--calibration-batch", "16", "--recal-samples", "64"]
    assert main(["pruning", *common, "--criteria", "l1", "--normalizers", "mean", "--targets", "0.6", "--steps",
                 "1", "--seeds", "1", "--distill-epochs", "0", "--out", str(tmp_path / "pruning")]) == 0
    row = json.loads((tmp_path / "pruning" / "pruning-rows.jsonl").read_text().splitlines()[0])
    assert main(["allocation", *common, "--rows", str(tmp_path / "pruning" / "pruning-rows.jsonl"), "--target", "0.6",
                 "--allocations", "l1", "--selections", "l1", "random", "--out", str(tmp_path / "allocation")]) == 0
    results = json.loads((tmp_path / "allocation" / "allocation.json").read_text())["results"]
    own = next(r for r in results if r["selection"] == "l1")
    assert abs(own["macs_ratio"] - row["macs_ratio"]) < 1e-9 and abs(own["top1_recal"] - row["top1_recal"]) < 1e-9
    assert "| l1 |" in (tmp_path / "allocation" / "allocation.md").read_text()
