"""Pickle-free checkpoints: ``compress.save(obj, path)`` and ``compress.load(path)``.

A checkpoint is a ``torch.save`` archive holding only tensors and plain containers:
``{"format", "version", "spec": ModelSpec.to_dict(), "state_dict", "metadata"}``. Loading uses
``torch.load(weights_only=True)`` (no code runs), rebuilds the structure from the spec (architecture, then the
pruning history replayed by torch-pruning) and loads the state_dict strictly. Writes are atomic and never
replace an existing file unless asked to.

A model of the user's own class (one no builder recognises) is recorded as ``arch="user:<module>.<qualname>"``:
its code is not in the file, so ``load(path, model=MyNet())`` replays the history onto a fresh instance.
"""

from __future__ import annotations

from collections import OrderedDict

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for, identify
from .adapters.spec import ModelSpec, attach_spec, user_spec
from .atomic import atomic_path
from .backends import reload_device
from .errors import CompressError
from .quiet import load_torchao
from .rebuild import build

FORMAT = "compress-checkpoint"
VERSION = 1


def _module_of(obj: Any) -> nn.Module:
    model = obj if isinstance(obj, nn.Module) else getattr(obj, "model", None)
    if not isinstance(model, nn.Module):
        raise CompressError(f"cannot save an object of type {type(obj).__name__}", "pass an nn.Module or a result with .model")
    return model


def save(obj: Any, path: str | os.PathLike, *, overwrite: bool = False, metadata: dict[str, Any] | None = None,
         input_shape: tuple[int, ...] | None = None) -> Path:
    """Save a model (plain, pruned or quantized) or a result holding ``.model``, without pickling code.

    A module of your own class that compress never pruned or quantized is saved when ``input_shape`` (one
    sample's shape) is given; load it back with ``load(path, model=MyNet())``."""
    module = _module_of(obj)
    model = adapter_for(module).prepared(module)  # the form load() rebuilds (GPT-2: Linear)
    spec = identify(model)
    if spec is None and input_shape is not None:
        spec = user_spec(model, tuple(input_shape), adapter_for(model).name)
    if spec is None:
        name = type(model).__name__
        raise CompressError(f"cannot tell which architecture this {name} is, so it could not be rebuilt on load",
                            f"save it with input_shape=(C, H, W) and load it with compress.load(path, model={name}(...)), "
                            "or create it with compress.models.resolve(name) before compressing")
    state = model.state_dict()
    record = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(),
              "state_dict": {k: v.detach().cpu() for k, v in state.items()},
              # per-module state_dict versions (torchvision's MNASNet refuses to load without them)
              "state_versions": {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()},
              "metadata": dict(metadata or {})}
    with atomic_path(path, overwrite) as tmp:
        torch.save(record, tmp)
    return Path(path)


def _torch_load(path: str | os.PathLike) -> Any:
    file = Path(path)
    if not file.is_file():
        raise CompressError(f"checkpoint {file} does not exist", "check the path")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise CompressError("reading .safetensors needs the safetensors package", "pip install safetensors") from err
        try:
            return load_file(str(file))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CompressError(f"cannot read {file}: {err}", "check that the file is complete") from err
    try:
        load_torchao()  # registers torchao's tensor subclasses as safe weights_only globals
    except ImportError:
        pass
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CompressError(f"refusing to load {file}: it contains pickled code or objects, not just tensors",
                            "re-save it as a plain state_dict (torch.save(model.state_dict(), path)) or safetensors from a trusted session") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CompressError(f"cannot read {file}: corrupt or not a PyTorch checkpoint ({str(err).splitlines()[0][:120]})",
                            "re-create or re-download the file") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a weights file: our checkpoint's state_dict, a bare state_dict, or ``{"state_dict"|"model": ...}``."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj["spec"].get("pruning_history"):
            raise CompressError(f"{path} holds a pruned model, not weights for an unpruned one", "load it with compress.load / as --model")
        obj = obj["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressError(f"{path} is not a state_dict of tensors", "save weights with torch.save(model.state_dict(), path)")
    return obj


def _load_device(spec: ModelSpec, device: str | torch.device | None, path: str | os.PathLike) -> torch.device:
    """Where to rebuild: ``device``, else where the backend that quantized the model runs (CUDA for a model
    quantized on CUDA), else the CPU; the backend refuses a device its configs do not run on."""
    return reload_device(spec.quantization, device, str(path))


def _mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """The first difference between ``model``'s state_dict and ``state`` (names, then shapes), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        return ", ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                           f"unexpected {unexpected[:3]}" if unexpected else "") if part)
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            return f"{key} is {tuple(own[key].shape)} in model=, {tuple(value.shape)} in the checkpoint"
    return None


def load(path: str | os.PathLike, device: str | torch.device | None = None, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` on ``device`` (default: CUDA for a model quantized on CUDA, else the
    CPU): structure from the spec, then the weights (strict).

    ``model``: a freshly built, unpruned instance to rebuild onto (the pruning history is replayed onto it in
    place, then the quantization): required for a model of your own class (``compress.load(path, model=MyNet())``),
    optional for a known architecture, whose builder it replaces."""
    record = _torch_load(path)
    if not (isinstance(record, dict) and record.get("format") == FORMAT):
        raise CompressError(f"{path} is not a compress checkpoint (maybe bare weights)",
                            "pass it as weights of a named model: --model ARCH --weights PATH")
    if record.get("version", 0) > VERSION:
        raise CompressError(f"{path} was written by a newer toolkit (format {record['version']})", "upgrade compress")
    try:
        spec = ModelSpec.from_dict(record["spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise CompressError(f"{path} has a damaged model spec ({err})", "re-create the checkpoint") from err
    if spec.is_user and model is None:
        name = spec.user_class.rsplit(".", 1)[-1]
        raise CompressError(f"checkpoint {path} holds a user model ({spec.user_class}) that cannot be rebuilt from its name",
                            f"pass model=<YourClass>(...) freshly built, e.g. compress.load(path, model={name}())")
    if model is not None and not isinstance(model, nn.Module):
        raise CompressError(f"model= must be an nn.Module, got {type(model).__name__}",
                            "pass a freshly built instance, e.g. model=MyNet()")
    target = _load_device(spec, device, path)
    given = model is not None
    model = build(spec, target, model=model)
    state = record["state_dict"]
    mismatch = _mismatch(model, state) if given else None
    if mismatch is not None:
        raise CompressError(f"model= ({type(model).__name__}) does not match checkpoint {path}: {mismatch}",
                            "pass a freshly built, unpruned instance with the constructor arguments it was saved with")
    weights = OrderedDict((k, v.to(target)) for k, v in state.items())
    weights._metadata = OrderedDict(record.get("state_versions", {}))  # type: ignore[attr-defined]
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise CompressError(f"{path}: weights do not fit the recorded structure ({str(err).splitlines()[0]})",
                            "re-create the checkpoint") from err
    model.eval()
    return attach_spec(model, spec)


def metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dictionary stored in a checkpoint."""
    record = _torch_load(path)
    return dict(record.get("metadata", {})) if isinstance(record, dict) else {}
