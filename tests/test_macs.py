"""MACs of the products of two activations (attention scores and weighted values), which no layer hook sees:
counted once, against closed forms, and never twice inside modules torch-pruning counts whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress.macs import activation_product_macs, count_macs_params, product_macs


class Products(nn.Module):
    """x @ W-free products: a (B, 3, 4) by its transpose, then bmm, then SDPA with 2 heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ x.transpose(1, 2)                        # B · 3 · 4 · 3
        t = torch.bmm(s, x)                              # B · 3 · 3 · 4
        q = t.view(x.shape[0], 2, 3, 2)
        return F.scaled_dot_product_attention(q, q, q)   # B · 2 · 3 · 3 · (2 + 2)


def test_products_against_closed_forms():
    x = torch.randn(5, 3, 4)
    assert activation_product_macs(Products(), x) == 5 * (3 * 4 * 3 + 3 * 3 * 4 + 2 * 3 * 3 * 4)
    assert product_macs("matmul", (torch.ones(7, 1, 2, 3), torch.ones(4, 3, 5)), {}) == 28 * 2 * 3 * 5


def test_multihead_attention_is_not_counted_twice():
    """torch-pruning's counter counts nn.MultiheadAttention whole (products included): nothing is added."""
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x, need_weights=False)[0]

    x = torch.randn(1, 6, 8)
    assert activation_product_macs(Wrapped(), x) == 0
    assert count_macs_params(Wrapped(), x)[0] == int(tp.utils.count_ops_and_params(Wrapped(), x)[0])


def test_transformer_macs_include_attention_products():
    """BERT (4 heads of 8 channels, 2 layers) at L tokens adds 2 layers · L² · 32 · 2 to torch-pruning's count."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    for length in (5, 10):
        x = {"input_ids": torch.ones(1, length, dtype=torch.long), "attention_mask": torch.ones(1, length, dtype=torch.long)}
        assert activation_product_macs(model, x) == 2 * length * length * 32 * 2
