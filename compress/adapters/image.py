"""The image-classifier adapter: one (N, C, H, W) tensor in, logits (N, classes) out.

It covers torchvision's classification builders, the toolkit's ``small_resnet`` and any user ``nn.Module`` of that
shape (timm models included): the classifier (last Linear, else last Conv2d) is never pruned, attention heads of
``nn.MultiheadAttention`` fix the channel multiple (with any other attention only local groups such as MLP hidden
channels are pruned, see ``mlp_scope``), and torchvision/``small_resnet`` models are identified by building
candidates on the meta device and comparing parameter shapes, so they rebuild on load.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from typing import Any, Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from ..batches import predict
from ..errors import CompressError
from ..nn_helpers import model_device, on_model
from ..small_resnet import SmallResNet
from .base import InputSpec, ModelAdapter
from .fixed_views import has_fixed_channel_views, layers_into_fixed_views
from .mixed_conv import split_convs, sync_split_sizes
from .mlp_scope import layers_outside_mlps, unprunable_attention, views_as_channelwise
from .shuffle import opaque_shuffle, shuffle_outputs
from .swin import opaque_patch_merging
from .spec import IMAGENET_INPUT_SHAPE, ModelSpec, spec_of

WARNS_WITHOUT_INIT_WEIGHTS = ("googlenet", "inception_v3")  # torchvision builders that warn unless it is given
LOCAL_ARCHS: dict[str, Callable[..., nn.Module]] = {"small_resnet": SmallResNet}
LOCAL_INPUT_SHAPES: dict[str, Callable[[dict], tuple[int, ...]]] = {
    "small_resnet": lambda kw: (int(kw.get("in_channels", 1)), 28, 28),
}

# Representative Fashion-MNIST models of the pruning benchmark: name -> (architecture, its kwargs, input shape).
# The CIFAR ResNet-20 / ResNet-56 layouts (16/32/64 channels, 3 or 9 BasicBlocks per stage, 1x1-conv shortcuts),
# a wide control (64/128/256, one block per stage) and torchvision's ResNet-18 on 3x32x32 upsampled images.
PRESETS: dict[str, tuple[str, dict[str, Any], tuple[int, ...] | None]] = {
    "resnet20_fmnist": ("small_resnet", {"blocks": [3, 3, 3]}, None),
    "resnet56_fmnist": ("small_resnet", {"blocks": [9, 9, 9]}, None),
    "wide_resnet_fmnist": ("small_resnet", {"widths": [64, 128, 256]}, None),
    "resnet18_fmnist": ("resnet18", {"num_classes": 10}, (3, 32, 32)),
}


def torchvision_archs() -> list[str]:
    """Names of torchvision's image-classification builders."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_names() -> list[str]:
    return sorted(LOCAL_ARCHS) + torchvision_archs()


def builder(arch: str) -> Callable[..., nn.Module]:
    """The constructor of ``arch`` (random weights); a one-line error with suggestions for an unknown name."""
    if arch in LOCAL_ARCHS:
        return LOCAL_ARCHS[arch]
    if arch in torchvision_archs():
        import torchvision

        def build(**kw: Any) -> nn.Module:
            if arch in WARNS_WITHOUT_INIT_WEIGHTS:  # their default init is init_weights=True, with a FutureWarning
                kw = {"init_weights": True, **kw}
            return torchvision.models.get_model(arch, weights=None, **kw)

        return build
    close = difflib.get_close_matches(arch, arch_names(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see compress.models.arch_names()"
    raise CompressError(f"unknown model {arch!r}", f"use a torchvision name (resnet18, resnet50, mobilenet_v2, ...) or small_resnet; {hint}")


def default_input_shape(arch: str, kwargs: dict[str, Any]) -> tuple[int, ...]:
    return LOCAL_INPUT_SHAPES[arch](kwargs) if arch in LOCAL_INPUT_SHAPES else IMAGENET_INPUT_SHAPE


def preset_spec(name: str) -> ModelSpec:
    """The spec of image preset ``name`` (random weights)."""
    arch, kwargs, input_shape = PRESETS[name]
    return make_spec(arch, kwargs, input_shape)


def make_spec(arch: str, kwargs: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
              weights: str = "random") -> ModelSpec:
    kwargs = dict(kwargs or {})
    builder(arch)  # validates the name
    return ModelSpec(arch, kwargs, tuple(input_shape or default_input_shape(arch, kwargs)), weights)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The layer producing the logits (the last Linear, else the last Conv2d): its outputs are never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise CompressError(f"{type(model).__name__} has no Linear or Conv2d layer to prune", "pass a CNN or transformer")
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return linears[-1] if linears else layers[-1]


def num_classes(model: nn.Module) -> int | None:
    """Outputs of the last Linear/Conv2d layer."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        return None
    return last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels


def torchvision_weights(arch: str, name: str) -> Any:
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


def _built(arch: str, kwargs: dict[str, Any], device: str) -> nn.Module | None:
    """``arch`` built on ``device`` (its construction warnings silenced), or None when it cannot be."""
    try:
        with warnings.catch_warnings(), torch.device(device):
            warnings.simplefilter("ignore")  # e.g. googlenet's init_weights FutureWarning: a throwaway build
            return builder(arch)(**kwargs)
    except Exception:  # a builder that rejects these kwargs or this device is simply not a match
        return None


def _same_structure(candidate: nn.Module, model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> bool:
    return type(candidate) is type(model) and {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes


def _listed_params(arch: str) -> int:
    """The parameter count torchvision lists for ``arch``'s default weights (0 when it lists none)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(arch).DEFAULT.meta.get("num_params", 0))
    except (ValueError, KeyError, AttributeError):
        return 0


class ImageClassifierAdapter(ModelAdapter):
    """Adapter for image classifiers (see the module docstring); it handles any ``nn.Module``."""

    name = "image-classifier"

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def example_inputs(self, model: nn.Module, batch: int = 1, device: str | torch.device | None = None) -> torch.Tensor:
        spec = self.identify(model)
        if spec is None:
            raise CompressError("cannot infer the input shape of this model", "pass example_inputs=torch.zeros(1, C, H, W)")
        return self.spec_inputs(spec, batch, device=model_device(model) if device is None else device)

    def input_spec(self, model: nn.Module) -> InputSpec:
        return InputSpec(("input",), ("logits",), {"input": {0: "batch"}, "logits": {0: "batch"}})

    def check_inputs(self, model: nn.Module, inputs: Any) -> None:
        spec = spec_of(model)
        if spec is None or not spec.input_shape:
            return
        x = inputs
        if x.dim() != len(spec.input_shape) + 1 or x.shape[1] != spec.input_shape[0]:
            raise CompressError(f"inputs of shape {tuple(x.shape[1:])} do not fit {spec.arch}, which expects {spec.input_shape}",
                                "pass data of that shape (e.g. a matching --image-size / channels) or a model built for it")

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return predict(model, on_model(inputs, model))

    def never_pruned(self, model: nn.Module) -> list[nn.Module]:
        return [classifier_layer(model)] + shuffle_outputs(model)

    def outside_pruning_scope(self, model: nn.Module, example_inputs: Any) -> list[nn.Module]:
        """With an attention torch-pruning cannot prune (see :mod:`.mlp_scope`): every layer but the first of each
        MLP (or inverted-residual block) that runs per sample. Otherwise the layers whose channels reach a split
        or slice of fixed size (see :mod:`.fixed_views`)."""
        if unprunable_attention(model):
            return layers_outside_mlps(model, self.dependency_graph(model, example_inputs), example_inputs)
        if has_fixed_channel_views(model, example_inputs):
            return layers_into_fixed_views(self.dependency_graph(model, example_inputs))
        return []

    def pruning_graph(self, model: nn.Module, graph: tp.DependencyGraph) -> tp.DependencyGraph:
        return views_as_channelwise(graph) if unprunable_attention(model) else graph

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[None]:
        with opaque_shuffle(model), opaque_patch_merging(model):
            yield

    def round_to(self, model: nn.Module) -> int | None:
        heads = list(self.attention_heads(model).values())
        return max(heads) if heads else None

    def attention_heads(self, model: nn.Module) -> dict[str, int]:
        return {n: m.num_heads for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}

    def sync_after_pruning(self, model: nn.Module) -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            model.hidden_dim = model.conv_proj.out_channels
        for mixed in split_convs(model):
            sync_split_sizes(mixed)
        return model

    def identify(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec | None:
        """Find the builder that produced an unrecorded ``model`` (same class, same parameter names and shapes).
        Candidates from the model's own module are built on the meta device (no memory, no initialisation); those
        that cannot be (RegNet computes its widths with tensors) are built on the CPU, the closest in parameter
        count first, until one matches."""
        recorded = spec_of(model)
        if recorded is not None:
            return recorded
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        unbuilt = []
        for arch, kwargs in self._candidates(model):
            candidate = _built(arch, kwargs, "meta")
            if candidate is None:
                unbuilt.append((arch, kwargs))
            elif _same_structure(candidate, model, shapes):
                return make_spec(arch, kwargs, input_shape)
        size = sum(p.numel() for p in model.parameters())
        for arch, kwargs in sorted(unbuilt, key=lambda c: abs(_listed_params(c[0]) - size)):
            candidate = _built(arch, kwargs, "cpu")
            if candidate is not None and _same_structure(candidate, model, shapes):
                return make_spec(arch, kwargs, input_shape)
        return None

    @staticmethod
    def _candidates(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(model, SmallResNet):
            widths = tuple(stage[0].conv2.out_channels for stage in model.layers)
            blocks = tuple(len(stage) for stage in model.layers)
            return [("small_resnet", {"in_channels": model.conv1.in_channels, "num_classes": model.fc.out_features,
                                      "widths": widths, "blocks": blocks})]
        if type(model).__module__.startswith("torchvision.models"):
            import torchvision

            classes = num_classes(model)
            return [(arch, {"num_classes": classes} if classes else {}) for arch in torchvision_archs()
                    if torchvision.models.get_model_builder(arch).__module__ == type(model).__module__]
        return []

    def rebuild(self, spec: ModelSpec) -> nn.Module:
        try:
            model = builder(spec.arch)(**spec.kwargs)
        except TypeError as err:
            raise CompressError(f"bad arguments for {spec.arch}: {err}", "check the model kwargs") from err
        return self.replay(model, spec)
