"""``jbr-recal``: the first-order TPV of removing a channel and then recalibrating BatchNorm, read where the channel
is read.

After pruning, recovery re-estimates every BatchNorm's statistics, so the damage that matters is the one left
after recalibration. Removing channel c sets it to zero at the input u_c of every layer L that reads it. When a
BatchNorm n follows L (z = L(u), n normalises z), recalibration re-estimates its mean μ_j and variance σ_j²; to
first order in δz_j = W_j,c ⋆ (u_c − ū_c) (ū_c the channel's mean at L's input, replaced inside the image and zero
in the padding) the recalibrated n outputs

    γ_j/σ_j · [δz_j − E δz_j − (z_j − μ_j) · Cov(z_j, δz_j)/σ_j²],

so the channel's mean, the mean of δz_j (nonzero where padding cuts the kernel) and the part of δz_j along z_j
itself (its "scale", in PRISM's split of a drift into scale and shape) are restored; only the rest reaches the
output. Per sample x, with s(x) = m(x)ᵀ f(x) (m the dense model's predicted class) and a multiplicative gate γ and
an additive gate β on each input channel of each reading layer, the first-order effect of removing c is

    d(x) = Σ_L [∂s/∂γ_L,c − ū_L,c ∂s/∂β_L,c − Σ_j κ_jc G_j(x) − Σ_j (γ_j/σ_j) ν_jc B_j(x)]   (L followed by BN)
         + Σ_L ∂s/∂γ_L,c                                                                    (L followed by none)
    κ_jc = Σ_k W_jck X_jck / (σ_j² + ε),   X_jck = E[(z_j − μ_j)(u_c,+k − ū_c)],   ν_jc = E[δz_j],

G_j = ∂s/∂λ_j for a gate λ_j on n's output γ_j x̂_j and B_j = ∂s/∂β_j for a shift of it (gates on every
BatchNorm's output: G = ∂s/∂g − β ∂s/∂b), k the kernel offsets; the score is E_x[d(x)²]. Where nothing is
recalibrated (a classifier reading pooled features), the mean is not restored and the removal counts whole.
Gating the readers' inputs rather than the output that vanishes matters after an activation: the mean of
ReLU(a) is not ReLU's linearisation around the mean of a, which is what centring the BatchNorm output
(``jbr-centred``) assumes. X and ν come from four weight gradients of L (input u or ones, output gradient z or
ones) summed in the same pass, so that μ and ū may be known only at its end. Only the BatchNorm right after each
reading layer is modelled (deeper BatchNorms, which recalibration re-estimates too, are not), for convolutions
with one group and linear layers; grouped convolutions count as readers followed by nothing.

One pass over the calibration data, per-sample rows kept (one float32 per sample and gate: every reading layer's
input channels and every BatchNorm's output channels, twice), plus per reading layer followed by a BatchNorm one
extra forward and weight gradient per batch (and three with one channel).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.batches import first_rows, predict, rows
from compress.data import inputs_of, labels_of
from compress.distributed import all_reduce_sum, all_reduce_sums
from compress.nn_helpers import channel_sums, on_model

from .jbr import LAYERS, NORMS, JBRImportance, Target, gate_shape, norm_after, pruning_graph

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
    """Sums over the calibration pass for one layer L that feeds a BatchNorm: its output z and the four weight
    gradients whose combination, with ū (the input means the gated pass keeps), is Σ (z_j − μ_j)(u_c,+k − ū_c)
    (see the module docstring)."""

    zu: Tensor  # wg(u, z): (out, in, *kernel)
    u1: Tensor  # wg(u, 1): (1, in, *kernel)
    z1: Tensor  # wg(1, z): (out, 1, *kernel)
    ones: Tensor  # wg(1, 1): (1, 1, *kernel)
    z_sum: Tensor  # (out,)
    z_squares: Tensor  # (out,)
    z_count: Tensor  # () values per output channel

    @classmethod
    def empty(cls, layer: nn.Module) -> "ReaderStatistics":
        out, inp, *kernel = layer.weight.shape
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(zeros(out, inp, *kernel), zeros(1, inp, *kernel), zeros(out, 1, *kernel), zeros(1, 1, *kernel),
                   zeros(out), zeros(out), zeros(()))

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
        zc = _channel_first(layer, z)
        self.z_sum += zc.sum(1).cpu()
        self.z_squares += (zc ** 2).sum(1).cpu()
        self.z_count += zc.shape[1]

    def all_reduced(self) -> None:
        """Every sum replaced by its sum over the ranks (under torch.distributed: every rank's samples)."""
        for name, value in all_reduce_sums({f.name: getattr(self, f.name) for f in fields(self)}).items():
            setattr(self, name, value)

    def kappa(self, weight: Tensor, eps: float, u_mean: Tensor) -> Tensor:
        """κ (out, in): Σ_k W_jck E[(z_j − μ_j)(u_c,+k − ū_c)] / (Var z_j + eps), ``u_mean`` = ū per input channel."""
        mu = self.z_sum / self.z_count
        variance = (self.z_squares / self.z_count - mu ** 2).clamp(min=0.0)
        kernel = (1,) * (self.zu.dim() - 2)
        mu_, u_ = mu.view(-1, 1, *kernel), u_mean.view(1, -1, *kernel)
        covariance = (self.zu - mu_ * self.u1 - u_ * self.z1 + mu_ * u_ * self.ones) / self.z_count
        return (weight.detach().double().cpu() * covariance).flatten(2).sum(2) / (variance + eps)[:, None]

    def mean_shift(self, weight: Tensor, u_mean: Tensor) -> Tensor:
        """ν (out, in): E[δz_j] for δz = W_j,c ⋆ (u_c − ū_c), nonzero where padding cuts the kernel at the border
        (recalibration removes it at the BatchNorm; the frozen centred score does not)."""
        kernel = (1,) * (self.zu.dim() - 2)
        centred = (self.u1 - u_mean.view(1, -1, *kernel) * self.ones) / self.z_count
        return (weight.detach().double().cpu() * centred).flatten(2).sum(2)


class RecalibratedJBRImportance(JBRImportance):
    """``jbr-recal``: E_x[d(x)²], the first-order TPV of removing a channel and recalibrating BatchNorm, see the
    module docstring. Gated where the channel is read: a multiplicative and an additive gate on the input of every
    conv/linear layer (and gates on every BatchNorm's output, for G and B); per-sample rows are kept. ``target``:
    as for :class:`~criteria.jbr.JBRImportance` (the predicted class, or ``"softmax"``)."""

    def __init__(self, data: Iterable[Any] | None = None, *, target: Target = "predicted",
                 rescale: bool = True) -> None:
        super().__init__(data, target=target, autocast=False, keep_rows=True)  # runs in the model's dtype
        self.rescale = rescale
        self.readers: dict[str, ReaderStatistics] = {}  # per reading layer followed by a BatchNorm
        self.reader_norms: dict[str, str] = {}  # reading layer -> the BatchNorm it feeds
        self.input_means: dict[str, Tensor] = {}  # ū per reading layer's input channel
        self.rows_of: dict[str, dict[str, Tensor]] = {}  # "scale"/"shift" rows per gated name (reader or norm)

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        if graph is None:
            graph = pruning_graph(model, first_rows(on_model(inputs_of(next(iter(data))), model), 1))
        names = {m: n for n, m in model.named_modules()}
        self.reader_norms = {}
        for layer, name in names.items():
            norm = norm_after(graph, layer) if isinstance(layer, READERS) else None
            if norm is not None and getattr(layer, "groups", 1) == 1:
                self.reader_norms[name] = names[norm]
        self.readers = {n: ReaderStatistics.empty(model.get_submodule(n)) for n in self.reader_norms}
        self.rows_seen = 0
        self._gated_pass(model, data, names)
        for stats in self.readers.values():
            stats.all_reduced()

    def _gated_pass(self, model: nn.Module, data: Iterable[Any], names: dict[nn.Module, str]) -> None:
        """One pass: per-sample ∂s/∂γ and ∂s/∂β of the gates on every reader's input and every BatchNorm's output,
        the readers' input sums (ū) and the statistics of the readers followed by a BatchNorm."""
        gates: dict[str, list[tuple[Tensor, Tensor]]] = {}
        sums: dict[str, Tensor] = {}
        counts: dict[str, float] = {}
        batch_rows = [0]

        def gated(name: str, module: nn.Module, x: Tensor) -> Tensor:
            scale = torch.ones(gate_shape(module, x), dtype=x.dtype, device=x.device, requires_grad=True)
            shift = torch.zeros_like(scale, requires_grad=True)
            gates.setdefault(name, []).append((scale, shift))
            return x * scale + shift

        def before(name: str):
            def apply(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
                x = args[0] if args else None
                if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch_rows[0]:
                    return None
                total, count = channel_sums(module, x)
                sums[name] = sums.get(name, 0) + total
                counts[name] = counts.get(name, 0) + count
                return (gated(name, module, x), *args[1:])
            return apply

        def after(name: str):
            def apply(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
                if name in self.readers and isinstance(args[0], Tensor) and args[0].shape[:1] == out.shape[:1]:
                    self.readers[name].add(module, args[0], out)
                if isinstance(module, NORMS) and out.dim() > 0 and out.shape[0] == batch_rows[0]:
                    return gated(name, module, out)
                return None
            return apply

        handles = []
        for module, name in names.items():
            if isinstance(module, LAYERS):
                handles.append(module.register_forward_pre_hook(before(name)))
            if isinstance(module, NORMS) or name in self.readers:
                handles.append(module.register_forward_hook(after(name)))
        kept: dict[str, dict[str, list[Tensor]]] = {}
        batches = 0
        with self._pass_context(handles) as freeze:
            for index, batch in enumerate(data):
                x = on_model(inputs_of(batch), model)
                batch_rows[0] = rows(x)
                gates.clear()
                logits = predict(model, x).float()
                s = self.objective(logits, self._targets(index, x, logits, freeze), labels_of(batch))
                flat = [g for calls in gates.values() for pair in calls for g in pair]
                grads = iter(torch.autograd.grad(s.sum(), flat, allow_unused=True))
                for name, calls in gates.items():
                    scale = shift = 0
                    for gate, _ in calls:
                        ds, db = next(grads), next(grads)
                        scale = scale + (torch.zeros_like(gate) if ds is None else ds)
                        shift = shift + (torch.zeros_like(gate) if db is None else db)
                    entry = kept.setdefault(name, {"scale": [], "shift": []})
                    entry["scale"].append(scale.reshape(batch_rows[0], -1).detach().float().cpu())
                    entry["shift"].append(shift.reshape(batch_rows[0], -1).detach().float().cpu())
                self.rows_seen += batch_rows[0]
                batches += 1
            self._check_not_empty(batches)
        self._check_batch_count(batches)
        self.rows_of = {n: {k: torch.cat(v) for k, v in e.items()} for n, e in kept.items()}
        self.input_means = {}
        for name in sums:
            reduced = all_reduce_sum(torch.cat([sums[name], torch.tensor([float(counts[name])], dtype=torch.float64)]))
            self.input_means[name] = reduced[:-1] / reduced[-1].clamp(min=1.0)

    def _norm_terms(self, norm_name: str, norm: nn.Module) -> tuple[Tensor, Tensor] | None:
        """G (rows, channels), per-sample ∂s/∂λ_j for a gate λ on the BatchNorm's output γ_j x̂_j, and B, the rows
        of ∂s/∂β_j for a shift of its output."""
        rows_ = self.rows_of.get(norm_name)
        if rows_ is None:
            return None
        scale, shift = rows_["scale"].double(), rows_["shift"].double()
        bias = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(scale.shape[1])
        return scale - bias * shift, shift

    def _reader_derivatives(self, name: str, layer: nn.Module) -> Tensor | None:
        """d per input channel of one reading layer (rows, in channels): ∂s/∂γ − ū ∂s/∂β − (G κ + (γ/σ) B ν) when
        a BatchNorm follows it (recalibration restores the mean and rescales), else ∂s/∂γ (removal as such)."""
        rows_ = self.rows_of.get(name)
        if rows_ is None:
            return None
        d = rows_["scale"].double()
        norm_name = self.reader_norms.get(name)
        if norm_name is None:
            return d
        norm = self._model().get_submodule(norm_name)
        terms = self._norm_terms(norm_name, norm)
        u_mean = self.input_means[name]
        d = d - u_mean * rows_["shift"].double() if d.shape[1] == len(u_mean) else d
        if terms is None or name not in self.readers or not self.rescale:
            return d
        stats = self.readers[name]
        frozen = (norm.weight.detach().double().cpu() if norm.weight is not None else 1.0) / torch.sqrt(
            norm.running_var.detach().double().cpu() + norm.eps)
        coefficients = torch.cat([stats.kappa(layer.weight, norm.eps, u_mean),
                                  frozen[:, None] * stats.mean_shift(layer.weight, u_mean)])
        return d - torch.cat(terms, 1) @ coefficients

    def group_derivatives(self, group: Any) -> Tensor | None:
        """d (rows, root channels): Σ over the group's reading layers of their per-channel d, mapped to the roots."""
        names = self.module_names(group)
        total, seen = None, set()
        for item in group:
            dep, idxs = item.dep, item.idxs
            name = names.get(dep.target.module)
            if getattr(dep.handler, "__name__", "") != "prune_in_channels" or (name, tuple(idxs)) in seen:
                continue
            seen.add((name, tuple(idxs)))
            d = self._reader_derivatives(name, dep.target.module)
            pairs = [(int(r), int(c)) for r, c in zip(item.root_idxs, idxs) if r is not None]
            if d is None or not pairs or max(c for _, c in pairs) >= d.shape[1]:
                continue
            if total is None:
                total = torch.zeros(len(d), len(group[0].idxs), dtype=torch.float64)
            total.index_add_(1, torch.tensor([r for r, _ in pairs]), d[:, [c for _, c in pairs]])
        return total

    def _group_sums(self, group: Any) -> Tensor | None:
        d = self.group_derivatives(group)
        return None if d is None else (d ** 2).sum(0)
