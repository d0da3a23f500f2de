"""The recipe stages as a registered list: the built-in order, a stage added after "plan" reaching the context and
report.json, typed quantization candidates in the recipe config, and one definition of the variants."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from compress.bench import deploy
from compress.errors import CompressError
from compress.recipe import load_recipe, run_recipe
from compress.recipe import report as report_writer
from compress.recipe.__main__ import main
from compress.recipe.stages import (STAGES, Context, PlanResult, Stage, StageResult, register_stage, stage_names,
                                    unregister_stage, VerdictStage)
from compress.recipe.variants import LABELS, Variant

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ["model", "data", "dense-eval", "prune", "recover", "final", "plan", "quantize", "export", "check", "verdict"]
TIMED = ["model", "dense-eval", "prune", "recover", "plan", "quantize", "export", "check"]  # report.json stage_seconds
REPORT_KEYS = ["recipe", "description", "timing_only", "passed", "verdict", "config", "seed", "device", "versions",
               "data", "variants", "prune", "plan", "files", "deploy", "checks", "final", "stage_seconds"]


def test_registry_order() -> None:
    assert stage_names() == BUILT_IN
    assert [s.name for s in STAGES if s.timed] == TIMED
    assert len({type(s) for s in STAGES}) == len(STAGES)


@pytest.fixture
def restore_stages():
    saved = list(STAGES)
    yield
    STAGES[:] = saved


def test_register_and_unregister(restore_stages) -> None:
    class Noop(Stage):
        name = "noop"

    noop = register_stage(Noop(), after="plan")
    assert stage_names()[stage_names().index("plan") + 1] == "noop"
    with pytest.raises(ValueError, match="already registered"):
        register_stage(Noop(), before="model")
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        register_stage(type("Other", (Stage,), {"name": "other"})(), after="nope")
    assert unregister_stage("noop") is noop and stage_names() == BUILT_IN
    register_stage(noop, before="model")
    assert stage_names()[0] == "noop"
    unregister_stage("noop")
    register_stage(noop)
    assert stage_names()[-1] == "noop"


@dataclass
class ToyResult(StageResult):
    planned_layers: int
    avg_bits: float

    def report(self) -> dict[str, Any]:
        return {"toy": {"planned_layers": self.planned_layers, "avg_bits": self.avg_bits}}


class ToyStage(Stage):
    """Reads the plan (so it must run after "plan") and adds a section to report.json."""

    name = "toy"

    def run(self, context: Context) -> ToyResult:
        plan = context.need(PlanResult).plan
        return ToyResult(len(plan.bits), plan.avg_bits)

    def summary(self, context: Context, result: ToyResult) -> str:
        return f"{result.planned_layers} layers planned"


def test_a_stage_registered_after_plan_runs_and_reaches_the_report(tmp_path, restore_stages) -> None:
    register_stage(ToyStage(), after="plan")
    recipe = load_recipe("fmnist_jbr", [
        "data.source=synthetic", "model.weights=random", "data.synthetic_samples=16", "data.calibration_samples=16",
        "prune.enabled=false", "quantize.allocator=uniform",
        "quantize.calibration_samples=16", "export.int8_activations=false", "check.latency_runs=1"])
    lines: list[str] = []
    run = run_recipe(recipe, tmp_path / "run", progress=False, log=lines.append)
    assert run.passed
    toy = run.context.results["toy"]
    assert isinstance(toy, ToyResult) and toy.planned_layers == len(run.context.need(PlanResult).plan.bits) > 0
    # timed like the built-in stages, in registry order: after plan, before quantize
    headers = [line for line in lines if line.endswith("] ...")]
    assert headers == [f"[{n}] ..." for n in ["model", "dense-eval", "plan", "toy", "quantize", "export", "check"]]
    assert any(line.startswith(f"[toy] {toy.planned_layers} layers planned (") for line in lines)
    assert list(run.report["stage_seconds"]) == ["model", "dense-eval", "plan", "toy", "quantize", "export", "check"]
    # its section follows the built-in ones, which keep their order
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(on_disk) == [*REPORT_KEYS, "toy"] and list(run.report) == list(on_disk)
    assert on_disk["toy"] == {"planned_layers": toy.planned_layers, "avg_bits": toy.avg_bits}
    assert on_disk["prune"] == {"enabled": False} and list(on_disk["variants"]) == ["dense", "quantized"]


def test_candidates_accept_float8_and_float() -> None:
    recipe = load_recipe("fmnist_jbr", ['quantize.candidates=[4, 8, "float8", "float"]'])
    assert recipe.quantize.candidates == [4, 8, "float8", 16]
    assert load_recipe("fmnist_jbr").quantize.candidates == [4, 8, 16]
    with pytest.raises(CompressError, match=r"quantize.candidates\[2\]: 'float9' is not a quantization candidate"):
        load_recipe("fmnist_jbr", ['quantize.candidates=[4, 8, "float9"]'])


@pytest.mark.parametrize("value, message", [
    ('[4, "float9"]', "quantize.candidates[1]: 'float9' is not a quantization candidate"),
    ("[4, 9]", "quantize.candidates[1]: 9 is not a quantization candidate"),
    ("[]", "quantize.candidates is empty"),
    ('[4, "float8"]', "a recipe quantizes for the CPU"),  # parses, but no recipe can plan float8: before any work
])
def test_bad_candidates_are_one_line_user_errors(value, message, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["fmnist_jbr", "--data", "synthetic", "--set", f"quantize.candidates={value}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "fix:" in err
    assert list(tmp_path.iterdir()) == []


def _variant_literals(path: Path) -> list[str]:
    """String constants in ``path`` that spell a variant (other than as a keyword argument's value, e.g.
    ``activations="int8"``). "final" is also report.json's section of that name, so it is not looked for."""
    tree = ast.parse(path.read_text())
    keyword_values = {id(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords}
    names = {v.value for v in Variant} - {Variant.FINAL.value}
    return [f"{path.name}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in names and id(n) not in keyword_values]


def test_variants_have_one_definition() -> None:
    assert set(LABELS) == set(Variant) and all(v.label == LABELS[v] for v in Variant)
    assert [v.value for v in Variant] == ["dense", "pruned", "recovered", "quantized", "final", "int8"]
    assert set(deploy.VARIANTS) <= set(Variant)
    readers = [ROOT / "compress/recipe/runner.py", ROOT / "compress/recipe/report.py",
               ROOT / "compress/recipe/stages.py", ROOT / "compress/bench/deploy.py"]
    assert [hit for path in readers for hit in _variant_literals(path)] == []


def test_report_rows_follow_the_variant_order() -> None:
    check = {"top1": None, "dense_agreement": None, "latency_ms": {"1": 1.0, "32": 2.0}}
    report = {"variants": {v: {"top1": 0.5, "dense_agreement": 1.0, "macs": 1, "params": 1} for v in
                           ("int8", "quantized", "dense")},
              "checks": {"int8": check, "dense": check}, "files": {}, "final": {"macs": 1, "params": 1}}
    rows = report_writer.rows(report)
    assert [r["variant"] for r in rows] == [Variant.DENSE, Variant.QUANTIZED, Variant.INT8]
    assert [r["label"] for r in rows] == [LABELS[Variant.DENSE], LABELS[Variant.QUANTIZED], LABELS[Variant.INT8]]
    assert all(type(r["variant"]) is str for r in rows)  # plain strings, as report.json reads back


def test_top1_threshold_applies_to_the_planned_file_and_to_model_onnx(tmp_path) -> None:
    """model.onnx (here the int8 file) is what gets deployed, so check.max_top1_drop covers it as well as the
    planned model_small.onnx: with an impossible threshold both fail, each by name."""
    recipe = load_recipe("fmnist_jbr", [
        "prune.enabled=false", "data.calibration_samples=32", "data.eval_samples=200", "quantize.allocator=uniform",
        "quantize.calibration_samples=16", "check.samples=100", "check.latency_runs=1"])
    run = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda line: None)
    assert run.report["deploy"]["same_as"] == "model_int8.onnx"
    run.context.recipe = replace(recipe, check=replace(recipe.check, max_top1_drop=-1000.0))
    failures = VerdictStage().run(run.context).failures
    assert any("model_small.onnx" in f for f in failures) and any("model_int8.onnx" in f for f in failures)
