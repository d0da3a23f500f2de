"""exporters: fp32 / pruned / torchao-packed / int8 QDQ ONNX files, parity in onnxruntime, and check()."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn

from compress import __version__
from compress.data import FashionMNIST, calibration, loader
from compress.errors import CompressError
from compress.models import resolve
from exporters import check, export_onnx, fold_batchnorm
from exporters import onnx_export

FMNIST_INPUT = torch.zeros(1, 1, 28, 28)
IMAGENET_INPUT = torch.zeros(1, 3, 64, 64)
FAST = dict(latency_runs=2, batch_sizes=(1, 32))
PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def quantizable(module: nn.Module, fqn: str, group: int = 1) -> bool:
    """Conv2d/Linear layers torchao IntxWeightOnly can quantize (more than one input channel per group)."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[1] > 1 and module.weight.shape[1] % group == 0


def torchao_quantized(model: nn.Module, configs: dict[str, object] | None = None, bits: int = 8, fold: bool = True) -> nn.Module:
    """A (BN-folded) copy of ``model`` quantized with IntxWeightOnly: per-layer ``configs`` or ``bits`` everywhere."""
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, PerAxis, quantize_

    quantized = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
    if configs is not None:
        quantize_(quantized, FqnToConfig(configs), filter_fn=None)
    else:
        quantize_(quantized, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0)),
                  filter_fn=quantizable)
    return quantized


def intx(bits: int, group: int | None = None, asymmetric: bool = False):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                granularity=PerAxis(0) if group is None else PerGroup(group),
                                mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC)


def initializer_types(path) -> dict[str, int]:
    return {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return resolve("small_resnet", weights="train", progress=False)


@pytest.fixture(scope="module")
def test_batches() -> list:
    return list(loader(FashionMNIST("test"), 500))[:2]


@pytest.fixture(scope="module")
def fp32_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "reference.onnx"
    return export_onnx(reference, FMNIST_INPUT, path, metadata={"criterion": "tpv", "target": {"macs": 0.5}})


def test_fp32_export_folds_bn_and_matches(reference, fp32_file, test_batches) -> None:
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    onnx.checker.check_model(str(fp32_file.path))
    model = onnx.load(str(fp32_file.path))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch
    assert model.opset_import[0].version >= 21 and fp32_file.weights == "fp32" and fp32_file.external_data is None
    props = {p.key: p.value for p in model.metadata_props}
    assert props["compress.source_arch"] == "small_resnet" and props["compress.version"] == __version__
    assert props["criterion"] == "tpv" and json.loads(props["target"]) == {"macs": 0.5}
    assert fp32_file.size_bytes == fp32_file.path.stat().st_size
    report = check(fp32_file.path, reference, test_batches, dense=reference, **FAST)
    assert report.passed, report.failures
    assert report.rel_diff <= 1e-4 and report.reference_agreement == 1.0 and report.top1 > 0.85
    assert set(report.latency_ms) == {1, 32} and report.threads == 2 and report.num_samples == 1000
    json.dumps(report.to_dict())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())  # the user's model is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())


def test_pruned_export_matches(reference, fp32_file, test_batches, tmp_path) -> None:
    import torch_pruning as tp

    pruned = copy.deepcopy(reference)
    pruner = tp.pruner.BasePruner(pruned, FMNIST_INPUT, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.3, ignored_layers=[pruned.fc])
    pruner.step()
    result = export_onnx(pruned, FMNIST_INPUT, tmp_path / "pruned.onnx")
    assert result.size_bytes < 0.7 * fp32_file.size_bytes
    report = check(result.path, pruned, test_batches, dense=reference, **FAST)
    assert report.passed, report.failures
    assert report.rel_diff <= 1e-4 and report.dense_agreement is not None


def test_mixed_int4_int8_packed(reference, fp32_file, test_batches, tmp_path) -> None:
    configs = {"conv1": None, r"re:layers\.2\..*(conv\d|downsample\.0)": intx(4),
               r"re:layers\.[01]\..*(conv\d|downsample\.0)": intx(8), "fc": intx(8)}
    quantized = torchao_quantized(reference, configs)
    result = export_onnx(quantized, FMNIST_INPUT, tmp_path / "mixed.onnx", metadata={"bit_plan": {"layers.2": 4}})
    onnx.checker.check_model(str(result.path))
    bits = {p.name: p.bits for p in result.packed}
    assert bits["layers.2.0.conv2"] == 4 and bits["layers.0.0.conv1"] == 8 and bits["fc"] == 8 and len(bits) == 9
    assert {p.container for p in result.packed} == {"int4", "int8"}
    assert "one input channel" in result.float_layers["conv1"] and list(result.float_layers) == ["conv1"]
    types = initializer_types(result.path)
    assert types["layers.2.0.conv2.weight_quantized"] == onnx.TensorProto.INT4
    assert types["fc.weight_quantized"] == onnx.TensorProto.INT8 and "fc.weight" not in types
    assert result.size_bytes < 0.35 * fp32_file.size_bytes
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(props["compress.weight_bits"]) == bits and props["compress.weights"] == "packed"
    report = check(result.path, quantized, test_batches, dense=reference, **FAST)
    assert report.passed, report.failures
    assert report.rel_diff <= 1e-4 and report.qdq_disabled and report.dense_agreement > 0.95


def test_odd_bit_widths_and_asymmetric_groups(reference, test_batches, tmp_path) -> None:
    configs = {"layers.0.0.conv1": intx(2), "layers.0.0.conv2": intx(3, 8, asymmetric=True), "layers.1.0.conv1": intx(5),
               "layers.1.0.conv2": intx(6, 16), "layers.1.0.downsample.0": intx(7, asymmetric=True),
               "layers.2.0.conv1": intx(4, 16, asymmetric=True), "fc": intx(8, 32, asymmetric=True)}
    quantized = torchao_quantized(reference, configs)
    result = export_onnx(quantized, FMNIST_INPUT, tmp_path / "odd.onnx")
    packed = {p.name: p for p in result.packed}
    expected = {"layers.0.0.conv1": (2, "int4", 16), "layers.0.0.conv2": (3, "uint4", 8), "layers.1.0.conv1": (5, "int8", 16),
                "layers.1.0.conv2": (6, "int8", 16), "layers.1.0.downsample.0": (7, "uint8", 16),
                "layers.2.0.conv1": (4, "uint4", 16), "fc": (8, "uint8", 32)}
    assert {n: (p.bits, p.container, p.block_size) for n, p in packed.items()} == expected
    report = check(result.path, quantized, test_batches, latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-4, report.failures


def test_quantized_before_folding_is_folded_into_scales(reference, test_batches, tmp_path) -> None:
    quantized = torchao_quantized(reference, bits=8, fold=False)
    result = export_onnx(quantized, FMNIST_INPUT, tmp_path / "unfolded.onnx")
    assert "layers.0.0.bn1" in result.batchnorm_in_scales and len(result.packed) == 9
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(result.path)).graph.node)
    report = check(result.path, quantized, test_batches, latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-4, report.failures


def test_int8_qdq_honours_bit_plan(reference, test_batches, tmp_path) -> None:
    plan = {"conv1": 16, "layers.2.0.conv2": 4}
    calib = calibration(FashionMNIST("train"), num_samples=128, batch_size=64)
    result = export_onnx(reference, FMNIST_INPUT, tmp_path / "qdq.onnx", activations="int8", calibration_data=calib,
                         weight_bits=plan, metadata={"bit_plan": plan})
    onnx.checker.check_model(str(result.path))
    model = onnx.load(str(result.path))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert {p.name: p.bits for p in result.packed}["layers.2.0.conv2"] == 4 and "conv1" in result.float_layers
    assert any(t == onnx.TensorProto.INT4 for t in initializer_types(result.path).values())
    conv1 = next(n for n in model.graph.node if n.op_type == "Conv" and "conv1.weight" in n.input)
    assert conv1.input[0] == "input"  # excluded: reads the float input, float weight
    report = check(result.path, reference, test_batches, **FAST)
    assert report.passed and not report.parity_checked and not report.qdq_disabled, report.failures
    assert report.reference_agreement >= 0.99 and report.metadata["compress.activations"] == "int8"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_parity(arch, tmp_path) -> None:
    model = resolve(arch)
    data = [torch.randn(2, 3, 64, 64)]
    fp32 = export_onnx(model, IMAGENET_INPUT, tmp_path / f"{arch}.onnx")
    report = check(fp32.path, model, data, latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-4, report.failures
    quantized = torchao_quantized(model, bits=4)
    int4 = export_onnx(quantized, IMAGENET_INPUT, tmp_path / f"{arch}-int4.onnx")
    assert int4.packed and all(p.container == "int4" for p in int4.packed)
    report = check(int4.path, quantized, data, latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-4, report.failures
    if arch == "resnet18":
        int8 = export_onnx(torchao_quantized(model, bits=8), IMAGENET_INPUT, tmp_path / "resnet18-int8.onnx")
        assert int4.size_bytes <= 0.2 * fp32.size_bytes and int8.size_bytes <= 0.3 * fp32.size_bytes
    if arch != "resnet18":  # depthwise convs (one input channel per group) stay float, with the reason
        assert any("one input channel" in reason for reason in int4.float_layers.values())


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block pattern: Linear layers applied to channels-last activations (exported as MatMul with Wᵀ)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(torch.relu(self.up(self.conv(x).permute(0, 2, 3, 1))))
        return y.permute(0, 3, 1, 2).mean((2, 3))


@pytest.mark.parametrize("up, down", [(intx(4), intx(8)), (intx(4, 8, asymmetric=True), intx(8, 16))])
def test_channels_last_linear_is_packed_transposed(up, down, tmp_path) -> None:
    torch.manual_seed(0)
    quantized = torchao_quantized(ChannelsLastMLP().eval(), {"up": up, "down": down})
    result = export_onnx(quantized, IMAGENET_INPUT[:, :, :8, :8], tmp_path / "mlp.onnx")
    packed = {p.name: p for p in result.packed}
    assert set(packed) == {"up", "down"} and packed["up"].weight_shape == (64, 16) and packed["down"].bits == 8
    types = initializer_types(result.path)
    assert types["up.weight_transposed_quantized"] in PACKED_TYPES and not any(t == onnx.TensorProto.FLOAT and
                                                                                 n.startswith("val_") for n, t in types.items())
    report = check(result.path, quantized, [torch.randn(4, 3, 8, 8)], latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-5, report.failures


class AuxHeadNet(nn.Module):
    """GoogLeNet's pattern: an auxiliary classifier that only a training-mode forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.aux, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 10), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h) + (self.aux(h) if self.training else 0)


@pytest.mark.parametrize("predictor", ["jvp", "noise"])
def test_layers_an_eval_forward_never_calls_are_planned_and_left_out(predictor, tmp_path) -> None:
    from compress import Budget, plan_bits, quantize
    from compress.data import synthetic

    torch.manual_seed(0)
    model, x = AuxHeadNet().eval(), torch.zeros(1, 3, 8, 8)
    plan = plan_bits(model, synthetic(8, (3, 8, 8)), Budget(avg_bits=6), example_inputs=x, calibration_samples=8,
                     batch_size=8, predictor=predictor)
    quantized = quantize(model, plan)
    result = export_onnx(quantized, x, tmp_path / "aux.onnx")
    assert "aux" not in {p.name for p in result.packed} and "not run in eval mode" in result.float_layers["aux"]
    report = check(result.path, quantized, [torch.randn(4, 3, 8, 8)], latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.rel_diff <= 1e-5, report.failures


def test_check_fails_against_another_model(fp32_file, test_batches) -> None:
    other = resolve("small_resnet")  # random weights, same structure
    report = check(fp32_file.path, other, test_batches, latency_runs=1, batch_sizes=(1,))
    assert not report.passed
    assert any(f.startswith("parity") for f in report.failures) and any(f.startswith("agreement") for f in report.failures)
    strict = check(fp32_file.path, None, test_batches, dense=other, min_dense_agreement=0.99, latency_runs=1, batch_sizes=(1,))
    assert not strict.passed and "dense" in strict.failures[0]


def test_existing_path_is_refused(reference, fp32_file) -> None:
    before = fp32_file.path.read_bytes()
    with pytest.raises(CompressError, match="already exists"):
        export_onnx(reference, FMNIST_INPUT, fp32_file.path)
    assert fp32_file.path.read_bytes() == before
    assert not [p for p in fp32_file.path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_large_model_goes_to_external_data(reference, test_batches, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT_BYTES", 0)
    result = export_onnx(reference, FMNIST_INPUT, tmp_path / "big.onnx")
    assert result.external_data == tmp_path / "big.onnx.data" and result.external_data.is_file()
    report = check(result.path, reference, test_batches, latency_runs=1, batch_sizes=(1,))
    assert report.passed and report.file_size_bytes == result.size_bytes > result.path.stat().st_size


def test_bad_inputs_raise_compress_error(reference, fp32_file, tmp_path) -> None:
    with pytest.raises(CompressError, match="does not exist"):
        check(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx model\x00\xff" * 10)
    with pytest.raises(CompressError):
        check(corrupt)
    with pytest.raises(CompressError, match="do not fit"):
        check(fp32_file.path, data=[torch.zeros(2, 3, 32, 32)])
    with pytest.raises(CompressError, match="opset"):
        export_onnx(reference, FMNIST_INPUT, tmp_path / "old.onnx", opset=17)
    with pytest.raises(CompressError, match="calibration_data"):
        export_onnx(reference, FMNIST_INPUT, tmp_path / "qdq.onnx", activations="int8")
    with pytest.raises(CompressError, match="example input"):
        export_onnx(reference, torch.zeros(1, 3, 28, 28), tmp_path / "shape.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx"]  # nothing written by the refused exports


def test_default_session_latency_is_measured_for_packed_files(reference, test_batches, tmp_path) -> None:
    """A deployment that sets no session option runs the packed file re-dequantizing its weights: check() times
    that default session too, and open_session(tuned=False) is exactly such a session."""
    from exporters.check import open_session

    quantized = torchao_quantized(reference, {"conv1": None, r"re:layers\..*(conv\d|downsample\.0)": intx(8), "fc": intx(8)})
    path = export_onnx(quantized, FMNIST_INPUT, tmp_path / "packed.onnx").path
    tuned, disabled = open_session(path)
    default, default_disabled = open_session(path, tuned=False)
    assert disabled and not default_disabled
    assert tuned.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_options().get_session_config_entry("session.disable_quant_qdq")
    report = check(path, quantized, test_batches[:1], **FAST)
    assert set(report.default_latency_ms) == set(report.latency_ms) == {1, 32}
    assert report.default_latency_ms is not report.latency_ms  # measured in its own session
    assert report.to_dict()["default_latency_ms"].keys() == {"1", "32"}
