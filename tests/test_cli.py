"""The command line: a working run prints top-1; each user error is one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compress.cli import main


def test_evaluate_random_weights_on_a_subset(capsys):
    assert main(["evaluate", "--weights", "random", "--limit", "300", "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "top-1 on Fashion-MNIST test" in out and "/300)" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet-50"], "unknown model"),
    (["--data", "/nonexistent/imagenet"], "does not exist"),
    (["--weights", "/nonexistent/w.pth"], "does not exist"),
    (["--fmnist-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["--model", "resnet18", "--weights", "NOPE"], "has no weights"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    assert main(["evaluate", "--weights", "random", *argv]) == 2  # a later --weights overrides the first
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "fix:" in err


def test_exit_code_through_the_interpreter():
    run = subprocess.run([sys.executable, "-m", "compress", "evaluate", "--model", "nope"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown model 'nope'") and run.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random small_resnet saved as a checkpoint and exported by the CLI, plus a perturbed copy."""
    import torch

    import compress

    folder = tmp_path_factory.mktemp("cli")
    model = compress.resolve("small_resnet", "random")
    compress.save(model, folder / "model.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    compress.save(model, folder / "other.pt")
    assert main(["export", "--model", str(folder / "model.pt"), str(folder / "model.onnx")]) == 0
    return folder


def test_check_passes_against_its_source_and_writes_json(exported, capsys):
    import json

    code = main(["check", str(exported / "model.onnx"), "--reference", str(exported / "model.pt"), "--limit", "200",
                 "--runs", "2", "--json", str(exported / "check.json")])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out and "vs reference: agreement 100.00%" in out
    report = json.loads((exported / "check.json").read_text())
    assert report["passed"] and report["num_samples"] == 200 and report["rel_diff"] <= 1e-4


def test_check_fails_with_exit_1_against_another_model(exported, capsys):
    code = main(["check", str(exported / "model.onnx"), "--reference", str(exported / "other.pt"), "--data", "random",
                 "--runs", "2"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "parity" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "/nonexistent/model.onnx"], "is not a readable ONNX file"),
    (["check", "MODEL", "--reference", "/nonexistent/ref.pt"], "does not exist"),
    (["export", "--model", "resnet18", "--weights", "random", "OUT"], "already exists"),
])
def test_check_and_export_user_errors(exported, capsys, argv, message):
    argv = [a.replace("MODEL", str(exported / "model.onnx")).replace("OUT", str(exported / "model.onnx")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "fix:" in err
