"""The Hugging Face transformers adapter: ``PreTrainedModel`` classifiers and causal language models.

Inputs are named (:mod:`compress.batches`): ``input_ids`` and ``attention_mask`` for text, ``pixel_values`` for
vision, with dynamic batch (and sequence) axes. The prediction tensor f(x) is the classification logits, or for
a language model the next-token logits at each sample's last attended position. The output head (``classifier``,
``score``, ``lm_head``) is never pruned; the attention projections and the hidden size are outside torch-pruning's
scope (their channels pass through head reshapes and rotary embeddings it cannot follow, see :mod:`.mlp_scope`),
so torch-pruning prunes the MLP intermediate channels (``fc1``/``intermediate.dense``, and Llama's ``gate_proj``
with ``up_proj``); whole heads (:mod:`.heads`) and hidden channels (:mod:`.hidden`) are pruned by construction.

GPT-2's ``Conv1D`` layers (Linear layers with transposed weights) become ``nn.Linear`` when a model enters the
pipeline (:meth:`HuggingFaceAdapter.prepared`), so they are pruned, planned, quantized and exported like any Linear.

:mod:`.hf_folders` writes and loads ``save_pretrained`` folders (safetensors only), pruned ones included;
``compress.models.resolve(folder)`` loads one. A model is identified by its class and config (``arch = "hf:ViTForImageClassification"``, the config as a plain
dict in the spec's kwargs), and rebuilt from them with fresh weights: no download, no pickled code. The spec's
``input_shape`` is one sample's ``(C, H, W)`` for vision and ``(sequence length,)`` for text, the length MACs are
counted at.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, ContextManager, Iterator

import torch
import torch_pruning as tp
from torch import nn

from ..batches import is_named, predict
from ..errors import CompressError
from ..nn_helpers import model_device, on_model, set_module
from .base import InputSpec, ModelAdapter
from .mlp_scope import layers_outside_mlps, views_as_channelwise
from .spec import USER_WEIGHTS, ModelSpec, attach_spec, spec_of

ARCH_PREFIX = "hf:"
OUTPUT_HEADS = ("classifier", "score", "lm_head")  # attribute names of the task heads of transformers' models
DEFAULT_SEQUENCE = 32  # tokens per sample in example inputs (and MACs) unless the spec records another length
TEXT_INPUTS = ("input_ids", "attention_mask")
VISION_INPUTS = ("pixel_values",)


# named configurations of small transformers the toolkit trains on the embedded Fashion-MNIST (benchmarks, recipes)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_fmnist": ("ViTForImageClassification", {"image_size": 28, "patch_size": 7, "num_channels": 1,
                                                  "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                                  "intermediate_size": 256, "num_labels": 10}),
}


def preset_spec(name: str) -> ModelSpec:
    """The spec of preset ``name`` (random weights): a transformers model class and its config."""
    class_name, options = PRESETS[name]
    model_class = getattr(import_transformers(), class_name)
    config = model_class.config_class(**options)
    return ModelSpec(f"{ARCH_PREFIX}{class_name}", {"config": config.to_dict()}, default_input_shape(config), "random",
                     adapter=HuggingFaceAdapter.name)


def import_transformers() -> Any:
    """The transformers package (an optional extra)."""
    try:
        import transformers
    except ImportError as err:
        raise CompressError("this checkpoint holds a Hugging Face model but transformers is not installed",
                            "pip install -e '.[hf]'") from err
    return transformers


def is_vision(model_or_config: Any) -> bool:
    """Whether the model (or config) takes ``pixel_values``."""
    config = getattr(model_or_config, "config", model_or_config)
    return hasattr(config, "image_size") and hasattr(config, "num_channels")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (None when unbounded or unknown)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _image_size(config: Any) -> tuple[int, int]:
    size = config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def default_input_shape(config: Any) -> tuple[int, ...]:
    """(C, H, W) of the config's images, or (L,) with L = min(DEFAULT_SEQUENCE, its positions)."""
    if is_vision(config):
        return (int(config.num_channels), *_image_size(config))
    return (min(DEFAULT_SEQUENCE, max_positions(config) or DEFAULT_SEQUENCE),)


def output_head(model: nn.Module) -> nn.Module | None:
    """The task head that produces the logits (the classifier or LM head), if the model has one."""
    for name in OUTPUT_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Sequential):
            head = next((m for m in reversed(head) if isinstance(m, nn.Linear)), None)
        if isinstance(head, nn.Linear):
            return head
    return None


def conv1d_layers(model: nn.Module) -> dict[str, nn.Module]:
    """GPT-2's ``Conv1D`` layers by name: a Linear whose weight is stored transposed, (in, out)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return {}
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}


def linear_from_conv1d(model: nn.Module) -> nn.Module:
    """``model`` with every ``Conv1D`` replaced, in place, by the ``nn.Linear`` computing the same outputs
    (weight transposed, same names), so torch-pruning, torchao and the exporter see ordinary Linear layers."""
    for name, conv in conv1d_layers(model).items():
        linear = nn.Linear(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        set_module(model, name, linear)
    return model


class HuggingFaceAdapter(ModelAdapter):
    """Hugging Face ``PreTrainedModel`` classifiers and causal LMs (see the module docstring)."""

    name = "transformers"

    def handles(self, model: nn.Module) -> bool:
        transformers = sys.modules.get("transformers")  # a transformers model means the package is imported
        return transformers is not None and isinstance(model, transformers.PreTrainedModel)

    # --- inputs and outputs -----------------------------------------------------------------------------------
    def spec_inputs(self, spec: ModelSpec, batch: int = 1, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values`` zeros of the recorded (C, H, W), or ``input_ids`` (token 0) with an all-ones
        ``attention_mask`` of the recorded length."""
        if len(spec.input_shape) == 3:
            return {"pixel_values": torch.zeros(batch, *spec.input_shape, device=device, dtype=dtype)}
        ids = torch.zeros(batch, spec.input_shape[0], dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def example_inputs(self, model: nn.Module, batch: int = 1, device: str | torch.device | None = None) -> Any:
        return self.spec_inputs(self.identify(model), batch, model_device(model) if device is None else device)

    def input_spec(self, model: nn.Module) -> InputSpec:
        if is_vision(model):
            return InputSpec(VISION_INPUTS, ("logits",), {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
        return InputSpec(TEXT_INPUTS, ("logits",), {**axes, "logits": {0: "batch"}})

    def check_inputs(self, model: nn.Module, inputs: Any) -> None:
        """Named inputs with the model's main input (a vision model also takes an image tensor as its
        ``pixel_values``); a sequence no longer than its position embeddings; images with its channels."""
        wanted = getattr(model, "main_input_name", "pixel_values" if is_vision(model) else "input_ids")
        if wanted == "pixel_values" and isinstance(inputs, torch.Tensor):
            inputs = {wanted: inputs}
        if not is_named(inputs) or wanted not in inputs:
            got = f"keys {sorted(inputs)}" if is_named(inputs) else f"a {type(inputs).__name__}"
            raise CompressError(f"{type(model).__name__} takes named inputs with {wanted!r}, got {got}",
                                f"yield dict batches with {wanted!r} (a tokenizer's output, or "
                                f"{{'{wanted}': tensor}})")
        x = inputs[wanted]
        if wanted == "input_ids":
            limit = max_positions(model.config)
            if x.dim() != 2:
                raise CompressError(f"input_ids of shape {tuple(x.shape)} are not (batch, sequence)",
                                    "tokenize with return_tensors='pt' and padding")
            if limit is not None and x.shape[1] > limit:
                raise CompressError(f"sequences of {x.shape[1]} tokens are longer than the {limit} positions of "
                                    f"{type(model).__name__}", f"truncate to at most {limit} tokens "
                                    "(tokenizer(..., truncation=True, max_length=...))")
        elif wanted == "pixel_values" and (x.dim() != 4 or x.shape[1] != model.config.num_channels):
            raise CompressError(f"pixel_values of shape {tuple(x.shape)} do not fit {type(model).__name__}, which "
                                f"takes (N, {model.config.num_channels}, H, W)", "pass images with that many channels")

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return predict(model, on_model(inputs, model))

    def prepared(self, model: nn.Module) -> nn.Module:
        """A copy with GPT-2's ``Conv1D`` layers as ``nn.Linear`` (see :func:`linear_from_conv1d`), else itself."""
        if not conv1d_layers(model):
            return model
        return attach_spec(linear_from_conv1d(copy.deepcopy(model)), self.identify(model))

    # --- structure ----------------------------------------------------------------------------------------------
    def never_pruned(self, model: nn.Module) -> list[nn.Module]:
        head = output_head(model)
        return [head] if head is not None else []

    def outside_pruning_scope(self, model: nn.Module, example_inputs: Any) -> list[nn.Module]:
        """Every Linear but the first layer(s) of each MLP that runs per sample (see :mod:`.mlp_scope`)."""
        return layers_outside_mlps(model, self.dependency_graph(model, example_inputs), example_inputs)

    def tracing(self, model: nn.Module) -> ContextManager[None]:
        """Without a key/value cache (a language model's cache object is no tensor torch-pruning can trace)."""
        return self._without_cache(model)

    def exporting(self, model: nn.Module) -> ContextManager[None]:
        """Without a key/value cache: the file maps a whole sequence to its logits (no cache inputs or outputs)."""
        return self._without_cache(model)

    @staticmethod
    @contextlib.contextmanager
    def _without_cache(model: nn.Module) -> Iterator[None]:
        config = model.config
        use_cache = getattr(config, "use_cache", None)
        if use_cache is not None:
            config.use_cache = False
        try:
            yield
        finally:
            if use_cache is not None:
                config.use_cache = use_cache

    def pruning_graph(self, model: nn.Module, graph: tp.DependencyGraph) -> tp.DependencyGraph:
        return views_as_channelwise(graph)

    # --- identity -----------------------------------------------------------------------------------------------
    def identify(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec:
        recorded = spec_of(model)
        if recorded is not None:
            return recorded
        shape = tuple(input_shape) if input_shape else default_input_shape(model.config)
        return ModelSpec(f"{ARCH_PREFIX}{type(model).__name__}", {"config": model.config.to_dict()}, shape,
                         USER_WEIGHTS, adapter=self.name)

    def rebuild(self, spec: ModelSpec) -> nn.Module:
        transformers = import_transformers()
        name = spec.arch.removeprefix(ARCH_PREFIX)
        model_class = getattr(transformers, name, None)
        if model_class is None or not hasattr(model_class, "config_class"):
            raise CompressError(f"transformers {transformers.__version__} has no model class {name}",
                                "install the transformers version the checkpoint was saved with")
        config = model_class.config_class.from_dict(dict(spec.kwargs["config"]))
        return self.replay(linear_from_conv1d(model_class(config).eval()), spec)
