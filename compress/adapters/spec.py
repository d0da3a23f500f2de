"""The record that rebuilds a model's structure without unpickling code: :class:`ModelSpec`.

A spec names the adapter that understands the model (:mod:`compress.adapters`), the architecture and its keyword
arguments, one sample's input shape and (once pruned) the torch-pruning history replayed on a fresh copy; weights
travel separately as a state_dict. The spec rides on the model object as a plain attribute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import CompressError

SPEC_ATTR = "compress_spec"
IMAGENET_INPUT_SHAPE = (3, 224, 224)
HistoryEntry = tuple[str, bool, tuple[int, ...]]
DEFAULT_ADAPTER = "image-classifier"
USER_ARCH_PREFIX = "user:"  # arch of a model the user built from a class we have no builder for
USER_WEIGHTS = "user"


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model's structure: ``arch(**kwargs)`` then replay ``pruning_history``.

    ``input_shape`` is one sample's shape (C, H, W); ``weights`` says where the weights came from (provenance);
    ``quantization`` holds the per-layer quantization plan once one was applied; ``adapter`` names the model
    adapter that rebuilds it.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = IMAGENET_INPUT_SHAPE
    weights: str = "random"
    pruning_history: tuple[HistoryEntry, ...] = ()
    quantization: dict[str, Any] | None = None
    adapter: str = DEFAULT_ADAPTER

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, dicts, strings and numbers: loadable with ``torch.load(weights_only=True)``. The adapter is
        recorded only when it is not the default image classifier, so specs (and training-cache keys) of image
        models read as they did before adapters existed."""
        d = asdict(self)
        if self.adapter == DEFAULT_ADAPTER:
            del d["adapter"]
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
                   quantization=d.get("quantization"), adapter=str(d.get("adapter", DEFAULT_ADAPTER)))

    @property
    def is_user(self) -> bool:
        """Whether this records a user's own class (``arch="user:<module>.<qualname>"``): rebuilt only from a
        fresh instance the user passes (``compress.load(path, model=MyNet())``), never from its name."""
        return self.arch.startswith(USER_ARCH_PREFIX)

    @property
    def user_class(self) -> str:
        """The qualified class name of a user model's spec (``module.QualName``)."""
        return self.arch.removeprefix(USER_ARCH_PREFIX)

    def example_input(self, batch: int = 1, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.input_shape:  # a user model saved without a known input shape
            raise CompressError(f"the input shape of {self.arch} is not recorded",
                                "pass example_inputs=torch.zeros(1, C, H, W)")
        return torch.zeros(batch, *self.input_shape, device=device, dtype=dtype)


def user_arch(model: nn.Module) -> str:
    """``user:<module>.<qualname>`` of ``model``'s class."""
    cls = type(model)
    return f"{USER_ARCH_PREFIX}{cls.__module__}.{cls.__qualname__}"


def user_spec(model: nn.Module, input_shape: tuple[int, ...] = (), adapter: str = DEFAULT_ADAPTER) -> ModelSpec:
    """The spec of a model whose architecture no builder knows: its class name (checked on reload, where the user
    passes a fresh instance), no kwargs and one sample's input shape (empty when unknown, allowed only while
    there is no pruning history to replay)."""
    return ModelSpec(user_arch(model), {}, tuple(int(s) for s in input_shape), USER_WEIGHTS, adapter=adapter)


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec recorded on ``model`` by this toolkit, if any."""
    return getattr(model, SPEC_ATTR, None)


def attach_spec(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Record ``spec`` on ``model`` (a plain attribute; survives in-place pruning)."""
    object.__setattr__(model, SPEC_ATTR, spec)
    return model


def with_history(spec: ModelSpec, history: list[tuple[str, bool, list[int]]]) -> ModelSpec:
    """``spec`` with torch-pruning ``history`` entries appended to its pruning history."""
    added = tuple((str(n), bool(o), tuple(int(i) for i in idx)) for n, o, idx in history)
    return replace(spec, pruning_history=spec.pruning_history + added)
