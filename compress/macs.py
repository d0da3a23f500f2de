"""Counting multiply-accumulates: per weight layer (for BOPs budgets and per-MAC criteria) and for the whole model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .batches import call, first_rows, is_named
from .nn_helpers import eval_mode, weight_layers


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs per Conv2d/Linear layer for one sample: output elements × (Cin/groups · kh · kw) or in_features."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in weight_layers(model).items():
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            per_output = (mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                          if isinstance(mod, nn.Conv2d) else mod.in_features)
            macs[name] = int(out[:1].numel() * per_output)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            call(model, first_rows(example_inputs, 1))
    finally:
        for h in hooks:
            h.remove()
    return macs


class _PositionalCall(nn.Module):
    """``model`` called with named inputs handed over positionally: torch-pruning's counter reads the batch size
    from the first positional input of the counted module and prints a warning when there is none."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *values: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, values)))


PRODUCTS = ("matmul", "__matmul__", "bmm", "scaled_dot_product_attention")  # torch functions of two activations


def product_macs(name: str, args: tuple, kwargs: dict) -> int:
    """MACs of one product of activations: ``matmul``/``bmm`` of (…, n, k) by (…, k, m): batch · n · k · m;
    ``scaled_dot_product_attention(q, k, v)``: batch · L_q · L_k · (E + E_v), the scores QKᵀ and their weighted sum
    of the values (with grouped-query attention, q's batch holds every query head)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if name == "scaled_dot_product_attention" and len(tensors) >= 3:
        q, k, v = tensors[:3]
        return q[..., 0, 0].numel() * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if len(tensors) >= 2 and min(t.dim() for t in tensors[:2]) >= 2:
        a, b = tensors[:2]
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]).numel()
        return batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return 0


class _ActivationProducts(TorchFunctionMode):
    """Adds up :func:`product_macs` of the activation products a forward pass runs outside the modules
    torch-pruning's counter already counts whole (``nn.MultiheadAttention``, timm's attention): the attention
    scores and weighted values of Hugging Face models and of torchvision's Swin, which no module hook sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torch_pruning.utils.op_counter import MODULES_MAPPING

        self.macs, self._inside, self._hooks = 0, 0, []
        for m in model.modules():
            if type(m) in MODULES_MAPPING:
                self._hooks.append(m.register_forward_pre_hook(self._enter))
                self._hooks.append(m.register_forward_hook(self._leave))

    def _enter(self, *_: Any) -> None:
        self._inside += 1

    def _leave(self, *_: Any) -> None:
        self._inside -= 1

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self._inside == 0 and name in PRODUCTS:
            self.macs += product_macs(name, args, kwargs)
        return func(*args, **kwargs)


def activation_product_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of the products of two activations (attention scores and weighted values) one forward pass of
    ``example_inputs`` runs outside the modules torch-pruning counts (see :class:`_ActivationProducts`)."""
    counter = _ActivationProducts(model)
    try:
        with torch.no_grad(), eval_mode(model), counter:
            call(model, example_inputs)
    finally:
        counter.remove()
    return counter.macs


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, parameters) of the whole model for ``example_inputs`` (one sample): torch-pruning's count of its
    layers plus the attention products no layer holds (:func:`activation_product_macs`), which for a transformer
    grow with the sequence length and shrink with its heads."""
    import torch_pruning as tp

    products = activation_product_macs(model, example_inputs)
    if is_named(example_inputs):
        names = sorted(example_inputs)
        model, example_inputs = _PositionalCall(model, names), tuple(example_inputs[n] for n in names)
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs) + products, int(params)
