"""The recipe runner end to end on a CI-sized slice of the embedded demo, plus every user error and exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.errors import CompressError
from compress.recipe import list_recipes, load_recipe
from compress.recipe.__main__ import main

# The embedded demo made small: fewer samples, steps and latency runs; same stages and outputs.
QUICK = ["data.calibration_samples=128", "data.recalibration_samples=256", "data.eval_samples=1000",
         "prune.steps=2", "recover.distill_steps=10", "quantize.calibration_samples=64", "check.samples=300",
         "check.latency_runs=3"]
OUTPUTS = {"model.onnx", "model_small.onnx", "model_int8.onnx", "pruned_fp32.onnx", "pruned.pt", "quantized.pt", "report.json",
           "report.md", "pareto.png", "bits.png"}
STAGES = {"model", "dense-eval", "prune", "recover", "plan", "quantize", "export", "check"}


def _args(*extra: str) -> list[str]:
    out = ["--no-progress"]
    for item in [*QUICK, *extra]:
        out += ["--set", item]
    return out


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("recipe") / "fmnist"
    code = main(["fmnist_jbr", "--out", str(out), *_args("check.max_top1_drop=30")])
    return code, out


def test_demo_passes_and_writes_every_output(demo_run) -> None:
    code, out = demo_run
    assert code == 0
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    assert not _leftovers(out.parent)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["verdict"]["failures"] == []
    assert not report["timing_only"]
    assert STAGES <= set(report["stage_seconds"])
    assert report["config"]["prune"]["criterion"] == "jbr-centred@l2" and report["seed"] == 0
    assert {"torch", "torchao", "torch-pruning", "onnxruntime"} <= set(report["versions"])
    assert abs(report["prune"]["macs_ratio"] - 0.5) <= 0.02
    dense, quantized = report["variants"]["dense"], report["checks"]["quantized"]
    assert dense["top1"] > 0.85  # the trained reference
    assert quantized["top1"] is not None and quantized["parity_checked"] and quantized["rel_diff"] <= 1e-4
    assert set(quantized["latency_ms"]) == {"1", "32"}
    assert report["plan"]["layers"]["conv1"]["note"]  # the 1-channel stem is constrained and says why
    assert report["files"]["quantized"]["size_bytes"] < report["files"]["recovered"]["size_bytes"]
    # model.onnx is the int8 file (fast in a default session), the same file as model_int8.onnx
    assert report["deploy"] == {"path": "model.onnx", "variant": "int8", "same_as": "model_int8.onnx"}
    assert (out / "model.onnx").samefile(out / "model_int8.onnx") or \
        (out / "model.onnx").read_bytes() == (out / "model_int8.onnx").read_bytes()
    assert report["files"]["quantized"]["path"] == "model_small.onnx"


def test_report_md_is_a_readable_summary(demo_run) -> None:
    _, out = demo_run
    text = (out / "report.md").read_text()
    assert text.startswith("# Recipe `fmnist_jbr`: **PASS**")
    for needle in ("| variant | top-1 %", "dense fp32", "pruned + quantized, size-optimised (model_small.onnx)",
                   "`model.onnx` is the file to deploy (the same file as `model_int8.onnx`)", "## Bit plan",
                   "## Skipped or constrained layers", "`conv1`: torchao cannot quantize it", "## Stage timings"):
        assert needle in text
    assert "TIMING ONLY" not in text
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_saved_models_load_and_match_the_report(demo_run) -> None:
    import compress
    from compress.prune import count_macs_params

    _, out = demo_run
    report = json.loads((out / "report.json").read_text())
    pruned = compress.load(out / "pruned.pt")
    quantized = compress.load(out / "quantized.pt")
    x = torch.randn(4, 1, 28, 28)
    macs, _ = count_macs_params(pruned, x[:1])
    assert macs == report["final"]["macs"]
    assert quantized(x).shape == (4, 10)


def test_rerun_refuses_to_overwrite(demo_run) -> None:
    _, out = demo_run
    before = sorted(p.name for p in out.iterdir())
    assert main(["fmnist_jbr", "--out", str(out), "--no-progress"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_timing_only_run_says_so_and_fails_on_latency(tmp_path, capsys) -> None:
    out = tmp_path / "timing"
    code = main(["fmnist_jbr", "--data", "synthetic", "--weights", "random", "--out", str(out),
                 *_args("data.synthetic_samples=64", "export.int8_activations=false", "check.max_latency_ms=1e-6")])
    assert code == 1
    assert "TIMING ONLY" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["timing_only"] and not report["passed"]
    assert any("latency at batch 1" in f for f in report["verdict"]["failures"])
    assert any("max_top1_drop" in s for s in report["verdict"]["skipped"])
    assert "TIMING ONLY" in (out / "report.md").read_text()
    # no int8 file: model.onnx is the pruned fp32 file, never the packed one a default session runs slowly
    assert report["deploy"]["same_as"] == "pruned_fp32.onnx" and (out / "model_small.onnx").is_file()
    # --overwrite replaces the old run; without the thresholds that failed it passes
    code = main(["fmnist_jbr", "--data", "synthetic", "--weights", "random", "--out", str(out), "--overwrite",
                 *_args("data.synthetic_samples=64", "export.int8_activations=false", "prune.enabled=false",
                        "quantize.enabled=false")])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "pruned.pt", "report.json", "report.md", "pareto.png", "bits.png"}
    assert not _leftovers(tmp_path)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch) -> None:
    import exporters

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporters, "export_onnx", interrupt)
    out = tmp_path / "run"
    code = main(["fmnist_jbr", "--data", "synthetic", "--weights", "random", "--out", str(out),
                 *_args("data.synthetic_samples=64", "prune.enabled=false", "quantize.enabled=false")])
    assert code == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown recipe 'nope'"),
    (["resnet50_jbr"], "needs ImageNet"),
    (["fmnist_jbr", "--set", "prune.targt=0.3"], "did you mean 'target_macs'"),
    (["fmnist_jbr", "--set", "prune.steps=many"], "prune.steps = 'many' must be int"),
    (["fmnist_jbr", "--set", "prune.target_macs=1.5"], "not a fraction"),
    (["fmnist_jbr", "--set", "quantize.bytes=1000"], "exactly one of avg_bits, bytes, bops, latency"),
    (["fmnist_jbr", "--set", "quantize.allocator=hawk"], "did you mean 'hawq'"),
    (["fmnist_jbr", "--set", "prune.latency_activations=int4"], "prune.latency_activations = 'int4' is unknown"),
    (["fmnist_jbr", "--set", "quantize.predictor=jpv"], "did you mean 'jvp'"),
    (["fmnist_jbr", "--weights", "/no/such/weights.pt"], "does not exist"),
    (["fmnist_jbr", "--data", "/no/such/imagenet"], "does not exist"),
    ([], "no recipe given"),
])
def test_user_errors_exit_2_before_any_work(argv, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "fix:" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_openvino_timing_without_openvino_is_a_user_error(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(["fmnist_jbr", "--set", "check.openvino=true", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "openvino package is not installed" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error raised where CUDA is missing")
def test_cuda_without_gpu_is_a_user_error(tmp_path) -> None:
    assert main(["fmnist_jbr", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2


def test_recipe_file_path_and_bad_toml(tmp_path) -> None:
    good = tmp_path / "mine.toml"
    good.write_text('description = "mine"\n[model]\narch = "small_resnet"\n[prune]\ncriterion = "l1"\n')
    recipe = load_recipe(good)
    assert recipe.name == "mine" and recipe.prune.criterion == "l1" and recipe.prune.target_macs == 0.5
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\narch=")
    with pytest.raises(CompressError, match="not valid TOML"):
        load_recipe(bad)


def test_shipped_recipes_are_valid_and_listed(capsys) -> None:
    names = list_recipes()
    assert {"fmnist_jbr", "vit_fmnist_jbr", "resnet50_jbr", "mobilenet_v2_jbr"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.description and recipe.prune.criterion
    assert load_recipe("vit_fmnist_jbr").model.train_epochs == 12  # the model section's own training length
    assert main(["--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(names)


def test_overrides_parse_toml_values_and_bare_words() -> None:
    recipe = load_recipe("fmnist_jbr", ["prune.target_macs=0.3", "quantize.candidates=[2, 4, 8]", "model.weights=random",
                                        "check.max_top1_drop=1", "prune.recalibrate=true"])
    assert recipe.prune.target_macs == 0.3 and recipe.quantize.candidates == [2, 4, 8] and recipe.prune.recalibrate
    assert recipe.model.weights == "random" and recipe.check.max_top1_drop == 1.0 and recipe.timing_only
    assert load_recipe("vit_fmnist_jbr", ["prune.hidden=0.25"]).prune.hidden == 0.25
    with pytest.raises(CompressError, match=r"prune.hidden=1.2 is not a share .*--set prune.hidden=0.25"):
        load_recipe("vit_fmnist_jbr", ["prune.hidden=1.2"])


def test_weights_unavailable_offline_stop_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    """resnet50_jbr's IMAGENET1K_V2 weights cannot be downloaded (offline): exit 2, one line, nothing written."""
    import urllib.error

    from torchvision.models import ResNet50_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline)
    out = tmp_path / "out"
    assert main(["resnet50_jbr", "--data", "synthetic", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot download resnet50 weights" in err and "--weights PATH" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_latency_budget_plans_the_int8_file(tmp_path) -> None:
    out = tmp_path / "latency"
    code = main(["fmnist_jbr", "--data", "synthetic", "--weights", "random", "--out", str(out),
                 *_args("data.synthetic_samples=32", "prune.enabled=false", "quantize.avg_bits=none",
                        "quantize.latency=1000", "quantize.candidates=[8]")])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    plan = report["plan"]
    assert plan["budget"]["latency"] == 1000 and 0 < plan["predicted_latency_ms"] <= 1000
    import onnx

    int8 = onnx.load(str(out / "model_int8.onnx"))
    quantized_convs = {n.input[0] for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")}
    float_layers = [n for n, l in plan["layers"].items() if l["bits"] == 16]
    assert float_layers == ["conv1"]  # only 8 bits offered; the 1-channel stem stays float (torchao constraint)
    assert len(quantized_convs) == len(plan["layers"]) - 1  # the int8 file follows the plan: conv1 left in float
    assert "Latency budget: the per-layer table predicts" in (out / "report.md").read_text()


def test_the_deploy_line_says_when_model_onnx_is_slower_than_dense():
    from compress.recipe.report import _deploy_line

    def report(int8_ms: float) -> dict:
        return {"deploy": {"path": "model.onnx", "variant": "int8", "same_as": "model_int8.onnx"},
                "checks": {"int8": {"default_latency_ms": {"1": int8_ms}}, "dense": {"default_latency_ms": {"1": 0.3}}}}

    assert "slower" not in _deploy_line(report(0.2)) and "0.200 ms at batch 1" in _deploy_line(report(0.2))
    assert "slower than the dense model at batch 1: in a model this small the int8" in _deploy_line(report(0.4))
