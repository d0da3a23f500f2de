"""Pruned transformers as Hugging Face folders: ``save_pretrained`` then ``from_pretrained`` (through
``compress.resolve``) gives back the same predictions for all four families; a uniformly pruned Llama reloads in
plain transformers; bad calls are one-line errors that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from transformers import LlamaForCausalLM

from compress import Budget, CompressError, plan_bits, quantize
from compress.adapters.heads import attention_heads, remove_heads
from compress.adapters.hf_folders import SHAPES_KEY, save_pretrained
from compress.batches import predict
from compress.data import inputs_of
from compress.models import resolve
from compress.prune import Target, prune
from test_heads import FAMILIES
from test_transformers import llama, token_batches


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_model_saves_and_reloads_as_a_hugging_face_folder(family, tmp_path):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model, batches = build(), data()
    pruned = prune(model, batches, criterion="jbr", target=Target(macs=0.5), steps=2, progress=False).model
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    folder = save_pretrained(pruned, tmp_path / family)
    assert sorted(p.suffix for p in folder.iterdir() if p.suffix != ".json") == [".safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config[SHAPES_KEY]  # per-layer widths no config count can say
    back = resolve(str(folder))
    assert type(back).__name__ == type(model).__name__ and not back.training
    assert [u.heads for u in attention_heads(back)] == [u.heads for u in attention_heads(pruned)]
    x = inputs_of(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(back, x), predict(pruned, x), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # the input is left as it was


def test_a_uniformly_pruned_llama_reloads_in_plain_transformers(tmp_path):
    """Same heads and MLP width in every layer: the config's counts say it all (Llama fixes head_dim)."""
    torch.manual_seed(0)
    model = llama()
    for unit in attention_heads(model):
        remove_heads(unit, [1])  # one of two key/value heads, with its two query heads
    for layer in model.model.layers:
        channels = list(range(0, 64, 2))
        tp.prune_linear_out_channels(layer.mlp.gate_proj, channels)
        tp.prune_linear_out_channels(layer.mlp.up_proj, channels)
        tp.prune_linear_in_channels(layer.mlp.down_proj, channels)
    folder = save_pretrained(model, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    assert SHAPES_KEY not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 32)
    plain = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    x = inputs_of(token_batches()[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(plain, x), predict(model, x), rtol=0, atol=0)


def test_save_pretrained_bad_calls_write_nothing(tmp_path):
    torch.manual_seed(0)
    model, batches = llama(), token_batches()
    (tmp_path / "taken").mkdir()
    with pytest.raises(CompressError, match="already exists.*overwrite=True"):
        save_pretrained(model, tmp_path / "taken")
    quantized = quantize(model, plan_bits(model, batches, budget=Budget(avg_bits=8)))
    with pytest.raises(CompressError, match="quantized .*torchao.*compress.save"):
        save_pretrained(quantized, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and not any((tmp_path / "taken").iterdir())
