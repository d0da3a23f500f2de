"""Whole attention heads of Hugging Face transformers as pruning units, outside torch-pruning's dependency graph.

torch-pruning maps channel indices through the head reshapes of an attention as if they were flattens, and its
graph search does not finish on Llama's rotary attention; a head is therefore pruned here, by construction: the
query rows of its heads, the key and value rows of its key/value head and the output projection's input columns
of its heads go together (grouped-query attention: a key/value head and its group of query heads). Recognised
layouts: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (ViT, Llama, ... in transformers 5), BERT's ``self.query``
/ ``key`` / ``value`` with ``output.dense``, and GPT-2's fused ``c_attn`` (split by ``split_size``) with
``c_proj`` (after :func:`compress.adapters.hf.linear_from_conv1d`). The attention forward passes of transformers 5
infer the head count from the widths (``view(..., -1, head_dim)``); the attributes that record it are synced.

A unit is scored by any criterion through :func:`scoring_group`: a torch-pruning group of the value rows and the
output columns of each key/value head, one root index per head (removing a head zeroes its context, which is
linear in the values; its query and key rows then no longer matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch_pruning as tp
from torch import Tensor, nn

HEAD_PREFIX = "heads:"  # pruning-history entries of head removals: ("heads:<attention module>", True, kv heads)


@dataclass
class AttentionHeads:
    """One attention module's head layout: its projections (``q``, ``k``, ``v`` the same Linear when fused, with
    row offsets), ``kv_heads`` key/value heads of ``group`` query heads each, ``head_dim`` channels per head."""

    name: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    kv_heads: int
    group: int
    head_dim: int
    fused: bool = False

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    def query_rows(self, kv: list[int]) -> list[int]:
        """Query channels (and output-projection columns) of the query heads of key/value heads ``kv``."""
        d, g = self.head_dim, self.group
        return [h * d + c for j in kv for h in range(j * g, (j + 1) * g) for c in range(d)]

    def kv_rows(self, kv: list[int]) -> list[int]:
        return [j * self.head_dim + c for j in kv for c in range(self.head_dim)]

    def offsets(self) -> tuple[int, int, int]:
        """Where the query, key and value rows start in their layers (a fused layer stacks them)."""
        if not self.fused:
            return 0, 0, 0
        width = self.heads * self.head_dim
        return 0, width, width + self.kv_heads * self.head_dim


def _unit(name: str, module: nn.Module, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, head_dim: int,
          fused: bool = False) -> AttentionHeads | None:
    if not all(isinstance(m, nn.Linear) for m in (q, k, v, o)) or head_dim < 1:
        return None
    q_width = q.out_features if not fused else q.out_features // 3  # GPT-2: q, k, v of equal widths
    kv_width = k.out_features if not fused else q_width
    if q_width % head_dim or kv_width % head_dim or (q_width // head_dim) % (kv_width // head_dim):
        return None
    kv_heads = kv_width // head_dim
    return AttentionHeads(name, module, q, k, v, o, kv_heads, q_width // head_dim // kv_heads, head_dim, fused)


def attention_heads(model: nn.Module) -> list[AttentionHeads]:
    """The attention modules of ``model`` in a recognised layout, with their current head counts."""
    units = []
    for name, m in model.named_modules():
        unit = None
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            unit = _unit(name, m, m.q_proj, m.k_proj, m.v_proj, m.o_proj, int(getattr(m, "head_dim", 0) or 0))
        elif hasattr(m, "self") and hasattr(m, "output") and all(hasattr(m.self, a) for a in ("query", "key", "value")):
            unit = _unit(name, m, m.self.query, m.self.key, m.self.value, getattr(m.output, "dense", None),
                         int(getattr(m.self, "attention_head_size", 0) or 0))
        elif hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "split_size") and not getattr(
                m, "is_cross_attention", False):
            unit = _unit(name, m, m.c_attn, m.c_attn, m.c_attn, m.c_proj, int(getattr(m, "head_dim", 0) or 0), fused=True)
        if unit is not None:
            units.append(unit)
    return units


def sync_heads(unit: AttentionHeads) -> None:
    """Sync the module's attributes that record widths and head counts: GPT-2's forward splits its fused
    projection by ``split_size``; the head counts are not read by transformers 5's forward passes, only kept true."""
    m, heads, kv = unit.module, unit.heads, unit.kv_heads
    if unit.fused:
        m.split_size, m.num_heads, m.embed_dim = heads * unit.head_dim, heads, heads * unit.head_dim
    inner = getattr(m, "self", m)
    for attribute, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv),
                             ("all_head_size", heads * unit.head_dim)):
        if isinstance(getattr(inner, attribute, None), int):
            setattr(inner, attribute, value)


def removable(indices: list[int], total: int, what: str) -> list[int]:
    """``indices`` sorted without repeats; ValueError unless each lies in range(total) and at least one stays."""
    out = sorted(set(int(i) for i in indices))
    if out and (len(out) >= total or out[0] < 0 or out[-1] >= total):
        raise ValueError(f"cannot remove {what} {out[:8]} of {total}")
    return out


def remove_heads(unit: AttentionHeads, kv: list[int]) -> None:
    """Prune key/value heads ``kv`` of ``unit`` (with their query heads) in place."""
    kv = removable(kv, unit.kv_heads, f"heads of {unit.name}: key/value heads")
    if not kv:
        return
    q_at, k_at, v_at = unit.offsets()
    query, keys = unit.query_rows(kv), unit.kv_rows(kv)
    if unit.fused:
        tp.prune_linear_out_channels(unit.q, [q_at + i for i in query] + [k_at + i for i in keys] + [v_at + i for i in keys])
    else:
        tp.prune_linear_out_channels(unit.q, query)
        tp.prune_linear_out_channels(unit.k, keys)
        tp.prune_linear_out_channels(unit.v, keys)
    tp.prune_linear_in_channels(unit.o, query)
    unit.kv_heads -= len(kv)
    sync_heads(unit)


def synthetic_group(graph: tp.DependencyGraph, members: list[tuple[nn.Module, Callable, list[int], list[int]]]
                    ) -> tp.dependency.Group:
    """A torch-pruning group built by hand (for units its graph cannot follow): one item per ``(layer, pruning
    function, channel indices, root index of each channel)``, bound to ``graph`` so criteria find the names."""
    group = tp.dependency.Group()
    for layer, handler, idxs, _ in members:
        node = graph.module2node.get(layer) or tp.dependency.Node(layer, None, graph._module2name.get(layer))
        group.add_dep(tp.dependency.Dependency(handler, handler, node, node), idxs)
    for i, (_, _, _, roots) in enumerate(members):
        group[i] = tp._helpers.GroupItem(group[i].dep, group[i].idxs)
        group[i].root_idxs = roots
    group._DG = graph
    return group


def scoring_group(unit: AttentionHeads, graph: tp.DependencyGraph) -> tp.dependency.Group:
    """A torch-pruning group scoring ``unit``'s key/value heads: the value rows (out channels of ``v``) and the
    output columns (in channels of ``o``) of each, root index = the key/value head. Criteria read the first
    ``kv_heads`` entries of its scores (a group's score vector is as long as its first item)."""
    v_at = unit.offsets()[2]
    heads = list(range(unit.kv_heads))
    return synthetic_group(graph, [
        (unit.v, tp.prune_linear_out_channels, [v_at + i for i in unit.kv_rows(heads)],
         [j for j in heads for _ in range(unit.head_dim)]),
        (unit.o, tp.prune_linear_in_channels, unit.query_rows(heads),
         [j for j in heads for _ in range(unit.group * unit.head_dim)])])


def head_scores(importance: Callable[[Any], Tensor | None], unit: AttentionHeads,
                graph: tp.DependencyGraph) -> Tensor | None:
    """``importance``'s score of each key/value head of ``unit`` (None when the criterion scores none)."""
    scores = importance(scoring_group(unit, graph))
    return None if scores is None else scores[:unit.kv_heads]


def heads_to_remove(dense_heads: int, current_heads: int, goal: float) -> int:
    """How many key/value heads a pruning step to the MACs (or params) fraction ``goal`` removes: the share
    1 − goal of the dense model's heads, less those already removed (attention projections cost ∝ heads)."""
    return max(0, int((1.0 - goal) * dense_heads + 1e-9) - (dense_heads - current_heads))


def lowest_heads(scored: list[tuple[AttentionHeads, Tensor]], count: int, max_ratio: float) -> dict[str, list[int]]:
    """The ``count`` lowest-scored key/value heads over every unit, none of which loses more than ``max_ratio``
    of its heads (at least one is kept): {unit name: key/value heads to remove}."""
    budget = count
    ranked = sorted((float(s), unit.name, j) for unit, scores in scored for j, s in enumerate(scores.tolist()))
    limit = {unit.name: unit.kv_heads - max(1, math.ceil((1.0 - max_ratio) * unit.kv_heads)) for unit, _ in scored}
    chosen: dict[str, list[int]] = {}
    for _, name, j in ranked:
        if budget == 0:
            break
        if len(chosen.get(name, [])) < limit[name]:
            chosen.setdefault(name, []).append(j)
            budget -= 1
    return {name: sorted(heads) for name, heads in chosen.items()}
