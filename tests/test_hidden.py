"""The hidden size of transformers as a pruning unit: the residual stream's members are found from a forward pass
(all four families), removal equals a model built with the smaller hidden size from the kept weights (Llama,
float64, exact), criteria score every weight of a channel, and prune / save / load handle it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import criteria
from compress import CompressError, load, save
from compress.adapters import adapter_for
from compress.adapters.hidden import hidden_to_remove, remove_hidden, residual_stream, scoring_group
from compress.adapters.hf_folders import save_pretrained
from compress.batches import predict
from compress.data import inputs_of
from compress.models import resolve
from compress.prune import Target, prune
from test_heads import FAMILIES, mean_squared_gate_derivatives
from test_transformers import llama, token_batches

WIDTH = 32  # hidden size of the tiny test configs


def _stream(family: str):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    model = adapter_for(model).prepared(model).eval()
    return model, data(), residual_stream(model, inputs_of(data()[0]), WIDTH)


def _short(names) -> set[str]:
    return {n.split(".")[-2] + "." + n.split(".")[-1] if "." in n else n for n in names}


def test_the_residual_stream_members_are_found_for_every_family():
    _, _, vit = _stream("vit")
    assert _short(vit.writers) == {"patch_embeddings.projection", "attention.o_proj", "mlp.fc2"}
    assert _short(vit.readers) == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1", "classifier"}
    assert sorted(p for _, p in vit.tensors) == ["cls_token", "position_embeddings"] and len(vit.norms) == 5
    _, _, bert = _stream("bert")
    assert "classifier" not in bert.readers and "bert.pooler.dense" in bert.readers  # the head reads the pooler
    assert "bert.pooler.dense" not in bert.writers and len(bert.embeddings) == 3  # words, positions, token types
    _, _, gpt2 = _stream("gpt2")
    assert "lm_head" in gpt2.readers and _short(gpt2.writers) == {"attn.c_proj", "mlp.c_proj"}
    _, _, llama_stream = _stream("llama")
    assert _short(llama_stream.writers) == {"self_attn.o_proj", "mlp.down_proj"} and len(llama_stream.norms) == 5


def test_removing_hidden_channels_equals_the_smaller_llama_built_from_the_kept_weights():
    """Brute force (float64): a Llama of hidden size 28 whose every parameter is the dense one's restricted to
    the kept hidden channels, built from its own config, gives exactly the pruned model's logits."""
    torch.manual_seed(0)
    dense = llama().double()
    removed = [1, 7, 8, 30]
    keep = torch.tensor([c for c in range(WIDTH) if c not in removed])
    pruned = llama().double()
    pruned.load_state_dict(dense.state_dict())
    x = inputs_of(token_batches()[0])
    stream = residual_stream(pruned, x, WIDTH)
    remove_hidden(stream, removed)
    with pytest.raises(ValueError, match="cannot remove hidden channels"):
        remove_hidden(stream, list(range(stream.width)))  # at least one channel stays
    small = LlamaForCausalLM(LlamaConfig(**{**dense.config.to_dict(), "hidden_size": 28})).double().eval()
    with torch.no_grad():
        for name, p in small.named_parameters():
            full = dense.get_parameter(name)
            for dim, (got, want) in enumerate(zip(p.shape, full.shape)):
                if got != want:
                    full = full.index_select(dim, keep)
            p.copy_(full)
        torch.testing.assert_close(predict(pruned, x), predict(small, x), rtol=1e-12, atol=1e-12)
    assert pruned.lm_head.in_features == 28 and pruned.model.norm.weight.shape == (28,)


def test_a_criterion_scores_every_weight_of_a_hidden_channel():
    """l1 (raw) of channel c = the mean over the group's layers of Σ |weights| of c: the writers' rows and the
    readers' columns (torch-pruning's magnitude criteria skip embedding tables)."""
    model, _, stream = _stream("bert")
    graph = adapter_for(model).dependency_graph(model, inputs_of(token_batches()[0]))
    scores = criteria.get("l1", normalizer="none")(scoring_group(stream, graph))
    brute = (sum(m.weight.abs().sum(1) for m in stream.writers.values())
             + sum(m.weight.abs().sum(0) for m in stream.readers.values())) / (len(stream.writers) + len(stream.readers))
    torch.testing.assert_close(scores.double(), brute.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_removes_hidden_channels_and_the_model_reloads(family, tmp_path):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model, batches = build(), data()
    result = prune(model, batches, criterion="jbr", target=Target(macs=0.5), steps=2, prune_hidden=0.25,
                   progress=False)
    assert abs(result.macs_ratio - 0.5) <= 0.02
    hidden = [(name, len(channels)) for name, _, channels in result.history if name.startswith("hidden:")]
    assert hidden == [("hidden:32", 4), ("hidden:28", 4)]
    x = inputs_of(batches[0])
    with torch.no_grad():
        want = predict(result.model, x)
        save(result.model, tmp_path / "pruned.pt")
        torch.testing.assert_close(predict(load(tmp_path / "pruned.pt"), x), want, rtol=0, atol=0)
        back = resolve(str(save_pretrained(result.model, tmp_path / "folder")))
        torch.testing.assert_close(predict(back, x), want, rtol=0, atol=0)
    if family == "gpt2":  # the LM head stays tied to the input embedding
        assert result.model.lm_head.weight is result.model.transformer.wte.weight
        assert back.lm_head.weight is back.transformer.wte.weight


def test_prune_hidden_bad_values_are_one_line_errors():
    from compress.small_resnet import SmallResNet

    with pytest.raises(CompressError, match=r"prune_hidden=1.5 is not a share .*prune_hidden=0.25"):
        prune(llama(), token_batches(), target=Target(macs=0.5), prune_hidden=1.5, progress=False)
    with pytest.raises(CompressError, match="prune_hidden needs a transformers model with a hidden size"):
        prune(SmallResNet(), [torch.randn(4, 1, 28, 28)], target=Target(macs=0.5), prune_hidden=0.2, progress=False)
    class NoNorms(nn.Module):  # a config with a hidden size, but no norm over it: no residual stream to find
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(hidden_size=8)
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    with pytest.raises(CompressError, match=r"cannot find the residual stream of NoNorms .*leave prune_hidden at 0"):
        prune(NoNorms(), [torch.randn(4, 4)], target=Target(macs=0.5), prune_hidden=0.2, example_inputs=torch.randn(1, 4),
              progress=False)
    assert [hidden_to_remove(64, 64, 0.25), hidden_to_remove(64, 56, 0.25), hidden_to_remove(64, 64, 0.3, 8)] == [16, 8, 16]


def test_jbr_hidden_score_is_the_squared_derivative_of_a_gate_on_every_write_into_the_stream():
    """Llama (float64): the score of hidden channel c is E_x[(∂/∂γ_c m(x)ᵀ f(x))²], γ_c scaling channel c of the
    output of every layer that writes into the residual stream (attention and MLP output projections)."""
    from compress.adapters.hidden import residual_stream as stream_of

    torch.manual_seed(0)
    model, batches = llama().double(), token_batches()
    x0 = inputs_of(batches[0])
    stream = stream_of(model, x0, WIDTH)
    imp = criteria.get("jbr", batches, normalizer="none")
    adapter = adapter_for(model)
    graph = adapter.pruning_graph(model, adapter.dependency_graph(model, adapter.example_inputs(model)))
    scores = imp(scoring_group(stream, graph)).double()

    gate = torch.ones(WIDTH, dtype=torch.float64, requires_grad=True)
    handles = [m.register_forward_hook(lambda module, inputs, out: out * gate) for m in stream.writers.values()]
    try:
        brute = mean_squared_gate_derivatives(model, batches, gate)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(scores, brute, rtol=1e-6, atol=1e-12)
