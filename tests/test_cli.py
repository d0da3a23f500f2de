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
