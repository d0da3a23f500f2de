"""Small helpers on ``nn.Module`` that every layer above the core shares (no knowledge of any model family).

* :func:`eval_mode`: a model in eval mode for a block, each submodule's own flag restored afterwards.
* :func:`weight_layers`: the Conv2d/Linear layers whose weights the toolkit prunes, plans and quantizes.
* :func:`output_shapes`: the output shape of each of some layers in one forward (absent: the layer never ran);
  :func:`per_sample_outputs`: whether each has one row per sample.
* :func:`model_device`, :func:`on_model` (a batch on the model's device and dtype), :func:`fingerprint` (structure as caches see it), :func:`set_module` (replace by name).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .batches import call, concat_rows, first_rows, map_tensors

WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Conv2d and Linear modules of ``model``, keyed by module name (e.g. ``layers.0.0.conv1``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES)}


@torch.no_grad()
def output_shapes(model: nn.Module, inputs: Any, layers: Mapping[str, nn.Module]) -> dict[str, torch.Size]:
    """The output shape of each of ``layers`` (by name) in one forward of ``inputs`` under no_grad, from its first
    call; a layer the forward never calls is absent."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            shapes.setdefault(name, output.shape)

    hooks = [m.register_forward_hook(lambda _m, _a, out, name=name: record(name, out)) for name, m in layers.items()]
    try:
        call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def per_sample_outputs(model: nn.Module, example: Any, layers: Mapping[str, nn.Module]) -> dict[str, bool]:
    """For each of ``layers`` the forward calls, whether its output has one row per sample (found on a batch of two
    copies of ``example``'s first sample). Layers computing from buffers only (Swin V2's position-bias MLP on its
    coordinate table) have none; layers never called are absent."""
    shapes = output_shapes(model, concat_rows([first_rows(example, 1)] * 2), layers)
    return {name: len(shape) > 0 and shape[0] == 2 for name, shape in shapes.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def channel_sums(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ of a layer's input or output ``x`` per channel over every other dimension (float64, on the CPU) and how
    many values each sum holds; channels are the last dimension for ``nn.Linear``, dimension 1 otherwise."""
    channel = x.dim() - 1 if isinstance(module, nn.Linear) else 1
    per_channel = x.detach().double().transpose(0, channel).reshape(x.shape[channel], -1)
    return per_channel.sum(1).cpu(), per_channel.shape[1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def on_model(x: Any, model: nn.Module) -> Any:
    """``x`` (a tensor or a mapping of named tensors) on the model's device, floating tensors in its floating dtype
    (a float64 or bf16 model takes float32 data; token ids and masks keep their integer dtype)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None:
        device = model_device(model)
        return map_tensors(x, lambda t: t.to(device))
    return map_tensors(x, lambda t: t.to(first.device, first.dtype if t.is_floating_point() else t.dtype))


def fingerprint(model: nn.Module) -> tuple:
    """The model's structure as caches see it: parameter names and shapes."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def tied_weights(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """For each of ``layers`` whose weight another module of ``model`` also holds (a language model's output head
    tied to its input embedding), the name of that other module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    return {name: next(o for o in owners[id(m.weight)] if o != name) for name, m in layers.items()
            if len(owners.get(id(m.weight), [])) > 1}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
