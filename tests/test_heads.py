"""Whole attention heads of Hugging Face transformers: removal equals zeroing their context (brute force, float64),
grouped-query attention keeps a key/value head with its query group, JBR's head score equals brute-force
derivatives, and prune removes heads that a saved model replays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import criteria
from compress import load, save
from compress.adapters import adapter_for
from compress.adapters.heads import attention_heads, head_scores, heads_to_remove, lowest_heads, remove_heads
from compress.batches import predict
from compress.data import inputs_of
from compress.prune import Target, prune
from test_transformers import bert, gpt2, image_batches, llama, token_batches, vit

FAMILIES = {"vit": (vit, image_batches), "bert": (bert, token_batches), "llama": (llama, token_batches),
            "gpt2": (gpt2, token_batches)}


def _prepared(family: str) -> tuple[nn.Module, list]:
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    return adapter_for(model).prepared(model).double().eval(), data()


def _with_context_zeroed(model: nn.Module, unit_name: str, columns: list[int], x) -> torch.Tensor:
    """The model's prediction with output-projection input columns ``columns`` of ``unit_name`` set to 0."""
    unit = next(u for u in attention_heads(model) if u.name == unit_name)

    def zero(module, inputs):
        held = inputs[0].clone()
        held[..., columns] = 0
        return (held,)

    handle = unit.o.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            return predict(model, x)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_heads_equals_zeroing_their_context(family):
    model, batches = _prepared(family)
    units = attention_heads(model)
    assert len(units) == 2 and all(u.heads == 4 for u in units)
    assert [u.kv_heads for u in units] == ([2, 2] if family == "llama" else [4, 4])  # GQA: 2 query heads per kv head
    unit = units[1]
    x = inputs_of(batches[0])
    expected = _with_context_zeroed(model, unit.name, unit.query_rows([0]), x)
    remove_heads(unit, [0])
    assert unit.heads == (2 if family == "llama" else 3)
    again = next(u for u in attention_heads(model) if u.name == unit.name)  # rediscovered from the pruned widths
    assert (again.kv_heads, again.group) == (unit.kv_heads, unit.group)
    with torch.no_grad():
        torch.testing.assert_close(predict(model, x), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cannot remove heads"):
        remove_heads(unit, list(range(unit.kv_heads)))  # at least one head stays


def test_jbr_head_score_is_the_squared_derivative_of_a_gate_on_the_heads_context():
    """Llama with GQA (float64): the score of key/value head j is E_x[(∂/∂γ m(x)ᵀ f(x))²], γ scaling the context
    of j's two query heads (their output-projection input columns) at every position."""
    model, batches = _prepared("llama")
    imp = criteria.get("jbr", batches, normalizer="none")
    adapter = adapter_for(model)
    graph = adapter.pruning_graph(model, adapter.dependency_graph(model, adapter.example_inputs(model)))
    unit = attention_heads(model)[0]
    scores = head_scores(imp, unit, graph).double()

    gate = torch.ones(unit.kv_heads, dtype=torch.float64, requires_grad=True)
    handle = unit.o.register_forward_pre_hook(
        lambda module, inputs: (inputs[0] * torch.repeat_interleave(gate, unit.group * unit.head_dim),))
    try:
        brute = mean_squared_gate_derivatives(model, batches, gate)
    finally:
        handle.remove()
    torch.testing.assert_close(scores, brute, rtol=1e-6, atol=1e-12)


def mean_squared_gate_derivatives(model: nn.Module, batches: list, gate: torch.Tensor) -> torch.Tensor:
    """Brute-force JBR: E_x[(∂/∂gate m(x)ᵀ f(x))²], one sample at a time, m(x) the predicted class (the gate is
    applied by hooks the caller registered)."""
    derivatives = []
    for batch in batches:
        x = inputs_of(batch)
        with torch.no_grad():
            classes = predict(model, x).argmax(1)
        for i in range(len(classes)):
            one = {k: v[i:i + 1] for k, v in x.items()}
            derivatives.append(torch.autograd.grad(predict(model, one)[0, classes[i]], gate)[0])
    return (torch.stack(derivatives) ** 2).mean(0)


def test_lowest_heads_are_global_and_capped_per_layer():
    model, _ = _prepared("vit")
    first, second = attention_heads(model)
    scored = [(first, torch.tensor([0.1, 0.2, 0.3, 0.4])), (second, torch.tensor([5.0, 6.0, 7.0, 8.0]))]
    assert lowest_heads(scored, 2, 0.9) == {first.name: [0, 1]}
    assert lowest_heads(scored, 4, 0.5) == {first.name: [0, 1], second.name: [0, 1]}  # at most half of each
    assert lowest_heads(scored, 8, 1.0) == {first.name: [0, 1, 2], second.name: [0, 1, 2]}  # one head stays
    assert [heads_to_remove(8, 8, 0.8), heads_to_remove(8, 7, 0.5), heads_to_remove(8, 4, 0.6)] == [1, 3, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_removes_whole_heads_and_a_saved_model_replays_them(family, tmp_path):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model, batches = build(), data()
    result = prune(model, batches, criterion="jbr", target=Target(macs=0.5), steps=2, progress=False)
    assert abs(result.macs_ratio - 0.5) <= 0.02
    heads = [u.heads for u in attention_heads(result.model)]
    assert sum(heads) < 8 and all(h >= 1 for h in heads)
    assert any(name.startswith("heads:") for name, _, _ in result.history)
    save(result.model, tmp_path / "pruned.pt")
    back = load(tmp_path / "pruned.pt")
    assert [u.heads for u in attention_heads(back)] == heads
    x = inputs_of(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(predict(back, x), predict(result.model, x), rtol=0, atol=0)
    kept = prune(model, batches, criterion="l1", target=Target(macs=0.8), steps=1, prune_heads=False, progress=False)
    assert [u.heads for u in attention_heads(kept.model)] == [4, 4]
