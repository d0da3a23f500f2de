"""compress.backends: the candidate vocabulary, each backend's per-layer configs and reasons, the bytes it stores,
the registry (a toy backend registered in a test), reload devices, and the layering of the package."""

from __future__ import annotations

import pkgutil
import sys

import pytest
import torch
from torch import nn

from compress.backends import (FLOAT, FLOAT8, CudaBackend, IntxBackend, LayerConfig, QuantBackend, apply_quantization,
                               backend_for, fake_quantize, float8_dequantized, layer_config, order, parse_candidate,
                               register, registered, reload_device, storage_bits, unregister)
from compress.errors import CompressError

H100 = (9, 0)


@pytest.mark.parametrize("value, expected", [
    (1, 1), (4, 4), (8, 8), (16, FLOAT), ("3", 3), ("float8", FLOAT8), (" Float8 ", FLOAT8), ("float", FLOAT),
    ("fp16", FLOAT), ("16", FLOAT),
])
def test_parse_candidate_accepts(value, expected) -> None:
    assert parse_candidate(value) == expected


@pytest.mark.parametrize("value", [0, 9, 15, 17, -4, True, 4.0, None, "int4", "float16", "fp8", "", [4]])
def test_parse_candidate_rejects_with_one_line(value) -> None:
    with pytest.raises(CompressError) as err:
        parse_candidate(value)
    message = str(err.value)
    assert "\n" not in message and "not a quantization candidate" in message and "fix: use bits 1..8" in message


def test_storage_bits_and_order() -> None:
    assert [storage_bits(c) for c in (2, 8, FLOAT8, FLOAT)] == [2, 8, 8, 16]
    assert sorted([FLOAT, FLOAT8, 8, 2, 4], key=order) == [2, 4, 8, FLOAT8, FLOAT]


def test_backend_for_targets() -> None:
    assert type(backend_for(None)) is IntxBackend and type(backend_for("cpu")) is IntxBackend
    cuda = backend_for(H100)
    assert type(cuda) is CudaBackend and cuda.capability == H100 and cuda.device_type == "cuda"
    assert type(backend_for([8, 0])) is CudaBackend
    with pytest.raises(CompressError, match="not supported"):
        backend_for("meta")


@pytest.mark.parametrize("capability, layer, choice, reason", [
    (None, nn.Conv2d(1, 8, 3), 8, "blocks of 1 input channel"),
    (None, nn.Linear(64, 32), FLOAT8, "float8 needs a CUDA GPU"),
    (None, nn.Linear(96, 8), 4, ""),
    (None, nn.Linear(64, 32).double(), 8, "weight dtype torch.float64"),
    (H100, nn.Linear(64, 32), 3, "no CUDA kernel for int3"),
    (H100, nn.Conv2d(1, 8, 3), 8, "blocks of 1 input channel"),
    (H100, nn.Conv2d(16, 16, 3).bfloat16(), FLOAT8, "float8 conv does not run"),
    ((8, 6), nn.Linear(64, 32).bfloat16(), FLOAT8, "float8 needs compute capability >= 8.9"),
    ((7, 5), nn.Linear(64, 32), 4, "Int4WeightOnlyConfig (tinygemm) needs compute capability >= 8.0"),
])
def test_layer_config_reasons(capability, layer, choice, reason) -> None:
    chosen = backend_for(capability).layer_config(layer, choice)
    assert reason in chosen.reason and chosen.possible == (not reason)
    assert layer_config(layer, choice, capability).reason == chosen.reason
    assert backend_for(capability).layer_config(layer, FLOAT) == LayerConfig()


def test_size_bytes_by_hand() -> None:
    cpu, cuda = backend_for(None), backend_for(H100)
    linear = nn.Linear(64, 32)  # 2048 weights, rows of 64
    w = linear.weight
    assert cpu.size_bytes(w, FLOAT, None, None, 2) == 2048 * 2
    # int4 per row, symmetric: 2048·4/8 + 32 rows · 2-byte scale
    assert cpu.size_bytes(w, 4, cpu.layer_config(linear, 4), None, 2) == 1024 + 32 * 2
    # int4 groups of 32, asymmetric: zero points at the data's width (0.5 bytes) beside each scale
    asym = cpu.layer_config(linear, 4, group_size=32, mapping="asymmetric")
    assert asym.zero_point_bytes == 0.5
    assert cpu.size_bytes(w, 4, asym, 32, 2) == 1024 + 64 * (2 + 0.5)
    # tinygemm int4 picks group 32 for 96 inputs and keeps a bfloat16 zero point per group: 768/2 + 24·(2 + 2)
    tiny = nn.Linear(96, 8)
    assert cuda.size_bytes(tiny.weight, 4, cuda.layer_config(tiny, 4), None, 2) == 384 + 24 * 4
    # float8 per row: 1 byte per weight + one scale per row
    f8 = nn.Linear(64, 32).bfloat16()
    assert cuda.size_bytes(f8.weight, FLOAT8, cuda.layer_config(f8, FLOAT8), None, 4) == 2048 + 32 * 4
    # conv int8 per (out channel, kh, kw) block of Cin=16: 1152 + 72 scales
    conv = nn.Conv2d(16, 8, 3)
    assert cpu.size_bytes(conv.weight, 8, cpu.layer_config(conv, 8), None, 2) == 1152 + 72 * 2


def test_dequantized_is_the_backends_q_of_w() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    w = linear.weight.detach()
    cpu, cuda = backend_for(None), backend_for(H100)
    config = cpu.layer_config(linear, 3)
    assert torch.equal(cpu.dequantized(w, 3, config), fake_quantize(w, config.spec))
    assert cpu.dequantized(w, FLOAT, LayerConfig()) is w
    assert torch.equal(cuda.dequantized(w, FLOAT8, None), float8_dequantized(w))
    int4 = cuda.layer_config(linear, 4)
    assert torch.equal(cuda.dequantized(w, 4, int4), fake_quantize(w, int4.spec))


def test_registering_a_toy_backend() -> None:
    class Toy(QuantBackend):
        name = "toy"
        device_type = "toy"

        @classmethod
        def handles(cls, capability) -> bool:
            return capability == (1, 0)

        def layer_config(self, layer, choice, *, group_size=None, mapping="symmetric") -> LayerConfig:
            return LayerConfig(reason="the toy quantizes nothing")

    assert register(Toy) is Toy
    try:
        assert registered()[0] is Toy
        toy = backend_for((1, 0))
        assert isinstance(toy, Toy) and toy.capability == (1, 0)
        assert layer_config(nn.Linear(4, 4), 8, (1, 0)).reason == "the toy quantizes nothing"
        assert type(backend_for(H100)) is CudaBackend and type(backend_for(None)) is IntxBackend
    finally:
        unregister(Toy)
    assert Toy not in registered() and type(backend_for((1, 0))) is CudaBackend
    with pytest.raises(CompressError, match="not a QuantBackend"):
        register(object)  # type: ignore[arg-type]


def test_every_backend_file_in_the_package_is_registered() -> None:
    import compress.backends as package

    modules = [sys.modules[f"compress.backends.{m.name}"] for m in pkgutil.iter_modules(package.__path__)]
    defined = {cls for module in modules for cls in vars(module).values()
               if isinstance(cls, type) and issubclass(cls, QuantBackend) and cls is not QuantBackend
               and cls.__module__ == module.__name__}
    assert {IntxBackend, CudaBackend} <= defined <= set(registered())


def test_reload_device() -> None:
    assert reload_device(None, None, "m.pt") == torch.device("cpu")
    assert reload_device({"quantized_on": "cpu"}, "cpu", "m.pt") == torch.device("cpu")
    with pytest.raises(CompressError, match="unknown device 'gpu'"):
        reload_device(None, "gpu", "m.pt")
    with pytest.raises(CompressError, match="m.pt was quantized with CUDA-only torchao configs; it cannot be rebuilt on cpu"):
        reload_device({"quantized_on": "cuda"}, "cpu", "m.pt")
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="m.pt was quantized with CUDA-only torchao configs, and this machine"):
            reload_device({"quantized_on": "cuda"}, None, "m.pt")
        with pytest.raises(CompressError, match="m.pt is to be loaded on CUDA"):
            reload_device(None, "cuda", "m.pt")


def test_apply_quantization_on_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    q = apply_quantization(model, {"layers": {"0": {"bits": 4, "float8": False}, "2": {"bits": FLOAT}}})
    assert type(q[0].weight).__name__ != "Parameter" and type(q[2].weight) is nn.Parameter
    assert type(model[0].weight) is nn.Parameter  # the user's model is untouched
    with pytest.raises(CompressError, match="lacks"):
        apply_quantization(model, {"layers": {"9": {"bits": 4}}})
    with pytest.raises(CompressError, match="quantized on CUDA"):
        apply_quantization(model, {"layers": {}, "quantized_on": "cuda"})




def test_multihead_attention_out_proj_stays_float_and_the_quantized_vit_runs() -> None:
    """torch's attention function transposes out_proj.weight itself (aten.t), which torchao's integer weight tensors
    do not implement: that layer is kept in float with the reason, the others are quantized, and the model runs in
    eval mode under no_grad (the fused fast path), where it used to raise NotImplementedError."""
    import torchvision

    from compress.data import synthetic
    from compress.plan import Budget, plan_bits
    from compress.quantize import quantize

    torch.manual_seed(0)
    vit = torchvision.models.vit_b_32(num_classes=4, image_size=32).eval()
    vit.encoder.layers = vit.encoder.layers[:1]
    x = torch.zeros(1, 3, 32, 32)
    plan = plan_bits(vit, synthetic(8, (3, 32, 32)), Budget(avg_bits=6), example_inputs=x, calibration_samples=8)
    out_proj = plan.layers["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert out_proj.bits == FLOAT and "out_proj" in out_proj.note
    assert plan.layers["encoder.layers.encoder_layer_0.mlp.0"].bits in (4, 8)
    with torch.no_grad():
        assert quantize(vit, plan)(torch.randn(2, 3, 32, 32)).shape == (2, 4)
