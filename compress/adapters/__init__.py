"""Model adapters: what kind of model the pipeline holds (:class:`ModelAdapter`), chosen per model.

``adapter_for(model)`` returns the first registered adapter that handles the model (Hugging Face transformers'
models have their own; the image-classifier adapter handles any ``nn.Module`` and is tried last); ``adapter_named(spec.adapter)`` the one that rebuilds a checkpoint.
A new model family is one file with a ``ModelAdapter`` subclass plus ``register(MyAdapter())``.
"""

from __future__ import annotations

from torch import nn

from ..errors import CompressError
from .base import InputSpec, ModelAdapter
from .hf import HuggingFaceAdapter
from .image import ImageClassifierAdapter
from .spec import ModelSpec, attach_spec, spec_of

_ADAPTERS: list[ModelAdapter] = [HuggingFaceAdapter(), ImageClassifierAdapter()]


def register(adapter: ModelAdapter) -> ModelAdapter:
    """Add ``adapter``; it is tried before those registered earlier (the catch-all image adapter stays last)."""
    if any(a.name == adapter.name for a in _ADAPTERS):
        raise CompressError(f"a model adapter named {adapter.name!r} is already registered", "give it another name")
    _ADAPTERS.insert(0, adapter)
    return adapter


def unregister(name: str) -> None:
    """Remove the adapter called ``name`` (the built-in image adapter cannot be removed)."""
    if name == ImageClassifierAdapter.name:
        raise CompressError("the image-classifier adapter cannot be removed", "register a more specific adapter instead")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != name]


def adapters_registered() -> list[ModelAdapter]:
    """The registered adapters in the order they are tried."""
    return list(_ADAPTERS)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter that handles ``model``: its recorded spec's adapter, else the first registered that handles it."""
    spec = spec_of(model)
    if spec is not None:
        return adapter_named(spec.adapter)
    for adapter in _ADAPTERS:
        if adapter.handles(model):
            return adapter
    raise CompressError(f"no model adapter understands {type(model).__name__}",
                        "register one with compress.adapters.register(MyAdapter())")


def identify(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec | None:
    """The spec recorded on ``model``, else the one its adapter recognises, else None."""
    recorded = spec_of(model)
    if recorded is not None:
        return recorded
    return adapter_for(model).identify(model, input_shape)


def adapter_named(name: str) -> ModelAdapter:
    for adapter in _ADAPTERS:
        if adapter.name == name:
            return adapter
    raise CompressError(f"no model adapter named {name!r} is registered",
                        f"register it before loading (known: {', '.join(a.name for a in _ADAPTERS)})")


__all__ = ["HuggingFaceAdapter", "ImageClassifierAdapter", "InputSpec", "ModelAdapter", "ModelSpec", "adapter_for", "adapter_named", "adapters_registered",
           "attach_spec", "identify", "register", "spec_of", "unregister"]
