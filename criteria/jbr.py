"""JBR: Jacobian-based removal scores from multiplicative channel gates, as a torch-pruning Importance.

Removing channel group g is the perturbation δw = −w_g; to first order δf = −J_g w_g. A gate γ_c multiplying a
channel's output (γ = 1) has ∂f/∂γ_c = J_c w_c, so the per-sample first-order effect of removing every channel
comes from one forward and one backward pass per batch, with gate tensors of shape (B, C, 1, 1) hooked onto the
outputs that disappear with the channel: a BatchNorm's output when a conv/linear feeds one (∂/∂γ = γ∂f/∂γ_bn +
β∂f/∂β_bn), else the conv/linear output (Σ over the channel's weights and bias of w·∂f/∂w).

* ``jbr`` scores group g by E_x[(m(x)ᵀ J_g(x) w_g)²], m(x) the one-hot predicted class of the dense model
  (``target="softmax"``: its probabilities), frozen at the first scoring pass.
* ``jbr-mac``: the same score divided by the MACs the channel's removal saves (global ranking by cost).
* ``jbr-batch`` (the reference implementation's variant): per batch, the gradient of the batch-mean
  cross-entropy against the frozen pseudo-labels (confidence > 0.9 only), squared, summed over batches.
* ``jacobian``: E_x[(∂ CE(f(x), y_true)/∂γ_g)²] with the true labels.

Coupled channels (residual additions, concatenations) are one torch-pruning group: their per-sample derivatives
are summed before squaring. Memory: one float32 per (row, gated channel) on the CPU, rows = calibration samples
(batches for ``jbr-batch``), e.g. 1024 samples × 26k channels (ResNet-50) ≈ 110 MB.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.data import inputs_of, labels_of
from compress.errors import CompressError

Objective = Literal["predicted", "softmax", "labels"]
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def gate_points(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose output channels vanish with a pruned channel: BNs fed by a conv/linear, other convs/linears."""
    from compress.fold import foldable_pairs

    try:
        pairs = foldable_pairs(model)
    except CompressError:  # untraceable model: gate every conv/linear output and every BN output
        pairs = []
    paired_layers = {layer for layer, _ in pairs}
    points = {}
    for name, m in model.named_modules():
        if isinstance(m, _NORMS) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                                     and name not in paired_layers):
            points[name] = m
    return points


def _gate_shape(module: nn.Module, out: Tensor) -> tuple[int, ...]:
    """(B, C, 1, ...) for channel-first outputs, (B, 1, ..., C) for linear outputs."""
    if isinstance(module, nn.Linear):
        return (out.shape[0],) + (1,) * (out.dim() - 2) + (out.shape[-1],)
    return tuple(out.shape[:2]) + (1,) * (out.dim() - 2)


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def is_out_channel_pruning(dep: Any) -> bool:
    return getattr(dep.handler, "__name__", "") == "prune_out_channels"


class GateImportance(tp.importance.Importance):
    """Scores = Σ_rows (Σ_{coupled gates} ∂s/∂γ)² / rows, from per-row gate derivatives cached per model structure.

    Call :meth:`prepare` (``criteria.prepare``) with the model about to be pruned and the calibration data before
    each pruning step; it recomputes only when the model's structure changed since the last pass.
    """

    def __init__(self, objective: Objective = "predicted", per_sample: bool = True, confidence: float = 0.0,
                 autocast: bool = True, per_mac: bool = False) -> None:
        if objective not in ("predicted", "softmax", "labels"):
            raise CompressError(f"unknown JBR target {objective!r}", "use 'predicted' or 'softmax'")
        self.objective, self.per_sample, self.confidence, self.autocast = objective, per_sample, confidence, autocast
        self.per_mac = per_mac  # divide each score by the MACs its removal saves
        self._layer_macs: dict[str, int] = {}
        self._frozen: list[Tensor] | None = None  # dense model's softmax per calibration batch
        self._fingerprint: tuple | None = None
        self._derivs: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}

    def reset(self) -> None:
        """Forget the frozen dense targets and the cached derivatives (a new dense model)."""
        self._frozen, self._fingerprint, self._derivs = None, None, {}

    def _scalar(self, logits: Tensor, batch_index: int, labels: Tensor | None) -> Tensor:
        """Per-sample objective s_b whose gate derivative is scored."""
        if self.objective == "labels":
            if labels is None:
                raise CompressError("the 'jacobian' criterion needs labelled calibration batches",
                                    "pass (input, label) batches, or use the label-free 'jbr'")
            return F.cross_entropy(logits, labels.to(logits.device), reduction="none")
        probs = self._frozen[batch_index].to(logits.device)
        if not self.per_sample:  # batch-mean cross-entropy on confident pseudo-labels
            confident, pseudo = probs.max(1)
            keep = (confident > self.confidence).to(logits.dtype)
            ce = F.cross_entropy(logits, pseudo, reduction="none")
            return ce * keep / keep.sum().clamp(min=1)
        weights = F.one_hot(probs.argmax(1), probs.shape[1]).to(logits.dtype) if self.objective == "predicted" else probs.to(logits.dtype)
        return (weights * logits).sum(1)  # m(x)ᵀ f(x)

    def prepare(self, model: nn.Module, data: Iterable[Any]) -> None:
        """One forward+backward per batch of ``data``: cache ∂s/∂γ for every gated channel (rows × channels)."""
        self._names = {id(m): n for n, m in model.named_modules()}
        fingerprint = _fingerprint(model)
        if fingerprint == self._fingerprint:
            return
        points = gate_points(model)
        gates: dict[str, Tensor] = {}

        def hook(name: str):
            def apply(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
                gate = torch.ones(_gate_shape(module, out), device=out.device, dtype=out.dtype, requires_grad=True)
                gates[name] = gate
                return out * gate
            return apply

        handles = [m.register_forward_hook(hook(n)) for n, m in points.items()]
        device = next(model.parameters()).device
        use_autocast = self.autocast and device.type == "cuda"
        rows: dict[str, list[Tensor]] = {n: [] for n in points}
        freeze = self._frozen is None
        frozen: list[Tensor] = []
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(data):
                x, labels = inputs_of(batch).to(device), labels_of(batch)
                gates.clear()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    logits = model(x).float()
                if freeze:
                    frozen.append(logits.detach().softmax(1).cpu())
                    self._frozen = frozen
                elif i >= len(self._frozen):
                    raise CompressError("calibration data has more batches than when the dense targets were frozen",
                                        "pass the same calibration data at every pruning step")
                s = self._scalar(logits, i, labels)
                names = list(gates)
                grads = torch.autograd.grad(s.sum(), [gates[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    g = torch.zeros_like(gates[n]) if g is None else g
                    g = g.reshape(g.shape[0], -1).float()
                    rows[n].append((g if self.per_sample else g.sum(0, keepdim=True)).cpu())
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if not any(rows.values()):
            raise CompressError("JBR got no calibration batches", "pass a non-empty calibration set")
        if self.per_mac:
            from compress.plan import layer_macs

            self._layer_macs = layer_macs(model, x[:1])
        if not self.per_sample and self.objective == "predicted" and not any(
                bool((p.max(1).values > self.confidence).any()) for p in self._frozen):
            raise CompressError(f"no calibration sample has confidence > {self.confidence}, so jbr-batch has nothing to score",
                                "lower its confidence option or use 'jbr'")
        self._derivs = {n: torch.cat(r) for n, r in rows.items() if r}
        self._fingerprint = fingerprint

    def row_derivatives(self, group: Any) -> Tensor | None:
        """(rows, len(group idxs)): per-row ∂s/∂γ summed over the group's coupled gated layers."""
        total, seen = None, set()
        for i, (dep, idxs) in enumerate(group):
            if not is_out_channel_pruning(dep):
                continue
            name = self._names.get(id(dep.target.module))
            if name not in self._derivs or (name, tuple(idxs)) in seen:
                continue
            seen.add((name, tuple(idxs)))
            d = self._derivs[name][:, list(idxs)]
            if total is None:
                total = torch.zeros(d.shape[0], len(group[0].idxs))
            total[:, list(group[i].root_idxs)] += d
        return total

    def macs_saved(self, group: Any) -> Tensor:
        """MACs (per sample) removed with each root channel: its share of every conv/linear whose output or input
        channels the group prunes (Cout·Cin/groups·k·HW_out split evenly over the pruned dimension)."""
        saved = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        seen = set()
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            name = self._names.get(id(layer))
            if name not in self._layer_macs or (name, dep.handler.__name__) in seen:
                continue
            seen.add((name, dep.handler.__name__))
            out_dim = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
            in_dim = layer.in_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.in_features
            if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.groups == in_dim:
                in_dim = out_dim = layer.groups  # depthwise: one channel removes one filter either way
            per_channel = self._layer_macs[name] / (out_dim if is_out_channel_pruning(dep) else in_dim)
            saved[list(group[i].root_idxs)] += per_channel
        return saved

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        if self._fingerprint is None:
            raise CompressError("JBR scores were requested before any calibration pass",
                                "call criteria.prepare(importance, model, data) before pruner.step()")
        d = self.row_derivatives(group)
        if d is None:
            return None
        score = (d.double() ** 2).mean(0) if self.per_sample else (d.double() ** 2).sum(0)
        if self.per_mac:
            score = score / self.macs_saved(group).clamp(min=1.0)
        return score.float()


def jbr(target: Objective = "predicted", autocast: bool = True) -> GateImportance:
    """Exact per-sample JBR: E_x[(m(x)ᵀ J_g(x) w_g)²]."""
    return GateImportance(target, per_sample=True, autocast=autocast)


def jbr_per_mac(target: Objective = "predicted", autocast: bool = True) -> GateImportance:
    """JBR per MAC saved: E_x[(m(x)ᵀ J_g(x) w_g)²] / ΔMACs_g, so a global ranking weighs damage against cost."""
    return GateImportance(target, per_sample=True, autocast=autocast, per_mac=True)


def jbr_batch(confidence: float = 0.9, autocast: bool = True) -> GateImportance:
    """Batch-gradient JBR: Σ_batches (∂ mean CE(f, pseudo-labels with confidence > ``confidence``)/∂γ_g)²."""
    return GateImportance("predicted", per_sample=False, confidence=confidence, autocast=autocast)


def jacobian(autocast: bool = True) -> GateImportance:
    """Supervised gate criterion: E_x[(∂ CE(f(x), y)/∂γ_g)²] with the true labels y."""
    return GateImportance("labels", per_sample=True, autocast=autocast)
