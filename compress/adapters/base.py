"""The model-adapter interface: the one place that knows what kind of model the pipeline holds.

Everything the pipeline needs to know about a model family goes through a :class:`ModelAdapter`: how to make
example inputs and describe them for export (names, dynamic axes), how to run a batch and take the prediction
tensor f(x) whose TPV is measured, which layers are never pruned (classifier, LM head), the channel multiple the
structure requires (attention heads), what to update after pruning, and how to identify and rebuild the model
from a :class:`~compress.adapters.spec.ModelSpec` on load. Add a family by subclassing it in one file and
registering an instance (:func:`compress.adapters.register`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
import torch_pruning as tp
from torch import nn

from ..data import inputs_of
from ..errors import CompressError
from ..nn_helpers import weight_layers
from ..quiet import quiet_third_party
from .heads import HEAD_PREFIX, attention_heads, remove_heads
from .hidden import HIDDEN_PREFIX, remove_hidden, residual_stream
from .spec import ModelSpec
from .split_order import split_outputs_in_order


def outside_pruned_layers(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that no layer torch-pruning has a pruner for holds (its "unwrapped" ones)."""
    pruners = tp.DependencyGraph().REGISTERED_PRUNERS
    wrapped = {id(p) for m in model.modules() if tp.ops.module2type(m) in pruners
               and tp.ops.module2type(m) != tp.ops.OPTYPE.ELEMENTWISE for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in wrapped]


@dataclass(frozen=True)
class InputSpec:
    """The model's inputs as an exported graph names them: input names, output names and dynamic axes."""

    names: tuple[str, ...]
    outputs: tuple[str, ...] = ("logits",)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


class ModelAdapter:
    """Base class of model adapters (see the module docstring); the methods below are the whole interface."""

    name: str = "base"

    def handles(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""
        raise NotImplementedError

    # --- inputs and outputs -----------------------------------------------------------------------------------
    def example_inputs(self, model: nn.Module, batch: int = 1, device: str | torch.device | None = None) -> Any:
        """Inputs of ``batch`` samples the model accepts (from its recorded spec); a one-line error when unknown."""
        raise NotImplementedError

    def input_spec(self, model: nn.Module) -> InputSpec:
        """Input and output names and dynamic axes of the exported graph."""
        raise NotImplementedError

    def inputs_of(self, batch: Any) -> Any:
        """The model inputs of a data batch (labels dropped); default: :func:`compress.data.inputs_of` (a tensor, the
        first item of an ``(input, label)`` pair, or a dict's named tensors)."""
        return inputs_of(batch)

    def check_inputs(self, model: nn.Module, inputs: Any) -> None:
        """A one-line error when ``inputs`` do not fit the model; nothing otherwise."""

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The prediction tensor f(x) of shape (batch, outputs) for ``inputs`` moved to the model's device."""
        raise NotImplementedError

    def prepared(self, model: nn.Module) -> nn.Module:
        """``model`` in the form the pipeline prunes, plans, quantizes and saves: itself, or a copy with layers the
        toolkit does not handle replaced by equivalent ones (the same outputs); default: itself."""
        return model

    # --- structure ----------------------------------------------------------------------------------------------
    def weight_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights are pruned, planned and quantized, by name (default: Conv2d and Linear)."""
        return weight_layers(model)

    def never_pruned(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose outputs are never pruned (classifier, LM head, embeddings)."""
        raise NotImplementedError

    def outside_pruning_scope(self, model: nn.Module, example_inputs: Any) -> list[nn.Module]:
        """Layers left unpruned because their channels pass through structure torch-pruning cannot follow (found on
        the traced graph); default: none."""
        return []

    def pruning_graph(self, model: nn.Module, graph: tp.DependencyGraph) -> tp.DependencyGraph:
        """The graph torch-pruning prunes ``model`` with, from the one it traced (adjusted to the pruning scope);
        default: as traced."""
        return graph

    def tracing(self, model: nn.Module) -> ContextManager[None]:
        """A context in which torch-pruning traces ``model`` (to build its dependency graph); default: as it is."""
        return contextlib.nullcontext()

    def exporting(self, model: nn.Module) -> ContextManager[None]:
        """A context in which ``model`` is exported to ONNX (torch.export); default: as it is."""
        return contextlib.nullcontext()

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """Parameters outside the layers torch-pruning prunes (layer scales, class tokens, position embeddings), each
        with the dimension that holds its channels; default: the last dimension longer than 1 (C of a (C, 1, 1)
        layer scale, D of a (1, N, D) embedding)."""
        return [(p, max(d for d, s in enumerate(p.shape) if s > 1)) for p in outside_pruned_layers(model)
                if any(s > 1 for s in p.shape)]

    def dependency_graph(self, model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
        """torch-pruning's dependency graph of ``model``, traced in :meth:`tracing` with :meth:`unwrapped_parameters`
        (autograd on: this works inside ``torch.no_grad()``), split outputs in order (see :mod:`.split_order`)."""
        with torch.enable_grad(), self.tracing(model), quiet_third_party():
            return split_outputs_in_order(tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, unwrapped_parameters=self.unwrapped_parameters(model)))

    def round_to(self, model: nn.Module) -> int | None:
        """The channel multiple the structure requires (attention heads keep equal widths), or None."""
        return None

    def attention_heads(self, model: nn.Module) -> dict[str, int]:
        """Attention modules by name and their head counts (empty for models without attention)."""
        return {}

    def sync_after_pruning(self, model: nn.Module) -> nn.Module:
        """Update the plain attributes a forward pass reads that pruning cannot see."""
        return model

    # --- identity -----------------------------------------------------------------------------------------------
    def identify(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec | None:
        """The spec of an unrecorded ``model`` when its builder is known, else None."""
        return None

    def spec_inputs(self, spec: ModelSpec, batch: int = 1, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Any:
        """Example inputs of ``batch`` samples for the model ``spec`` describes (floating ones in ``dtype``);
        default: zeros of the recorded input shape."""
        return spec.example_input(batch, device=device, dtype=dtype)

    def replay(self, model: nn.Module, spec: ModelSpec) -> nn.Module:
        """Re-apply ``spec.pruning_history`` to a freshly built, unpruned ``model`` (torch-pruning's replay on the
        graph traced from :meth:`spec_inputs`; attention-head removals, ``heads:<module>`` entries, by
        :func:`~compress.adapters.heads.remove_heads`; hidden-size removals, ``hidden:<width>`` entries, by
        :func:`~compress.adapters.hidden.remove_hidden`), then :meth:`sync_after_pruning`."""
        if not spec.pruning_history:
            return model
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        inputs = self.spec_inputs(spec, dtype=first.dtype if first is not None else None)
        chunk: list[list[Any]] = []

        def replay_chunk() -> None:
            if chunk:
                graph = self.pruning_graph(model, self.dependency_graph(model, inputs))
                with quiet_third_party():
                    graph.load_pruning_history(chunk)
                chunk.clear()

        try:
            for name, out, idxs in spec.pruning_history:
                if name.startswith(HIDDEN_PREFIX):
                    replay_chunk()
                    stream = residual_stream(model, inputs, int(name.removeprefix(HIDDEN_PREFIX)))
                    remove_hidden(stream, list(idxs))
                elif name.startswith(HEAD_PREFIX):
                    replay_chunk()
                    unit = {u.name: u for u in attention_heads(model)}[name.removeprefix(HEAD_PREFIX)]
                    remove_heads(unit, list(idxs))
                else:
                    chunk.append([name, out, list(idxs)])
            replay_chunk()
        except (AttributeError, IndexError, KeyError, RuntimeError, ValueError) as err:
            raise CompressError(f"pruning history does not fit architecture {spec.arch}: {err}",
                                "load the checkpoint with the toolkit version that wrote it") from err
        return self.sync_after_pruning(model)

    def rebuild(self, spec: ModelSpec) -> nn.Module:
        """A fresh model of ``spec``'s structure (pruning history replayed, weights freshly initialised)."""
        raise CompressError(f"the {self.name} adapter cannot rebuild {spec.arch}", "save the model with a known builder")
