"""``build(spec)``: a model's structure from its :class:`~compress.adapters.spec.ModelSpec`, with fresh weights.

The spec's adapter rebuilds the architecture and replays the pruning history; a quantized spec is then folded and
quantized again through its backend (:func:`compress.backends.apply_quantization`), so a state_dict saved from the
original loads into the result strictly. ``build(spec, model=Fresh())`` starts from a module the user built
instead of the adapter's builder: the only way to rebuild a user's own class (``spec.is_user``), whose name alone
cannot be turned back into code.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_named
from .adapters.spec import ModelSpec, attach_spec, spec_of
from .backends import apply_quantization
from .errors import CompressError

FRESH_FIX = "pass a freshly built, unpruned instance of the class the checkpoint was saved from, with the same constructor arguments"


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _replay_onto(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """``spec``'s pruning history replayed onto the user's fresh ``model`` (in place), after checking its class."""
    wanted = spec.user_class if spec.is_user else None
    if wanted is not None and type(model).__name__ != wanted.rsplit(".", 1)[-1]:  # the module may differ (__main__)
        raise CompressError(f"model= is a {_class_name(model)}, but the checkpoint holds a {wanted}",
                            f"pass model={wanted.rsplit('.', 1)[-1]}(...) freshly built")
    recorded = spec_of(model)
    if recorded is not None and (recorded.pruning_history or recorded.quantization):
        raise CompressError(f"model= ({type(model).__name__}) is already pruned or quantized", FRESH_FIX)
    model.cpu()  # the history is replayed with a CPU example input
    adapter = adapter_named(spec.adapter)
    try:
        return adapter.replay(model, spec)
    except CompressError:
        raise
    except Exception as err:  # torch-pruning's own errors on a module of another shape
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise CompressError(f"the pruning history does not fit model= ({type(model).__name__}): {first}", FRESH_FIX) from err


def build(spec: ModelSpec, device: str | torch.device = "cpu", model: nn.Module | None = None) -> nn.Module:
    """A model with ``spec``'s structure (pruning replayed, BN folded and layers quantized when the spec says so)
    and freshly initialised weights, on ``device`` (in the dtype it was quantized in, when quantized).

    ``model``: a freshly built, unpruned module to rebuild onto instead of the adapter's builder (required for a
    user's own class; it is pruned in place)."""
    if model is not None:
        model = _replay_onto(model, spec)
    elif spec.is_user:
        raise CompressError(f"a user model ({spec.user_class}) cannot be rebuilt from its name",
                            f"pass model={spec.user_class.rsplit('.', 1)[-1]}(...) freshly built")
    else:
        model = adapter_named(spec.adapter).rebuild(spec)
    model.to(device)
    if spec.quantization:
        model.to(getattr(torch, spec.quantization.get("dtype", "float32")))
        model = apply_quantization(model, spec.quantization)
    return attach_spec(model, spec)
