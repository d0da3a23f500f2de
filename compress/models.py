"""Model resolution: an architecture name, an ``nn.Module`` or a checkpoint, plus where its weights come from.

A :class:`ModelSpec` records everything needed to rebuild a model's *structure* without unpickling code: the
architecture and its keyword arguments, the input shape, and (once pruned) the torch-pruning history that is
replayed on a fresh copy. Weights travel separately as a state_dict.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CompressError
from .small_resnet import SmallResNet

SPEC_ATTR = "compress_spec"
LOCAL_ARCHS: dict[str, Callable[..., nn.Module]] = {"small_resnet": SmallResNet}
LOCAL_INPUT_SHAPES: dict[str, Callable[[dict], tuple[int, ...]]] = {
    "small_resnet": lambda kw: (int(kw.get("in_channels", 1)), 28, 28),
}
IMAGENET_INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model's structure: ``arch(**kwargs)`` then replay ``pruning_history``.

    ``input_shape`` is one sample's shape (C, H, W); ``weights`` says where the weights came from (provenance);
    ``quantization`` holds the per-layer quantization plan once one was applied.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = IMAGENET_INPUT_SHAPE
    weights: str = "random"
    pruning_history: tuple[tuple[str, bool, tuple[int, ...]], ...] = ()
    quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, dicts, strings and numbers: loadable with ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs.items()}
        d["pruning_history"] = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in self.pruning_history]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(arch=str(d["arch"]), kwargs=dict(d.get("kwargs") or {}),
                   input_shape=tuple(int(s) for s in d["input_shape"]), weights=str(d.get("weights", "random")),
                   pruning_history=tuple((str(n), bool(o), tuple(int(i) for i in idx))
                                         for n, o, idx in d.get("pruning_history") or ()),
                   quantization=d.get("quantization"))

    def example_input(self, batch: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape, device=device)


def torchvision_archs() -> list[str]:
    """Names of torchvision's image-classification builders."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_names() -> list[str]:
    return sorted(LOCAL_ARCHS) + torchvision_archs()


def _builder(arch: str) -> Callable[..., nn.Module]:
    if arch in LOCAL_ARCHS:
        return LOCAL_ARCHS[arch]
    if arch in torchvision_archs():
        import torchvision

        return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)
    close = difflib.get_close_matches(arch, arch_names(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see compress.models.arch_names()"
    raise CompressError(f"unknown model {arch!r}", f"use a torchvision name (resnet18, resnet50, mobilenet_v2, ...) or small_resnet; {hint}")


def default_input_shape(arch: str, kwargs: dict[str, Any]) -> tuple[int, ...]:
    return LOCAL_INPUT_SHAPES[arch](kwargs) if arch in LOCAL_INPUT_SHAPES else IMAGENET_INPUT_SHAPE


def make_spec(arch: str, kwargs: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
              weights: str = "random") -> ModelSpec:
    kwargs = dict(kwargs or {})
    _builder(arch)  # validates the name
    return ModelSpec(arch, kwargs, tuple(input_shape or default_input_shape(arch, kwargs)), weights)


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec recorded on ``model`` by this toolkit, if any."""
    return getattr(model, SPEC_ATTR, None)


def attach_spec(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Record ``spec`` on ``model`` (a plain attribute; survives in-place pruning)."""
    object.__setattr__(model, SPEC_ATTR, spec)
    return model


def sync_after_pruning(model: nn.Module) -> nn.Module:
    """Update the plain attributes a forward pass reads that pruning cannot see (torchvision ViT's hidden_dim)."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    return model


def pruning_round_to(model: nn.Module) -> int | None:
    """Channel multiple a model's structure requires (attention heads must keep equal widths)."""
    heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    return max(heads) if heads else None


def replay_pruning(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Re-apply ``spec.pruning_history`` to a freshly built, unpruned ``model`` (torch-pruning's replay)."""
    if not spec.pruning_history:
        return model
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=spec.example_input())
    try:
        graph.load_pruning_history([[n, o, list(i)] for n, o, i in spec.pruning_history])
    except (AttributeError, IndexError, KeyError, RuntimeError) as err:
        raise CompressError(f"pruning history does not fit architecture {spec.arch}: {err}",
                            "load the checkpoint with the toolkit version that wrote it") from err
    return sync_after_pruning(model)


def build(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """A model with ``spec``'s structure (pruning replayed, BN folded and layers quantized when the spec says so)
    and freshly initialised weights, on ``device`` (in the dtype it was quantized in, when quantized)."""
    try:
        model = _builder(spec.arch)(**spec.kwargs)
    except TypeError as err:
        raise CompressError(f"bad arguments for {spec.arch}: {err}", "check the model kwargs") from err
    replay_pruning(model, spec)
    model.to(device)
    if spec.quantization:
        from .quantize import apply_quantization

        model.to(getattr(torch, spec.quantization.get("dtype", "float32")))
        model = apply_quantization(model, spec.quantization)
    return attach_spec(model, spec)


def identify(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec | None:
    """Find the builder that produced an unrecorded ``model`` (same class, same parameter names and shapes).

    Candidates are built on the meta device, so this costs no memory or weight initialisation.
    """
    recorded = spec_of(model)
    if recorded is not None:
        return recorded
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates: list[tuple[str, dict[str, Any]]] = []
    if isinstance(model, SmallResNet):
        widths = tuple(stage[0].conv2.out_channels for stage in model.layers)
        blocks = tuple(len(stage) for stage in model.layers)
        candidates.append(("small_resnet", {"in_channels": model.conv1.in_channels, "num_classes": model.fc.out_features,
                                            "widths": widths, "blocks": blocks}))
    elif type(model).__module__.startswith("torchvision.models"):
        num_classes = _num_classes(model)
        for arch in torchvision_archs():
            candidates.append((arch, {"num_classes": num_classes} if num_classes else {}))
    for arch, kwargs in candidates:
        try:
            with torch.device("meta"):
                candidate = _builder(arch)(**kwargs)
        except Exception:  # a builder that rejects these kwargs is simply not a match
            continue
        if type(candidate) is type(model) and {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return make_spec(arch, kwargs, input_shape)
    return None


def _num_classes(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        return None
    return last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels


def torchvision_weights(arch: str, name: str):
    """The torchvision weights enum member ``name`` (e.g. ``IMAGENET1K_V2``, ``DEFAULT``) of ``arch``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise CompressError(f"{arch} has no torchvision weights", "pass --weights PATH, train or random") from err
    short = name.split(".")[-1]
    try:
        return enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError as err:
        options = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise CompressError(f"{arch} has no weights {name!r}", f"use one of {options}, a file path, train or random") from err


def _load_torchvision_weights(model: nn.Module, arch: str, name: str) -> None:
    weights = torchvision_weights(arch, name)
    try:
        state = weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise CompressError(f"cannot download {arch} weights {weights} ({type(err).__name__}: {err}); this machine may be offline",
                            "download the file elsewhere and pass --weights PATH") from err
    model.load_state_dict(state)


def resolve(model: str | os.PathLike | nn.Module, weights: str | os.PathLike | None = None, *,
            kwargs: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
            train_config: Any = None, progress: bool = True) -> nn.Module:
    """Return an ``nn.Module`` (with its :class:`ModelSpec` attached) from a name, module or checkpoint.

    ``model``: a torchvision name (``resnet50``), ``small_resnet``, an ``nn.Module`` or a checkpoint path
    written by :func:`compress.save`. ``weights``: ``None``/``"random"``, a torchvision enum name
    (``IMAGENET1K_V2``, ``DEFAULT``), a local file (our checkpoint or a bare state_dict), or ``"train"`` (train
    on the embedded Fashion-MNIST, cached).
    """
    from .checkpoint import load, read_state_dict

    if isinstance(model, nn.Module):
        spec = identify(model, input_shape)
        if spec is not None:
            attach_spec(model, spec)
        if weights not in (None, "random"):
            raise CompressError("weights were given for a model object", "load the weights into the module yourself, or pass the model by name")
        return model
    if isinstance(model, Path) or (isinstance(model, str) and (os.sep in model or model.endswith((".pt", ".pth")))):
        if weights not in (None, "random"):
            raise CompressError("weights were given for a checkpoint that holds its own", "drop --weights")
        return load(model)
    spec = make_spec(str(model), kwargs, input_shape)
    source = "random" if weights is None else str(weights)
    if source == "train":
        from .train import TrainConfig, reference_model

        return reference_model(spec, train_config or TrainConfig(), progress=progress)
    torch.manual_seed(0)
    net = build(spec)
    if source != "random":
        if Path(source).exists() or os.sep in source or source.endswith((".pt", ".pth", ".safetensors")):
            state = read_state_dict(source)
            try:
                net.load_state_dict(state)
            except RuntimeError as err:
                first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
                raise CompressError(f"weights file {source} does not fit {spec.arch}{tuple(spec.kwargs.items()) or ''}: {first}",
                                    "pass the matching --model / model kwargs, or the right weights file") from err
        else:
            _load_torchvision_weights(net, spec.arch, source)
    return attach_spec(net, replace(spec, weights=source))
