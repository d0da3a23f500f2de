"""Hugging Face ``save_pretrained`` folders, pruned ones included: :func:`save_pretrained` writes one,
:func:`from_pretrained_folder` loads one (safetensors only, no download).

A pruned transformer's layers may differ in width from layer to layer (heads, MLP channels), which no Hugging Face
config can say. The folder therefore updates the config's counts where every layer agrees (``intermediate_size``;
the head counts where the config fixes ``head_dim``, so that a changed count does not change the head size) and
records the shape of every other changed parameter under ``compress_shapes``; the loader lets transformers' own
``from_pretrained`` (its key mapping, tied weights) load the weights into a model whose constructor resized those
parameters, then syncs the attention head counts. A uniformly pruned Llama therefore reloads in plain
transformers too.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CompressError
from .heads import attention_heads, sync_heads
from .hf import HuggingFaceAdapter, conv1d_layers, import_transformers, linear_from_conv1d
from .spec import attach_spec

SHAPES_KEY = "compress_shapes"  # config key: {parameter: shape} where a pruned layer differs from the config
MLP_INPUT_LAYERS = ("mlp.fc1", "intermediate.dense", "mlp.gate_proj", "mlp.c_fc")  # first MLP layer of each family
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner")


def _model_class(config: Any, folder: Path) -> type:
    transformers = import_transformers()
    names = list(getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise CompressError(f"{folder}/config.json names no model class of transformers {transformers.__version__} "
                            f"(architectures: {names})", "save the model with save_pretrained")
    return model_class


def _fit_attributes(module: nn.Module) -> None:
    """Update the plain attributes that record a layer's widths after its weight changed shape."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        module.nx, module.nf = module.weight.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape


def resize_parameters(model: nn.Module, shapes: dict[str, Any]) -> None:
    """Give the parameters named in ``shapes`` (state-dict key -> shape) those shapes, empty, in place (the
    weights are loaded afterwards), and update their layers' width attributes."""
    for key, shape in shapes.items():
        owner, _, attribute = key.rpartition(".")
        module = model.get_submodule(owner)
        current = getattr(module, attribute, None)
        if not isinstance(current, nn.Parameter):
            raise CompressError(f"config.json's {SHAPES_KEY} names {key}, which is no parameter of "
                                f"{type(model).__name__}", "pass a folder written by compress's save_pretrained")
        empty = torch.empty(tuple(shape), dtype=current.dtype, device=current.device)
        setattr(module, attribute, nn.Parameter(empty, requires_grad=current.requires_grad))
        _fit_attributes(module)


def _resizing(model_class: type, shapes: dict[str, Any]) -> type:
    """``model_class`` whose constructor resizes the parameters ``shapes`` names, so that transformers' own
    ``from_pretrained`` (its key mapping, tied weights, dtype handling) loads a pruned model's weights."""
    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **kwargs)
        resize_parameters(self, shapes)

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})


def from_pretrained_folder(folder: str | os.PathLike) -> nn.Module:
    """The model a local folder written by ``save_pretrained`` (or :func:`save_pretrained`) holds: the class its
    config names, weights from ``.safetensors`` files only (never a pickled ``.bin``), no download; a pruned
    model's layers resized to the widths its config records (``compress_shapes``, GPT-2's then as ``nn.Linear``
    with head counts synced); in eval mode, its spec attached."""
    transformers = import_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder} has no config.json", "pass a folder written by save_pretrained")
    if not any(folder.glob("*.safetensors")):
        raise CompressError(f"{folder} holds no .safetensors weights (pickled .bin files are not loaded)",
                            "save the model with save_pretrained(folder) (safetensors by default)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = _model_class(config, folder)
    shapes = getattr(config, SHAPES_KEY, None)
    loader = _resizing(model_class, shapes) if shapes else model_class
    model = loader.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    if shapes:
        model.__class__ = model_class  # the subclass only resized the layers
        linear_from_conv1d(model)
        for unit in attention_heads(model):
            sync_heads(unit)
    model.eval()
    return attach_spec(model, replace(HuggingFaceAdapter().identify(model), weights=str(folder)))


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def updated_config(model: nn.Module) -> Any:
    """A copy of ``model``'s config with the counts every layer agrees on: the MLP width, and the head counts
    where the config fixes ``head_dim`` (elsewhere the head size is derived from the count, so it stays)."""
    config = copy.deepcopy(model.config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(MLP_INPUT_LAYERS)}
    width = _uniform([m.out_features for m in layers.values()])
    key = next((k for k in INTERMEDIATE_KEYS if isinstance(getattr(config, k, None), int)), None)
    if width is not None and key is not None:
        setattr(config, key, width)
    units = attention_heads(model)
    heads, kv_heads = _uniform([u.heads for u in units]), _uniform([u.kv_heads for u in units])
    if isinstance(getattr(config, "head_dim", None), int) and heads is not None and kv_heads is not None:
        config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv_heads
    return config


def _as_conv1d(model: nn.Module, names: list[str]) -> None:
    """Turn the Linear layers ``names`` back into transformers' ``Conv1D`` (weight (in, out)), in place."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            conv.bias.copy_(linear.bias)
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attribute, conv)


def save_pretrained(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a float transformers model (pruned or not) as a ``save_pretrained`` folder (config.json and
    safetensors) that :func:`from_pretrained_folder` (``compress.resolve(folder)``) reloads; written beside the
    target and moved into place, so an interrupted run leaves no half-written folder.

    The config gets the counts every layer agrees on (:func:`updated_config`) and, under ``compress_shapes``, the
    shape of every parameter that still differs from it; GPT-2's layers are written in its ``Conv1D`` layout."""
    target = Path(folder)
    if target.exists() and not overwrite:
        raise CompressError(f"{target} already exists", "choose another folder or pass overwrite=True")
    if any(type(p) is not nn.Parameter for p in model.parameters()):
        raise CompressError("save_pretrained takes a float model; this one holds quantized (torchao) weights",
                            "save the float model before quantize(), or the quantized one with compress.save")
    model_class = type(model)
    out = copy.deepcopy(model).float().cpu()
    out.config = updated_config(model)
    with torch.device("meta"):
        fresh = model_class(out.config)
    _as_conv1d(out, [n for n in conv1d_layers(fresh) if isinstance(out.get_submodule(n), nn.Linear)])
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in out.state_dict().items() if expected.get(k) != tuple(v.shape)}
    if shapes:
        out.config.update({SHAPES_KEY: shapes})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
