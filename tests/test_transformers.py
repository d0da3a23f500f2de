"""Hugging Face transformers through the pipeline: named-input batches, the adapter, MLP pruning, JBR on token
sequences against brute force in float64, bit plans and quantization, save/load, bad inputs.

Tiny configs with random weights (no download): ViT, BERT and a Llama with grouped-query attention."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification)

import criteria
from compress import Budget, CompressError, check, load, plan_bits, quantize, save
from compress.adapters import HuggingFaceAdapter, adapter_for
from compress.batches import concat_rows, first_rows, predict, prediction, rows, split_rows
from compress.data import calibration, inputs_of, labels_of
from compress.evaluate import compare
from compress.macs import count_macs_params
from compress.prune import Target, prune
from exporters import export_onnx

VOCAB, LENGTH, SAMPLES = 50, 10, 24


def vit() -> nn.Module:
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config).eval()


def bert() -> nn.Module:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


def llama() -> nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
    return LlamaForCausalLM(config).eval()


def token_batches(seed: int = 0, padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of 8 with right padding (lengths 4..LENGTH) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (SAMPLES, LENGTH), generator=g)
    lengths = torch.randint(4, LENGTH + 1, (SAMPLES,), generator=g) if padded else torch.full((SAMPLES,), LENGTH)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (SAMPLES,), generator=g)
    return [{"input_ids": ids[i:i + 8] * mask[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
            for i in range(0, SAMPLES, 8)]


def image_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(8, 1, 28, 28, generator=g)} for _ in range(SAMPLES // 8)]


FAMILIES = {"vit": (vit, image_batches), "bert": (bert, token_batches), "llama": (llama, token_batches)}
MLP_LAYERS = {"vit": ("mlp.fc1",), "bert": ("intermediate.dense",), "llama": ("mlp.gate_proj", "mlp.up_proj")}


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# --- named-input batches ---------------------------------------------------------------------------------------

def test_dict_batches_give_named_inputs_and_labels():
    batch = token_batches()[0]
    x = inputs_of(batch)
    assert sorted(x) == ["attention_mask", "input_ids"] and labels_of(batch) is batch["labels"]
    assert rows(x) == 8 and rows(first_rows(x, 3)) == 3 and rows(concat_rows([x, x])) == 16
    assert [rows(part) for part in split_rows(x, 3)] == [3, 3, 2]
    with pytest.raises(CompressError, match="disagree on the number of samples"):
        rows({"input_ids": torch.zeros(2, 4), "attention_mask": torch.zeros(3, 4)})


def test_calibration_takes_dict_batches_and_dict_datasets():
    batches = token_batches()
    taken = list(calibration(batches, num_samples=12))
    assert [rows(x) for x in taken] == [8, 4] and "labels" not in taken[0]
    assert torch.equal(taken[1]["input_ids"], batches[1]["input_ids"][:4])

    class Tokenized(torch.utils.data.Dataset):  # a map-style dataset of dict items (a datasets.Dataset's shape)
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.full((LENGTH,), i), "attention_mask": torch.ones(LENGTH), "labels": torch.tensor(i % 3)}

    labelled = list(calibration(Tokenized(), num_samples=10, batch_size=4, with_labels=True))
    assert [rows(x) for x, _ in labelled] == [4, 4, 2] and labelled[0][1].tolist() == [0, 1, 2, 0]


def test_prediction_of_a_language_model_is_the_last_attended_position():
    model, batch = llama(), token_batches()[0]
    x = inputs_of(batch)
    with torch.no_grad():
        logits = model(**x).logits  # (samples, positions, vocabulary)
        got = predict(model, x)
    last = x["attention_mask"].sum(1) - 1  # right padding
    assert torch.equal(got, logits[torch.arange(8), last])
    left = {"attention_mask": x["attention_mask"].flip(1)}  # left padding: the last position is attended
    assert torch.equal(prediction(type("Out", (), {"logits": logits})(), left), logits[:, -1])


# --- the adapter ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_identifies_and_rebuilds_from_the_config(family):
    build, _ = FAMILIES[family]
    model = build()
    adapter = adapter_for(model)
    assert isinstance(adapter, HuggingFaceAdapter)
    spec = adapter.identify(model)
    assert spec.arch == f"hf:{type(model).__name__}" and spec.adapter == "transformers"
    assert spec.input_shape == ((1, 28, 28) if family == "vit" else (16,))  # sequence: min(32, positions)
    rebuilt = adapter.rebuild(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    example = adapter.example_inputs(model, batch=2)
    assert rows(example) == 2 and adapter.input_spec(model).names == (("pixel_values",) if family == "vit"
                                                                       else ("input_ids", "attention_mask"))


def test_bad_inputs_are_one_line_errors():
    model, adapter = bert(), HuggingFaceAdapter()
    with pytest.raises(CompressError, match="takes named inputs with 'input_ids'"):
        adapter.check_inputs(model, {"attention_mask": torch.ones(2, 4)})
    with pytest.raises(CompressError, match="takes named inputs with 'input_ids', got a Tensor"):
        adapter.check_inputs(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(CompressError, match="17 tokens are longer than the 16 positions.*truncate to at most 16"):
        adapter.check_inputs(model, {"input_ids": torch.zeros(2, 17, dtype=torch.long)})
    with pytest.raises(CompressError, match=r"pixel_values of shape \(2, 3, 28, 28\).*\(N, 1, H, W\)"):
        adapter.check_inputs(vit(), {"pixel_values": torch.zeros(2, 3, 28, 28)})
    with pytest.raises(CompressError, match="calibration batch 0: .*17 tokens"):  # found before any pruning work
        prune(model, [{"input_ids": torch.zeros(2, 17, dtype=torch.long)}], criterion="l1", progress=False)


# --- pruning ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["l1", "jbr"])
def test_mlp_channels_pruned_to_the_target_and_reloaded(family, criterion, tmp_path):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model, batches = build(), data()
    result = prune(model, batches, criterion=criterion, target=Target(macs=0.8), steps=1, prune_heads=False,
                   progress=False)  # heads: tests/test_heads.py
    assert abs(result.macs_ratio - 0.8) <= 0.02
    before, after = widths(model), widths(result.model)
    changed = {n for n in before if before[n] != after[n]}
    assert changed and all(n.endswith(MLP_LAYERS[family]) or n == "bert.pooler.dense" for n in changed)
    if family == "llama":  # gate and up projections lose the same channels
        assert all(after[n] == after[n.replace("gate_proj", "up_proj")] for n in changed if "gate_proj" in n)
    example = HuggingFaceAdapter().example_inputs(result.model)
    assert count_macs_params(result.model, example)[0] == result.macs_after
    save(result.model, tmp_path / "pruned.pt")
    back = load(tmp_path / "pruned.pt")
    x = inputs_of(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(back, x), predict(result.model, x), rtol=0, atol=0)


def test_jbr_on_token_sequences_equals_brute_force_per_sample_derivatives():
    """Llama (float64, padded batches): the JBR score of each MLP channel c is E_x[(∂/∂γ m(x)ᵀ f(x))²] with γ
    scaling channel c of both gate_proj and up_proj at every position, f the last attended position's logits."""
    torch.manual_seed(0)
    model = llama().double()
    batches = token_batches()
    imp = criteria.get("jbr", batches, normalizer="none")
    adapter = adapter_for(model)
    example = adapter.example_inputs(model)
    graph = adapter.pruning_graph(model, adapter.dependency_graph(model, example))
    mlp = model.model.layers[1].mlp
    group = graph.get_pruning_group(mlp.up_proj, tp.prune_linear_out_channels, list(range(64)))
    scores = imp(group).double()

    params = [mlp.gate_proj.weight, mlp.up_proj.weight]
    derivatives = []
    for batch in batches:
        x = inputs_of(batch)
        with torch.no_grad():
            classes = predict(model, x).argmax(1)
        for i in range(8):
            one = {k: v[i:i + 1] for k, v in x.items()}
            grads = torch.autograd.grad(predict(model, one)[0, classes[i]], params)
            derivatives.append(sum((p * g).sum(1) for p, g in zip(params, grads)))
    expected = (torch.stack(derivatives) ** 2).mean(0)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-12)


# --- bits, quantization -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_bit_plan_and_quantization_of_every_linear(family):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model, batches = build(), data()
    plan = plan_bits(model, batches, budget=Budget(avg_bits=6))
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(plan.layers) == layers  # every Linear a candidate (and ViT's patch embedding, a Conv2d)
    assert 5.0 <= plan.avg_bits <= 6.0 + 1e-9
    quantized = quantize(model, plan)
    comparison = compare(quantized, model, [inputs_of(b) for b in batches])
    assert comparison.agreement >= 0.75 and comparison.total == SAMPLES


# --- ONNX export and check -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_quantized() -> dict[str, tuple[nn.Module, nn.Module, list]]:
    """Each family pruned to 0.8 MACs with JBR and quantized to a 6-bit plan: (dense, quantized, batches)."""
    out = {}
    for family, (build, data) in FAMILIES.items():
        torch.manual_seed(0)
        dense, batches = build(), data()
        pruned = prune(dense, batches, criterion="jbr", target=Target(macs=0.8), steps=1, progress=False).model
        out[family] = (dense, quantize(pruned, plan_bits(pruned, batches, budget=Budget(avg_bits=6))), batches)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_onnx_with_named_inputs_matches_in_onnxruntime(family, pruned_quantized, tmp_path):
    import onnx

    dense, quantized, batches = pruned_quantized[family]
    path = tmp_path / f"{family}.onnx"
    result = export_onnx(quantized, inputs_of(batches[0]), path)
    assert result.weights == "packed" and len(result.packed) >= 10
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names == (["pixel_values"] if family == "vit" else ["input_ids", "attention_mask"])
    if family != "vit":  # batch and sequence are dynamic: a longer, differently padded batch runs too
        assert all(not d.dim_value for d in graph.input[0].type.tensor_type.shape.dim)
        batches = batches + [{"input_ids": torch.randint(1, VOCAB, (3, 14)), "attention_mask": torch.ones(3, 14, dtype=torch.long)}]
    report = check(path, reference=quantized, data=batches, dense=dense, batch_sizes=(1, 4), latency_runs=2)
    assert report.passed, report.failures
    assert report.rel_diff <= 1e-4 and report.reference_agreement == 1.0 and report.num_samples == rows_total(batches)
    assert set(report.latency_ms) == {1, 4}


def rows_total(batches: list) -> int:
    return sum(rows(inputs_of(b)) for b in batches)


def test_onnx_bad_inputs_are_one_line_errors(pruned_quantized, tmp_path):
    _, quantized, batches = pruned_quantized["bert"]
    path = tmp_path / "bert.onnx"
    export_onnx(quantized, inputs_of(batches[0]), path)
    with pytest.raises(CompressError, match="takes named inputs .*got one tensor"):
        check(path, reference=quantized, data=[torch.zeros(2, 5, dtype=torch.long)])
    with pytest.raises(CompressError, match="the data has no input 'attention_mask'"):
        check(path, reference=quantized, data=[{"input_ids": torch.zeros(2, 5, dtype=torch.long)}])
    with pytest.raises(CompressError, match="dynamic dimensions besides the batch.*data="):
        check(path, reference=quantized)
    with pytest.raises(CompressError, match="calibration batches lack the input.* attention_mask"):
        export_onnx(quantized, inputs_of(batches[0]), tmp_path / "int8.onnx", activations="int8",
                    calibration_data=[{"input_ids": b["input_ids"]} for b in batches])
    assert not (tmp_path / "int8.onnx").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_qdq_onnx_with_named_inputs(family, pruned_quantized, tmp_path, monkeypatch):
    """Static int8 QDQ of a transformer calibrated on its named-input batches: every weight layer (the plan's
    bits) quantized, the attention's activation-by-activation products left in float, close to its source; no
    temporary file left in the working directory (onnxruntime's symbolic shape inference fails on BERT's graph)."""
    import onnx

    _, quantized, batches = pruned_quantized[family]
    path = tmp_path / f"{family}-int8.onnx"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = export_onnx(quantized, inputs_of(batches[0]), path, activations="int8", calibration_data=batches)
    assert not any((tmp_path / "cwd").iterdir())
    linear = {n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)}
    convs = {n for n, m in quantized.named_modules() if isinstance(m, nn.Conv2d)}  # ViT's patch embedding
    assert result.weights == "qdq-int8" and {p.name for p in result.packed} | set(result.float_layers) == linear | convs
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    weight_matmuls = [n for n in matmuls if producers.get(n.input[1]) == "DequantizeLinear"]
    products = [n for n in matmuls if n not in weight_matmuls and n.input[1] not in initializers]
    assert len(weight_matmuls) == len({p.name for p in result.packed} & linear)
    assert len(products) == 2 * quantized.config.num_hidden_layers  # QKᵀ and the weighted values, per layer
    assert all(producers.get(n.input[0]) != "DequantizeLinear" for n in products)
    report = check(path, reference=quantized, data=batches, latency_runs=1, batch_sizes=(1,), min_agreement=0.9)
    assert report.passed, report.failures
    assert report.rel_diff < 0.1


# --- GPT-2: Conv1D layers ---------------------------------------------------------------------------------------

def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_become_equal_linears_through_the_whole_pipeline(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model, batches = gpt2(), token_batches()
    adapter = adapter_for(model)
    prepared = adapter.prepared(model)
    assert prepared is not model and any(isinstance(m, Conv1D) for m in model.modules())  # the user's model untouched
    assert not any(isinstance(m, Conv1D) for m in prepared.modules())
    x = inputs_of(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(prepared, x), predict(model, x), rtol=1e-6, atol=1e-6)

    result = prune(model, batches, criterion="jbr", target=Target(macs=0.8), steps=1, progress=False)
    assert abs(result.macs_ratio - 0.8) <= 0.02
    changed = {l.name for l in result.layers if l.after != l.before}
    assert changed and all(n.endswith(("mlp.c_fc", "attn.c_attn")) for n in changed)  # MLP channels, whole heads
    plan = plan_bits(model, batches, budget=Budget(avg_bits=6))  # the unpruned model: its Conv1D layers planned
    assert {f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} <= set(plan.layers)
    assert plan.bits["lm_head"] == 16 and "tied to transformer.wte's" in plan.layers["lm_head"].note  # reported
    save(model, tmp_path / "dense.pt")
    with torch.no_grad():
        torch.testing.assert_close(predict(load(tmp_path / "dense.pt"), x), predict(model, x), rtol=1e-6, atol=1e-6)
    pruned = result.model
    quantized = quantize(pruned, plan_bits(pruned, batches, budget=Budget(avg_bits=6)))
    export_onnx(quantized, x, tmp_path / "gpt2.onnx")
    report = check(tmp_path / "gpt2.onnx", reference=quantized, data=batches, batch_sizes=(1,), latency_runs=2)
    assert report.passed, report.failures


def test_a_vision_model_takes_plain_image_batches(tmp_path):
    """ImageFolder / Fashion-MNIST loaders yield (image, label) tensors: a HF ViT takes them as its pixel_values."""
    torch.manual_seed(0)
    model = vit()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    result = prune(model, batches, criterion="jbr", target=Target(macs=0.8), steps=1, progress=False)
    export_onnx(result.model, batches[0][0], tmp_path / "vit.onnx")
    report = check(tmp_path / "vit.onnx", reference=result.model, data=batches, batch_sizes=(2,), latency_runs=2)
    assert report.passed and report.top1 is not None and report.num_samples == 24
    with pytest.raises(CompressError, match=r"pixel_values of shape \(8, 3, 28, 28\)"):
        prune(model, [torch.zeros(8, 3, 28, 28)], criterion="l1", progress=False)


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_distillation_recovers_a_pruned_transformer_towards_its_dense_model(family):
    """Recovery runs on named inputs: the pruned student moves towards the dense teacher's predictions (the KL on
    the training batches falls)."""
    from compress.recover import distill

    build, data = FAMILIES[family]
    torch.manual_seed(0)
    dense, batches = build(), data()
    if family == "llama":  # HF's default init (std 0.02) predicts a near-uniform next token: nothing to recover
        dense = LlamaForCausalLM(LlamaConfig(**{**dense.config.to_dict(), "initializer_range": 0.3})).eval()
    student = prune(dense, batches, criterion="l1", target=Target(macs=0.6), steps=1, progress=False).model
    before = compare(student, dense, [inputs_of(b) for b in batches]).kl
    losses = distill(student, dense, batches, steps=30, lr=3e-3, progress=False)
    after = compare(student, dense, [inputs_of(b) for b in batches]).kl
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses))) and after < 0.7 * before


def test_a_save_pretrained_folder_loads_from_safetensors_only(tmp_path, recwarn):
    from compress.models import resolve

    torch.manual_seed(0)
    model = bert()
    model.save_pretrained(tmp_path / "bert")
    loaded = resolve(str(tmp_path / "bert"))
    x = inputs_of(token_batches()[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(loaded, x), predict(model, x), rtol=0, atol=0)
    assert adapter_for(loaded).identify(loaded).weights == str(tmp_path / "bert") and not loaded.training
    assert not [w for w in recwarn if "transformers" in str(w.filename)]  # a normal load prints no warning
    for f in (tmp_path / "bert").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CompressError, match="holds no .safetensors weights"):
        resolve(str(tmp_path / "bert"))


def test_the_vit_preset_builds_trains_and_caches_as_a_transformers_model(tmp_path, monkeypatch):
    """``resolve("vit_fmnist", "train")``: a transformers ViT trained on Fashion-MNIST and cached like the CNNs
    (a few steps on a subset here; the benchmark trains the full model)."""
    from compress.models import resolve
    from compress.train import TrainConfig

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    model = resolve("vit_fmnist", "train", train_config=TrainConfig(epochs=1, train_samples=256, batch_size=64),
                    progress=False)
    spec = adapter_for(model).identify(model)
    assert isinstance(model, ViTForImageClassification) and spec.arch == "hf:ViTForImageClassification"
    assert model.config.patch_size == 7 and spec.weights.startswith("train:fashion-mnist:")
    cached = list(tmp_path.glob("*.pt"))
    assert len(cached) == 1 and load(cached[0]).config.hidden_size == 64
    again = resolve("vit_fmnist", "train", train_config=TrainConfig(epochs=1, train_samples=256, batch_size=64),
                    progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_hawq_baseline_plans_a_transformer():
    """HAWQ-V2's Hessian traces need a double backward through attention (the CPU flash kernel has none)."""
    torch.manual_seed(0)
    model, batches = vit(), image_batches()
    plan = plan_bits(model, batches, budget=Budget(avg_bits=6), allocator="hawq")
    assert 5.0 <= plan.avg_bits <= 6.0 + 1e-9 and plan.allocator == "hawq"
