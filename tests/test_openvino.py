"""OpenVINO as a second runtime: the same files, the same parity and agreement checks as onnxruntime."""

from __future__ import annotations

import sys

import pytest
import torch

from compress import Budget, CompressError, check, plan_bits, quantize, resolve, save
from compress.cli import main
from compress.data import synthetic
from exporters import export_onnx

pytest.importorskip("openvino", reason="the openvino extra is installed by `make test`")
FAST = dict(latency_runs=2, batch_sizes=(1, 8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    model = resolve("small_resnet").eval()
    folder = tmp_path_factory.mktemp("ov")
    q = quantize(model, plan_bits(model, synthetic(32), Budget(avg_bits=6), calibration_samples=32))
    x = torch.zeros(1, 1, 28, 28)
    return {"fp32": (model, export_onnx(model, x, folder / "fp32.onnx").path),
            "packed": (q, export_onnx(q, x, folder / "packed.onnx").path)}


@pytest.mark.parametrize("kind", ["fp32", "packed"])
def test_openvino_matches_the_source_model(files, kind) -> None:
    model, path = files[kind]
    data = [x for x, _ in torch.utils.data.DataLoader(synthetic(64), batch_size=32)]
    ov = check(path, reference=model, data=data, runtime="openvino", **FAST)
    ort = check(path, reference=model, data=data, **FAST)
    assert ov.runtime == "openvino" and ort.runtime == "onnxruntime"
    assert ov.passed and ov.rel_diff <= 1e-4 and ov.reference_agreement == 1.0, ov.failures
    assert set(ov.latency_ms) == {1, 8} and ov.default_latency_ms == ov.latency_ms


def test_cli_checks_in_openvino(files, tmp_path, capsys) -> None:
    model, path = files["packed"]
    save(model, tmp_path / "q.pt")
    code = main(["check", str(path), "--reference", str(tmp_path / "q.pt"), "--data", "random", "--runtime", "openvino",
                 "--runs", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "latency (openvino CPU" in out and out.strip().endswith("PASS"), out


def test_runtime_errors_are_one_line(files, monkeypatch) -> None:
    _, path = files["fp32"]
    with pytest.raises(CompressError, match="unknown runtime 'tensorrt'"):
        check(path, runtime="tensorrt")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    with pytest.raises(CompressError, match=r"needs the openvino package; fix: pip install"):
        check(path, runtime="openvino")
