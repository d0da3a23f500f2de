"""The hidden size of a transformer (its residual stream) as a pruning unit, outside torch-pruning's graph.

Removing hidden channel c removes it from every tensor of the residual stream: the output channel c of every
layer that writes into it (attention and MLP output projections, the patch embedding), column c of the embedding
tables and of parameters added to it (ViT's class token and position embeddings), the entry c of every norm over
it, and the input column c of every layer that reads it (query/key/value, the first MLP layers, the pooler, the
classifier or LM head; a head tied to the input embedding stays tied). The norms then normalise over one channel
fewer, so (unlike a head or an MLP channel) a removal is not exactly the zeroing of a channel.

The members are found from one forward pass, not from names: the norms are the LayerNorm / RMSNorm modules over
the hidden size; a reader is a Linear whose input is a norm's output or a view of one (a slice: the classifier
reads the class token); a writer is any other Linear or Conv2d with the hidden size as output width.

Scoring (:func:`scoring_group`): one torch-pruning group whose items are the writers' output channels, the
embedding columns and the readers' input channels, one root index per hidden channel: magnitude criteria see
every weight of the channel, JBR the coupled gates on its writes (∂f/∂γ_c, γ_c scaling channel c of every write
into the stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..batches import call
from ..errors import CompressError
from .heads import removable, synthetic_group

HIDDEN_PREFIX = "hidden:"  # pruning-history entry of a hidden-size removal: ("hidden:", True, channels)


def _is_norm(module: nn.Module, width: int) -> bool:
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape) == (width,)
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (width,))


@dataclass
class ResidualStream:
    """Where a model's ``width`` hidden channels are written, normalised, added and read (see the module doc)."""

    width: int
    writers: dict[str, nn.Module] = field(default_factory=dict)  # Linear / Conv2d: output channels
    readers: dict[str, nn.Module] = field(default_factory=dict)  # Linear: input channels
    norms: dict[str, nn.Module] = field(default_factory=dict)
    embeddings: dict[str, nn.Embedding] = field(default_factory=dict)
    tensors: list[tuple[nn.Module, str]] = field(default_factory=list)  # parameters with the width as last dim


def hidden_width(model: nn.Module) -> int | None:
    """The hidden size a transformers model's config states (``hidden_size``, GPT-2's ``n_embd``)."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(width) if isinstance(width, int) else None


def residual_stream(model: nn.Module, example_inputs: Any, width: int) -> ResidualStream:
    """The members of ``model``'s residual stream of ``width`` channels, found on one forward pass of
    ``example_inputs`` (a batch the model takes through :func:`compress.batches.call`)."""
    stream = ResidualStream(width)
    norm_outputs: dict[int, Tensor] = {}  # id -> output, kept alive during the pass so that ids stay unique
    reads_norm: dict[str, bool] = {}  # Linear name -> whether its input is a norm's output or a view of one
    hooks = []

    def is_norm_output(t: Tensor) -> bool:
        return id(t) in norm_outputs or (t._base is not None and id(t._base) in norm_outputs)

    for name, m in model.named_modules():
        if _is_norm(m, width):
            stream.norms[name] = m
            hooks.append(m.register_forward_hook(lambda _m, _i, out: norm_outputs.__setitem__(id(out), out)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, args, name=name: reads_norm.__setitem__(name, is_norm_output(args[0]))))
    try:
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.in_features == width and reads_norm.get(name):
            stream.readers[name] = m
        elif isinstance(m, nn.Linear) and m.out_features == width and name in reads_norm:
            stream.writers[name] = m
        elif isinstance(m, nn.Conv2d) and m.out_channels == width:
            stream.writers[name] = m
        elif isinstance(m, nn.Embedding) and m.embedding_dim == width:
            stream.embeddings[name] = m
        elif not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and name not in stream.norms:
            stream.tensors += [(m, p) for p, v in m.named_parameters(recurse=False) if v.dim() >= 1 and v.shape[-1] == width]
    return stream


def check_stream(stream: ResidualStream, model: nn.Module) -> None:
    """A one-line error unless the stream has norms over it and layers that write and read it (a model laid out
    otherwise would be pruned inconsistently)."""
    if not (stream.norms and stream.writers and stream.readers):
        raise CompressError(f"cannot find the residual stream of {type(model).__name__} (norms over its hidden size "
                            f"{stream.width}: {len(stream.norms)}, layers writing it: {len(stream.writers)}, reading "
                            f"it: {len(stream.readers)})", "leave prune_hidden at 0 for this model")


def _slice_last(module: nn.Module, attribute: str, keep: Tensor) -> None:
    old = getattr(module, attribute)
    setattr(module, attribute, nn.Parameter(old.data.index_select(-1, keep.to(old.device)).clone(),
                                            requires_grad=old.requires_grad))


def remove_hidden(stream: ResidualStream, channels: list[int]) -> None:
    """Prune hidden ``channels`` from every member of ``stream``, in place (tied heads re-tied)."""
    channels = removable(channels, stream.width, "hidden channels")
    if not channels:
        return
    tied = {name: emb for name, reader in stream.readers.items() for emb in stream.embeddings.values()
            if reader.weight is emb.weight}
    removed = set(channels)
    keep = torch.tensor([c for c in range(stream.width) if c not in removed])
    for m in stream.writers.values():
        (tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels)(m, channels)
    for name, m in stream.readers.items():
        if name not in tied:
            tp.prune_linear_in_channels(m, channels)
    for m in stream.embeddings.values():
        tp.prune_embedding_out_channels(m, channels)
    for name, emb in tied.items():
        reader = stream.readers[name]
        reader.weight, reader.in_features = emb.weight, emb.embedding_dim
    for m in stream.norms.values():
        if isinstance(m, nn.LayerNorm):
            tp.prune_layernorm_out_channels(m, channels)
        else:
            _slice_last(m, "weight", keep)
    for module, attribute in stream.tensors:
        _slice_last(module, attribute, keep)
    stream.width -= len(channels)


def scoring_group(stream: ResidualStream, graph: tp.DependencyGraph) -> tp.dependency.Group:
    """A torch-pruning group scoring ``stream``'s hidden channels (root index = channel): the writers' output
    channels, the embedding columns and the readers' input channels."""
    channels = list(range(stream.width))
    members: list[tuple[nn.Module, Callable]] = [
        *((m, tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels)
          for m in stream.writers.values()),
        *((m, tp.prune_embedding_out_channels) for m in stream.embeddings.values()),
        *((m, tp.prune_linear_in_channels) for m in stream.readers.values())]
    return synthetic_group(graph, [(layer, handler, channels, channels) for layer, handler in members])


def lowest_channels(scores: Tensor, count: int) -> list[int]:
    """The ``count`` lowest-scored hidden channels."""
    return sorted(torch.argsort(scores.double(), stable=True)[:count].tolist())


def hidden_to_remove(dense: int, current: int, share: float, round_to: int | None = None) -> int:
    """How many hidden channels a step removes so that the share ``share`` of the ``dense`` hidden size is gone
    (rounded down to a multiple of ``round_to``), less those already removed."""
    goal = int(share * dense + 1e-9)
    if round_to:
        goal -= goal % round_to
    return max(0, min(goal, dense - 1) - (dense - current))
