"""``jbr-recal``: centred JBR that also credits what BatchNorm recalibration restores at the next BatchNorm.

Removing channel c and recalibrating BN changes what the network pays for. Centred JBR
(:class:`criteria.jbr.JBRImportance`, ``centred=True``) scores the fluctuation e = m(x)ᵀ J_c (a_c(x) − μ_c): the
channel's mean is restored. Recalibration also re-estimates the mean μ_j and variance σ_j² of every BatchNorm n
that reads the channel through a layer L (z = L(u), n normalises z). To first order in δz_j = W_j,c ⋆ (u_c − ū_c),
the change of z_j (ū_c the channel's mean, replaced inside the image and zero in the padding), the recalibrated n
outputs

    γ_j/σ_j · [δz_j − E δz_j − (z_j − μ_j) · Cov(z_j, δz_j)/σ_j²],

so the mean of δz_j (nonzero where padding cuts the kernel) and its part along z_j itself (its "scale", in PRISM's
split of a drift into scale and shape) are undone; only the rest (the "shape") reaches the output. The per-sample
first-order effect of removing c becomes

    d(x) = e(x) − Σ_j κ_jc G_j(x) − Σ_j (γ_j/σ_j) ν_jc B_j(x),
    κ_jc = Σ_k W_jck X_jck / (σ_j² + ε),   X_jck = E[(z_j − μ_j)(u_c,+k − ū_c)],   ν_jc = E[δz_j],

G_j = ∂s/∂λ_j for a gate λ_j on n's output γ_j x̂_j and B_j = ∂s/∂β_j for a shift of it (the centred pass holds
both: G = ∂s/∂g − β ∂s/∂b), k the kernel offsets, s = m(x)ᵀ f(x); the score is E_x[d(x)²]. X and ν come from
four weight gradients of L (input u or ones, output gradient z or ones) summed in the same pass, so that μ and ū
may be known only at its end. Only the BatchNorm right after each layer that reads the channel is modelled
(deeper BatchNorms, which recalibration re-estimates too, are not), for convolutions with one group and linear
layers; other readers get no recalibration term.

Cost: the centred pass with per-sample rows kept (one float32 per sample, gated channel and gate kind) plus, per
reading layer, one extra forward and weight gradient of that layer per batch (and three with one channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.adapters import adapter_for
from compress.batches import first_rows, map_tensors
from compress.data import inputs_of
from compress.distributed import all_reduce_sums
from compress.nn_helpers import on_model

from .jbr import NORMS, JBRImportance, Target, norm_after

READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _channel_first(layer: nn.Module, x: Tensor) -> Tensor:
    """``x`` with its channels first, flattened to (channels, values): dim 1 of a conv's tensors, the last of a
    linear layer's."""
    channel = x.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return x.detach().double().transpose(0, channel).reshape(x.shape[channel], -1)


def _weight_gradient(layer: nn.Module, inputs: Tensor, grad_output: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Σ over samples and positions of the layer's weight gradient for ``inputs`` and ``grad_output``, with a weight
    of ``shape`` (out, in, *kernel) in place of the layer's (so a one-channel side costs one channel); the layer's
    own functional form (stride, padding, dilation), without its hooks."""
    weight = torch.zeros(shape, dtype=inputs.dtype, device=inputs.device, requires_grad=True)
    with torch.enable_grad():
        out = F.linear(inputs, weight) if isinstance(layer, nn.Linear) else layer._conv_forward(inputs, weight, None)
        (grad,) = torch.autograd.grad(out, weight, grad_output)
    return grad.double()


@dataclass
class ReaderStatistics:
    """Sums over the calibration pass for one layer L that feeds a BatchNorm: its input u, output z, and the four
    weight gradients whose combination is Σ (z_j − μ_j)(u_c,+k − ū_c) (see the module docstring)."""

    zu: Tensor  # wg(u, z): (out, in, *kernel)
    u1: Tensor  # wg(u, 1): (1, in, *kernel)
    z1: Tensor  # wg(1, z): (out, 1, *kernel)
    ones: Tensor  # wg(1, 1): (1, 1, *kernel)
    z_sum: Tensor  # (out,)
    z_squares: Tensor  # (out,)
    u_sum: Tensor  # (in,)
    z_count: float = 0.0  # values per output channel
    u_count: float = 0.0  # values per input channel

    @classmethod
    def empty(cls, layer: nn.Module) -> "ReaderStatistics":
        out, inp, *kernel = layer.weight.shape
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(zeros(out, inp, *kernel), zeros(1, inp, *kernel), zeros(out, 1, *kernel), zeros(1, 1, *kernel),
                   zeros(out), zeros(out), zeros(inp))

    def add(self, layer: nn.Module, u: Tensor, z: Tensor) -> None:
        """Add one call's input ``u`` and output ``z``."""
        u, z = u.detach(), z.detach()
        out, inp, *kernel = layer.weight.shape
        one_u = torch.ones_like(u.narrow(-1 if isinstance(layer, nn.Linear) else 1, 0, 1))
        one_z = torch.ones_like(z.narrow(-1 if isinstance(layer, nn.Linear) else 1, 0, 1))
        self.zu += _weight_gradient(layer, u, z, (out, inp, *kernel)).cpu()
        self.u1 += _weight_gradient(layer, u, one_z, (1, inp, *kernel)).cpu()
        self.z1 += _weight_gradient(layer, one_u, z, (out, 1, *kernel)).cpu()
        self.ones += _weight_gradient(layer, one_u, one_z, (1, 1, *kernel)).cpu()
        zc, uc = _channel_first(layer, z), _channel_first(layer, u)
        self.z_sum += zc.sum(1).cpu()
        self.z_squares += (zc ** 2).sum(1).cpu()
        self.u_sum += uc.sum(1).cpu()
        self.z_count += zc.shape[1]
        self.u_count += uc.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        return {"zu": self.zu, "u1": self.u1, "z1": self.z1, "ones": self.ones, "z_sum": self.z_sum,
                "z_squares": self.z_squares, "u_sum": self.u_sum,
                "counts": torch.tensor([self.z_count, self.u_count], dtype=torch.float64)}

    def _means(self) -> tuple[Tensor, Tensor, Tensor]:
        """μ_j and Var z_j per output channel, ū_c per input channel."""
        mu = self.z_sum / self.z_count
        variance = (self.z_squares / self.z_count - mu ** 2).clamp(min=0.0)
        return mu, variance, self.u_sum / self.u_count

    def kappa(self, weight: Tensor, eps: float) -> Tensor:
        """κ (out, in): Σ_k W_jck E[(z_j − μ_j)(u_c,+k − ū_c)] / (Var z_j + eps)."""
        mu, variance, u_mean = self._means()
        kernel = (1,) * (self.zu.dim() - 2)
        mu_, u_ = mu.view(-1, 1, *kernel), u_mean.view(1, -1, *kernel)
        covariance = (self.zu - mu_ * self.u1 - u_ * self.z1 + mu_ * u_ * self.ones) / self.z_count
        return (weight.detach().double().cpu() * covariance).flatten(2).sum(2) / (variance + eps)[:, None]

    def mean_shift(self, weight: Tensor) -> Tensor:
        """ν (out, in): E[δz_j] for δz = W_j,c ⋆ (u_c − ū_c), nonzero where padding cuts the kernel at the border
        (recalibration removes it at the BatchNorm; the frozen centred score does not)."""
        _, _, u_mean = self._means()
        kernel = (1,) * (self.zu.dim() - 2)
        centred = (self.u1 - u_mean.view(1, -1, *kernel) * self.ones) / self.z_count
        return (weight.detach().double().cpu() * centred).flatten(2).sum(2)


class RecalibratedJBRImportance(JBRImportance):
    """``jbr-recal``: E_x[d(x)²], centred JBR with the first-order effect of recalibrating the next BatchNorm (its
    mean and its scale) credited, see the module docstring. Keeps per-sample rows (``keep_rows``)."""

    def __init__(self, data: Iterable[Any] | None = None, *, target: Target = "predicted",
                 autocast: bool = True) -> None:
        super().__init__(data, target=target, centred=True, autocast=autocast, keep_rows=True)
        self.readers: dict[str, ReaderStatistics] = {}
        self.reader_norms: dict[str, str] = {}  # reading layer -> the BatchNorm it feeds

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        if graph is None:
            example = map_tensors(first_rows(on_model(inputs_of(next(iter(data))), model), 1), torch.Tensor.detach)
            adapter = adapter_for(model)
            graph = adapter.pruning_graph(model, adapter.dependency_graph(model, example))
        names = {m: n for n, m in model.named_modules()}
        self.reader_norms = {}
        for layer, name in names.items():
            norm = norm_after(graph, layer) if isinstance(layer, READERS) else None
            if norm is not None and getattr(layer, "groups", 1) == 1:
                self.reader_norms[name] = names[norm]
        self.readers = {n: ReaderStatistics.empty(model.get_submodule(n)) for n in self.reader_norms}

        def hook(name: str):
            def record(module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
                if isinstance(inputs[0], Tensor) and inputs[0].shape[:1] == out.shape[:1]:
                    self.readers[name].add(module, inputs[0], out)
            return record

        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in self.readers]
        try:
            self.moments, self.plans, self.rows_seen = {}, {}, 0
            self._pass(model, data, graph, lambda _graph: None, {}, keep_rows=True)
        finally:
            for h in handles:
                h.remove()
        for name, stats in self.readers.items():  # under torch.distributed: every rank's samples
            reduced = all_reduce_sums(stats.tensors())
            stats.zu, stats.u1, stats.z1, stats.ones = reduced["zu"], reduced["u1"], reduced["z1"], reduced["ones"]
            stats.z_sum, stats.z_squares, stats.u_sum = reduced["z_sum"], reduced["z_squares"], reduced["u_sum"]
            stats.z_count, stats.u_count = (float(v) for v in reduced["counts"])

    def _norm_rows(self, norm_name: str, norm: nn.Module) -> tuple[Tensor, Tensor] | None:
        """G (rows, channels), per-sample ∂s/∂λ_j for a gate λ on the BatchNorm's output γ_j x̂_j, and the rows of
        ∂s/∂β_j for a shift of its output."""
        columns = self.columns.get(norm_name)
        if columns is None:
            return None
        scale, shift = self.derivatives[:, columns].double(), self.shift_derivatives[:, columns].double()
        bias = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(scale.shape[1])
        return scale - bias * shift, shift

    def rescaling(self, group: Any) -> Tensor | None:
        """Σ over the group's reading layers of G κ_c + (γ/σ) B ν_c (rows, root channels): what recalibrating the
        BatchNorm after each reader restores; None when no reader is modelled."""
        names = self.module_names(group)
        total, seen = None, set()
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            name = names.get(layer)
            if (getattr(dep.handler, "__name__", "") != "prune_in_channels" or name not in self.readers
                    or (name, tuple(idxs)) in seen):
                continue
            seen.add((name, tuple(idxs)))
            norm_name = self.reader_norms[name]
            norm = self._model().get_submodule(norm_name)
            rows = self._norm_rows(norm_name, norm) if isinstance(norm, NORMS) else None
            if rows is None:
                continue
            scale_rows, shift_rows = rows
            stats = self.readers[name]
            # frozen normalisation of the BatchNorm: γ_j / sqrt(running var + eps) scales E[δz_j] into its output
            frozen = (norm.weight.detach().double().cpu() if norm.weight is not None else 1.0) / torch.sqrt(
                norm.running_var.detach().double().cpu() + norm.eps)
            coefficients = torch.cat([stats.kappa(layer.weight, norm.eps),
                                      frozen[:, None] * stats.mean_shift(layer.weight)])
            pairs = [(int(r), int(c)) for r, c in zip(item.root_idxs, idxs) if r is not None]
            if not pairs:
                continue
            roots = torch.tensor([r for r, _ in pairs])
            local = torch.tensor([c for _, c in pairs])
            if total is None:
                total = torch.zeros(len(scale_rows), len(group[0].idxs), dtype=torch.float64)
            total.index_add_(1, roots, torch.cat([scale_rows, shift_rows], 1) @ coefficients[:, local])
        return total

    def _group_sums(self, group: Any) -> Tensor | None:
        centred = self.group_derivatives(group)
        rescaled = self.rescaling(group)
        if centred is None and rescaled is None:
            return None
        if centred is None:
            centred = torch.zeros_like(rescaled)
        return ((centred - rescaled) ** 2 if rescaled is not None else centred ** 2).sum(0)
