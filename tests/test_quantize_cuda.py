"""CUDA quantization configs: the per-layer selection (pure, tested on CPU), the plan's constraint report, float8
refused on CPU, and the real thing on a GPU when there is one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress import CompressError
from compress.data import synthetic
from compress.plan import FLOAT, FLOAT8, Budget, plan_bits
from compress.quantize import float8_dequantized, layer_config, quantize

H100 = (9, 0)


def _config_name(layer: nn.Module, choice, capability, **kw) -> str:
    chosen = layer_config(layer, choice, capability, **kw)
    return type(chosen.config).__name__ if chosen.possible else "reason: " + chosen.reason


@pytest.mark.parametrize("layer, choice, capability, expected", [
    (nn.Linear(64, 32), 8, None, "IntxWeightOnlyConfig"),
    (nn.Linear(64, 32), 4, None, "IntxWeightOnlyConfig"),
    (nn.Linear(64, 32), 8, H100, "Int8WeightOnlyConfig"),
    (nn.Linear(64, 32), 4, H100, "Int4WeightOnlyConfig"),
    (nn.Linear(64, 32), 4, (7, 5), "reason: Int4WeightOnlyConfig (tinygemm) needs compute capability >= 8.0"),
    (nn.Linear(20, 32), 4, H100, "reason: no Int4WeightOnlyConfig group size"),
    (nn.Linear(64, 32), 2, H100, "reason: torchao 0.18 has no CUDA kernel for int2"),
    (nn.Linear(64, 32), FLOAT8, None, "reason: float8 needs a CUDA GPU"),
    (nn.Linear(64, 32), FLOAT8, (8, 6), "reason: float8 needs compute capability >= 8.9"),
    (nn.Linear(64, 32), FLOAT8, H100, "reason: float8 per-row scaling needs bfloat16"),
    (nn.Linear(64, 32).bfloat16(), FLOAT8, H100, "Float8DynamicActivationFloat8WeightConfig"),
    (nn.Linear(64, 24).bfloat16(), FLOAT8, (8, 9), "reason: float8 needs in/out features that are multiples of 16"),
    (nn.Conv2d(16, 16, 3).bfloat16(), FLOAT8, H100, "reason: float8 conv does not run"),
    (nn.Conv2d(16, 32, 3), 4, H100, "IntxWeightOnlyConfig"),
    (nn.Conv2d(1, 8, 3), 8, H100, "reason: blocks of 1 input channel"),
    (nn.Conv2d(1, 8, 3), 8, None, "reason: blocks of 1 input channel"),
    (nn.Linear(64, 32).double(), 8, H100, "reason: weight dtype torch.float64"),
    (nn.Linear(64, 32), FLOAT, H100, "NoneType"),
])
def test_layer_config_selection(layer, choice, capability, expected) -> None:
    assert _config_name(layer, choice, capability).startswith(expected)


def test_cuda_config_details() -> None:
    int4 = layer_config(nn.Linear(96, 8), 4, H100)
    assert int4.config.group_size == 32 and int4.bfloat16 and int4.spec.mapping == "asymmetric"  # 32 | 96, 64 does not
    assert layer_config(nn.Linear(256, 8), 4, H100).config.group_size == 128
    assert "group sizes" in layer_config(nn.Linear(96, 8), 4, H100, group_size=48).reason
    assert "symmetric only" in layer_config(nn.Linear(64, 8), 8, H100, mapping="asymmetric").reason
    assert "divide" in layer_config(nn.Linear(96, 8), 8, H100, group_size=64).reason
    assert not layer_config(nn.Linear(64, 8), 8, None, mapping="asymmetric").reason  # IntxWeightOnly on CPU


def test_float8_dequantized_is_close_but_not_exact() -> None:
    w = torch.randn(32, 64)
    err = (float8_dequantized(w) - w).abs()
    rel = err.amax(1) / w.abs().amax(1)
    assert 0 < rel.max() < 2 ** -3  # e4m3: 3 mantissa bits, per-row scale


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 20),
                         nn.ReLU(), nn.Linear(20, 10)).eval()


def test_plan_for_cuda_reports_constrained_layers_on_cpu() -> None:
    model = _mlp()
    plan = plan_bits(model, synthetic(32), Budget(avg_bits=6), candidates=(2, 4, 8, FLOAT8, FLOAT), device="cuda",
                     capability=H100, example_inputs=torch.zeros(1, 1, 28, 28), calibration_samples=32, probes=1)
    assert plan.device == "cuda" and plan.to_dict()["capability"] == [9, 0]
    assert "input channel" in plan.kept_float["0"]
    constrained = plan.constrained
    assert set(constrained["6"]) == {2, FLOAT8}  # int2 Linear: no CUDA kernel; float8: fp32 weights
    assert set(constrained["10"]) == {2, 4, FLOAT8}  # 20 input features: no int4 group size, not a multiple of 16
    assert FLOAT8 in constrained["2"] and 2 not in constrained["2"]  # conv: int2 fine (IntxWeightOnly), no float8
    for name, layer in plan.layers.items():
        assert layer.choice not in layer.excluded
        assert set(layer.options) == ({FLOAT} if layer.note else {2, 4, 8, FLOAT8, FLOAT} - set(layer.excluded))
    assert plan.avg_bits <= 6 + 1e-9


@pytest.mark.parametrize("predictor", ["noise", "jvp"])
def test_plan_offers_float8_to_bf16_linear_layers(predictor) -> None:
    model = _mlp().to(torch.bfloat16)
    data = synthetic(32)
    plan = plan_bits(model, TensorDataset(data.tensors[0].bfloat16(), data.tensors[1]), Budget(avg_bits=7.9),
                     candidates=(4, 8, FLOAT8, FLOAT), device="cuda", capability=H100, predictor=predictor,
                     example_inputs=torch.zeros(1, 1, 28, 28, dtype=torch.bfloat16), calibration_samples=32, probes=1)
    assert FLOAT8 in plan.layers["6"].options and FLOAT8 not in plan.layers["10"].options
    assert plan.layers["6"].options[FLOAT8] > 0 and plan.layers["6"].options[4] > plan.layers["6"].options[8] > 0
    d = plan.to_dict()["layers"]
    assert all(d[n]["float8"] == (plan.layers[n].choice == FLOAT8) for n in d)


def test_float8_on_cpu_is_a_user_error() -> None:
    with pytest.raises(CompressError, match="float8") as err:
        plan_bits(_mlp(), synthetic(32), candidates=(4, 8, FLOAT8, FLOAT), example_inputs=torch.zeros(1, 1, 28, 28))
    assert "drop 'float8'" in err.value.fix
    with pytest.raises(CompressError, match="8.9"):
        plan_bits(_mlp(), synthetic(32), candidates=(8, FLOAT8), device="cuda", capability=(8, 0),
                  example_inputs=torch.zeros(1, 1, 28, 28))


def test_a_plan_applies_where_its_choices_are_possible() -> None:
    model = _mlp()
    plan = plan_bits(model, synthetic(32), Budget(avg_bits=8), candidates=(4, 8, FLOAT), device="cuda",
                     capability=H100, example_inputs=torch.zeros(1, 1, 28, 28), calibration_samples=32, probes=1)
    # on the CPU every chosen candidate is possible (IntxWeightOnly), so the CUDA plan still applies
    quantize(model, plan)
    plan2 = plan_bits(model, synthetic(32), Budget(avg_bits=3), candidates=(2, 8, FLOAT), example_inputs=torch.zeros(1, 1, 28, 28),
                      calibration_samples=32, probes=1)
    assert any(b == 2 for n, b in plan2.bits.items() if n in ("6", "8", "10"))  # int2 Linear: fine on the CPU
    if torch.cuda.is_available():
        with pytest.raises(CompressError, match="cannot be quantized on cuda"):
            quantize(model.cuda(), plan2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_cuda_runs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)).cuda().eval()
    capability = torch.cuda.get_device_capability()
    candidates = (4, 8, FLOAT8, FLOAT) if capability >= (8, 9) else (4, 8, FLOAT)
    if FLOAT8 in candidates:
        model = model.to(torch.bfloat16)
    dtype = next(model.parameters()).dtype
    data = [(torch.randn(16, 3, 16, 16, device="cuda", dtype=dtype), torch.randint(0, 10, (16,), device="cuda"))
            for _ in range(2)]
    x = data[0][0]
    plan = plan_bits(model, data, Budget(avg_bits=6), candidates=candidates, device="cuda", example_inputs=x[:1],
                     calibration_samples=32, probes=1)
    forced = {"4": 4, "6": 8, "8": FLOAT8 if FLOAT8 in candidates else 4}  # every CUDA Linear config, one each
    assert all(c in plan.layers[n].options for n, c in forced.items())
    recipe = plan.to_dict()
    for n, c in forced.items():
        recipe["layers"][n].update(bits=8 if c == FLOAT8 else c, float8=c == FLOAT8)
    from compress.quantize import apply_quantization

    q = apply_quantization(model, recipe)
    kinds = {n: type(q.get_submodule(n).weight).__name__ for n in ("0", *forced)}
    assert kinds["4"].startswith("Int4") and kinds["6"] == "Int8Tensor"
    assert kinds["8"] == ("Float8Tensor" if FLOAT8 in candidates else kinds["4"])
    with torch.no_grad():
        ref, out = model(x).float(), q(x).float()
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < ref.pow(2).mean()


def test_a_cuda_quantized_model_is_not_rebuilt_on_cpu(tmp_path) -> None:
    from compress import load, resolve, save
    from compress.models import attach_spec, spec_of
    from compress.quantize import apply_quantization

    model = resolve("small_resnet", kwargs={"widths": (8, 16, 16)}).eval()
    plan = plan_bits(model, synthetic(32), Budget(avg_bits=8), calibration_samples=32, probes=1)
    q = quantize(model, plan)
    recipe = spec_of(q).quantization
    assert recipe["quantized_on"] == "cpu" and recipe["device"] == "cpu" and recipe["dtype"] == "float32"
    with pytest.raises(CompressError, match="quantized on CUDA"):
        apply_quantization(model, {**recipe, "quantized_on": "cuda"})
    as_if_cuda = save(attach_spec(q, replace(spec_of(q), quantization={**recipe, "quantized_on": "cuda"})),
                      tmp_path / "q.pt")
    with pytest.raises(CompressError, match="cannot be rebuilt on cpu") as err:
        load(as_if_cuda, device="cpu")
    assert "device='cuda'" in err.value.fix
    with pytest.raises(CompressError, match="unknown device"):
        load(as_if_cuda, device="tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="CUDA-only torchao configs, and this machine has no CUDA GPU"):
            load(as_if_cuda)
        with pytest.raises(CompressError, match="no CUDA GPU") as err:
            load(save(model, tmp_path / "float.pt"), device="cuda")
        assert "device='cpu'" in err.value.fix


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fc_choice", [4, 8, FLOAT8])
def test_cuda_quantized_model_round_trips(tmp_path, fc_choice) -> None:
    """Each CUDA Linear config (tinygemm int4, int8, float8) beside IntxWeightOnly convs: saved without pickle,
    rebuilt on the GPU by compress.load with bit-identical outputs."""
    import torchvision

    from compress import load, save
    from compress.models import spec_of

    if fc_choice == FLOAT8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=16).cuda().eval()
    if fc_choice == FLOAT8:
        model = model.to(torch.bfloat16)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=next(model.parameters()).dtype)
    candidates, avg = {4: ((4,), 4), 8: ((8,), 8), FLOAT8: ((4, FLOAT8), 4.1)}[fc_choice]
    plan = plan_bits(model, [x], Budget(avg_bits=avg), candidates=candidates, device="cuda", example_inputs=x[:1],
                     calibration_samples=4, probes=1)
    assert plan.choices["fc"] == fc_choice and not plan.kept_float
    q = quantize(model, plan)
    fc_type = {4: "Int4TilePackedTo4dTensor", 8: "Int8Tensor", FLOAT8: "Float8Tensor"}[fc_choice]
    assert type(q.fc.weight).__name__ == fc_type and type(q.conv1.weight).__name__ == "IntxUnpackedToInt8Tensor"
    loaded = load(save(q, tmp_path / "q.pt"))
    assert spec_of(loaded).quantization["quantized_on"] == "cuda"
    assert type(loaded.fc.weight).__name__ == fc_type and loaded.fc.weight.device.type == "cuda"
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_quantized_model_loads_on_cuda(tmp_path) -> None:
    from compress import load, resolve, save

    model = resolve("small_resnet", kwargs={"widths": (8, 16, 16)}).eval()
    q = quantize(model, plan_bits(model, synthetic(32), Budget(avg_bits=6), calibration_samples=32, probes=1))
    x = torch.randn(4, 1, 28, 28)
    on_gpu = load(save(q, tmp_path / "q.pt"), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), q(x), rtol=1e-4, atol=1e-4)


def test_plan_target_device_errors() -> None:
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(CompressError, match="cannot target device 'meta'"):
        plan_bits(_mlp(), synthetic(32), example_inputs=x, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="needs a GPU here") as err:
            plan_bits(_mlp(), synthetic(32), example_inputs=x, device="cuda")
        assert "capability=(major, minor)" in err.value.fix


def test_cuda_int4_size_counts_its_own_group_size() -> None:
    """tinygemm int4 picks group size 128 for 256 input features (twice the blocks of per-row scales) and keeps a
    bfloat16 zero point beside each block's scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    budget = Budget(avg_bits=4)
    plan = plan_bits(model, synthetic(32, (1, 16, 16)), budget, candidates=(4, FLOAT), device="cuda", capability=H100,
                     example_inputs=torch.zeros(1, 1, 16, 16), calibration_samples=32, probes=1)
    assert plan.layers["1"].bits == 4
    assert plan.layers["1"].size_bytes == 256 * 32 * 4 / 8 + 256 * 32 / 128 * (budget.scale_bytes + 2)
    cpu = plan_bits(model, synthetic(32, (1, 16, 16)), budget, candidates=(4, FLOAT), mapping="asymmetric",
                    group_size=64, example_inputs=torch.zeros(1, 1, 16, 16), calibration_samples=32, probes=1)
    assert cpu.layers["1"].size_bytes == 256 * 32 * 4 / 8 + 256 * 32 / 64 * (budget.scale_bytes + 4 / 8)  # int4 zero
