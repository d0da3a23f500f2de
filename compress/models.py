"""Model resolution: an architecture name, an ``nn.Module`` or a checkpoint, plus where its weights come from.

The structure of a model is known through its adapter (:mod:`compress.adapters`): a :class:`ModelSpec` rebuilds
it without unpickling code (architecture, input shape, pruning history replayed, quantization re-applied through
:mod:`compress.backends`). Weights travel separately as a state_dict.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for, identify
from .adapters.hf import PRESETS as HF_PRESETS, preset_spec
from .adapters.hf_folders import from_pretrained_folder
from .adapters.image import (LOCAL_ARCHS, LOCAL_INPUT_SHAPES, PRESETS as IMAGE_PRESETS, arch_names,
                             default_input_shape, make_spec, preset_spec as image_preset_spec, torchvision_archs,
                             torchvision_weights)
from .adapters.spec import IMAGENET_INPUT_SHAPE, SPEC_ATTR, ModelSpec, attach_spec, spec_of
from .checkpoint import load, read_state_dict
from .errors import CompressError
from .rebuild import build
from .train import TrainConfig, reference_model

__all__ = ["HF_PRESETS", "IMAGE_PRESETS", "IMAGENET_INPUT_SHAPE", "LOCAL_ARCHS", "LOCAL_INPUT_SHAPES", "SPEC_ATTR", "ModelSpec", "arch_names",
           "attach_spec", "build", "default_input_shape", "identify", "make_spec", "pruning_round_to", "resolve",
           "spec_of", "sync_after_pruning", "torchvision_archs", "torchvision_weights"]


# Training epochs of the presets' cached Fashion-MNIST models (BENCHMARKS.md); other models: TrainConfig's default.
PRESET_TRAIN_EPOCHS = {"resnet20_fmnist": 6, "resnet18_fmnist": 5, "resnet56_fmnist": 4, "wide_resnet_fmnist": 3,
                       "vit_fmnist": 12}


def default_train_config(name: str) -> TrainConfig:
    """How ``resolve(name, weights="train")`` trains: a preset for its ``PRESET_TRAIN_EPOCHS``, else TrainConfig()."""
    return TrainConfig(epochs=PRESET_TRAIN_EPOCHS.get(name, TrainConfig().epochs))


def sync_after_pruning(model: nn.Module) -> nn.Module:
    """Update the plain attributes a forward pass reads that pruning cannot see (torchvision ViT's hidden_dim)."""
    return adapter_for(model).sync_after_pruning(model)


def pruning_round_to(model: nn.Module) -> int | None:
    """Channel multiple a model's structure requires (attention heads must keep equal widths)."""
    return adapter_for(model).round_to(model)


def _load_torchvision_weights(model: nn.Module, arch: str, name: str) -> None:
    weights = torchvision_weights(arch, name)
    try:
        state = weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise CompressError(f"cannot download {arch} weights {weights} ({type(err).__name__}: {err}); this machine may be offline",
                            "download the file elsewhere and pass --weights PATH") from err
    model.load_state_dict(state)


def _load_weights_file(net: nn.Module, spec: ModelSpec, source: str) -> None:
    state = read_state_dict(source)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CompressError(f"weights file {source} does not fit {spec.arch}{tuple(spec.kwargs.items()) or ''}: {first}",
                            "pass the matching --model / model kwargs, or the right weights file") from err


def _is_path(text: str) -> bool:
    return Path(text).exists() or os.sep in text or text.endswith((".pt", ".pth", ".safetensors"))


def resolve(model: str | os.PathLike | nn.Module, weights: str | os.PathLike | None = None, *,
            kwargs: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
            train_config: Any = None, progress: bool = True) -> nn.Module:
    """Return an ``nn.Module`` (with its :class:`ModelSpec` attached) from a name, module or checkpoint.

    ``model``: a torchvision name (``resnet50``), ``small_resnet``, a preset (``HF_PRESETS``, ``IMAGE_PRESETS``:
    the Fashion-MNIST models of the pruning benchmark), an ``nn.Module``, a checkpoint path
    written by :func:`compress.save`, or a Hugging Face folder written by ``save_pretrained`` (safetensors). ``weights``: ``None``/``"random"``, a torchvision enum name
    (``IMAGENET1K_V2``, ``DEFAULT``), a local file (our checkpoint or a bare state_dict), or ``"train"`` (train
    on the embedded Fashion-MNIST, cached; a preset for its ``PRESET_TRAIN_EPOCHS`` unless ``train_config`` says).
    """
    if isinstance(model, nn.Module):
        spec = identify(model, input_shape)
        if spec is not None:
            attach_spec(model, spec)
        if weights not in (None, "random"):
            raise CompressError("weights were given for a model object", "load the weights into the module yourself, or pass the model by name")
        return model
    if isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():  # a save_pretrained folder
        if weights not in (None, "random"):
            raise CompressError("weights were given for a Hugging Face folder that holds its own", "drop --weights")
        return from_pretrained_folder(model)
    if isinstance(model, Path) or (isinstance(model, str) and (os.sep in model or model.endswith((".pt", ".pth")))):
        if weights not in (None, "random"):
            raise CompressError("weights were given for a checkpoint that holds its own", "drop --weights")
        return load(model)
    if str(model) in HF_PRESETS:
        spec = preset_spec(str(model))
    elif str(model) in IMAGE_PRESETS:
        spec = image_preset_spec(str(model))
    else:
        spec = make_spec(str(model), kwargs, input_shape)
    source = "random" if weights is None else str(weights)
    if source == "train":
        return reference_model(spec, train_config or default_train_config(str(model)), progress=progress)
    torch.manual_seed(0)
    net = build(spec)
    if source != "random":
        if _is_path(source):
            _load_weights_file(net, spec, source)
        else:
            _load_torchvision_weights(net, spec.arch, source)
    return attach_spec(net, replace(spec, weights=source))
