"""JBR: Jacobian-based removal scores from multiplicative channel gates, as torch-pruning Importances.

Removing channel group g is the perturbation δw = −w_g; to first order δf = −J_g w_g (f the logits). A gate γ_c
multiplying a channel's output (γ = 1) has ∂f/∂γ_c = J_c w_c, so the per-sample first-order effect of removing
every channel comes from one forward and one backward pass per batch, with gate tensors of shape (B, C, 1, 1)
hooked onto the output that disappears with the channel: a BatchNorm's output when a conv/linear feeds it
(∂/∂γ = γ_bn·∂f/∂γ_bn + β_bn·∂f/∂β_bn), else the conv/linear output (Σ over the channel's weights and bias of
w·∂f/∂w). The model runs in eval mode, so BatchNorm does not couple the samples of a batch. Coupled channels
(residual additions, concatenations: several layers in one torch-pruning group) are removed together, so their
per-sample derivatives are summed before squaring.

* :class:`JBRImportance` (``jbr``): E_x[(m(x)ᵀ J_g(x) w_g)²], m(x) the one-hot predicted class of the dense model
  (``target="softmax"``: its probabilities), frozen at the first (dense) pass.
* ``jbr-mac``: the same with the ``"macs"`` normaliser (:mod:`criteria.normalize`): divided by the MACs the
  channel's removal saves.
* :class:`JBRBatchImportance` (``jbr-batch``, the reference implementation): Σ_batches (∂L_b/∂γ_g)², L_b the
  batch-mean cross-entropy against the frozen pseudo-labels of the samples with dense confidence > 0.9.
* :class:`JacobianImportance` (``jacobian``): E_x[(∂CE(f(x), y)/∂γ_g)²] with the true labels y.

Caching: the derivatives of all gated channels come from ONE pass over the calibration data and are reused until
the scored model's structure (parameter names and shapes, :func:`fingerprint`) changes, so a pruning step scores
every group from one pass and the next step re-scores. Inside any torch-pruning pruner the model is found from
the group's dependency graph, so ``JBRImportance(data)`` needs no further call; ``prepare(model, data)`` runs the
pass eagerly. The calibration data must yield the same samples in the same order at every pass (checked by a
checksum per batch), since m(x) is stored per sample.

torch.distributed: each rank scores its shard of the calibration data; the per-group sums of squares and sample
counts are summed across ranks (one all-reduce per scored group), so the scores are the union's.

Memory: the groups of the model are taken from its dependency graph before the pass, and each batch's
derivatives are added into one float64 per root channel (Σ_rows (Σ_coupled ∂s/∂γ)²), so memory does not grow
with the calibration set (ResNet-50: ~27k channels, 0.2 MB); plus the dense model's frozen class and confidence,
12 bytes per sample (the whole softmax, 4 bytes per class and sample, only for ``target="softmax"``), and during a
pass one batch's autograd graph on the model's device.
``keep_rows=True`` also keeps one float32 per (row, gated channel) on the CPU (1024 samples × 27.6k ≈ 113 MB).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.adapters import adapter_for
from compress.batches import first_rows, map_tensors, predict, rows, tensors
from compress.data import inputs_of, labels_of
from compress.distributed import all_reduce_sum
from compress.errors import CompressError
from compress.nn_helpers import channel_sums, fingerprint, model_device, on_model
from compress.quiet import quiet_third_party  # fingerprint: also re-exported as criteria.jbr.fingerprint

from .calibrated import CalibratedImportance  # re-exported: criteria.jbr.CalibratedImportance

Target = Literal["predicted", "softmax"]
NORMS = (nn.modules.batchnorm._BatchNorm,)
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def is_out_channel_pruning(dep: Any) -> bool:
    """Whether a group item removes output channels (torch-pruning names every such handler prune_out_channels)."""
    return getattr(dep.handler, "__name__", "") == "prune_out_channels"


def norm_after(graph: tp.DependencyGraph, layer: nn.Module) -> nn.Module | None:
    """The BatchNorm ``layer`` feeds, when it feeds exactly one and nothing else (and that norm reads nothing else)."""
    node = graph.module2node.get(layer)
    if node is None or len(node.outputs) != 1:
        return None
    norm = node.outputs[0]
    return norm.module if isinstance(norm.module, NORMS) and len(norm.inputs) == 1 else None


def pruning_graph(model: nn.Module, example: Any) -> tp.DependencyGraph:
    """The dependency graph the model's adapter prunes with, traced on ``example``."""
    adapter = adapter_for(model)
    return adapter.pruning_graph(model, adapter.dependency_graph(model, example))


def gate_points(model: nn.Module, graph: tp.DependencyGraph) -> dict[str, nn.Module]:
    """Modules gated on their output: every BatchNorm, and every conv/linear unless it feeds exactly one BatchNorm
    and nothing else (that BN's output is the one that vanishes with the channel)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, NORMS) or (isinstance(m, LAYERS) and norm_after(graph, m) is None)}


def gate_shape(module: nn.Module, out: Tensor) -> tuple[int, ...]:
    """(B, C, 1, ...) for channel-first outputs, (B, 1, ..., C) for linear outputs."""
    if isinstance(module, nn.Linear):
        return (out.shape[0],) + (1,) * (out.dim() - 2) + (out.shape[-1],)
    return tuple(out.shape[:2]) + (1,) * (out.dim() - 2)


@dataclass(frozen=True)
class FrozenPredictions:
    """What the dense model predicted for one calibration batch: class and confidence (max softmax) per sample,
    and the whole softmax only for objectives that weigh every class (one float per class and sample)."""

    classes: Tensor  # (B,) long
    confidence: Tensor  # (B,) float32
    probabilities: Tensor | None = None  # (B, classes) float32

    def to(self, device: torch.device) -> "FrozenPredictions":
        return FrozenPredictions(self.classes.to(device), self.confidence.to(device),
                                 None if self.probabilities is None else self.probabilities.to(device))

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.classes, self.confidence, self.probabilities) if t is not None)


GroupKey = tuple[str, str, int]  # (root layer name, torch-pruning handler name, root channels)


def group_key(group: Any, names: dict[nn.Module, str]) -> GroupKey:
    """What identifies a channel group across dependency graphs of one model: its root layer, how it is pruned
    there, and its number of root channels."""
    root = group[0].dep
    return names.get(root.target.module, ""), getattr(root.handler, "__name__", ""), len(group[0].idxs)


@dataclass
class _GroupPlan:
    """Where a group's coupled derivatives are in a batch row: column ``columns[i]`` adds into root ``roots[i]``;
    ``left[j]``, ``right[j]``: the pairs of positions in ``columns`` that add into the same root (centred scores)."""

    columns: Tensor
    roots: Tensor
    width: int
    left: Tensor
    right: Tensor


def _plan(columns: list[int], roots: list[int], width: int, pairs: bool) -> _GroupPlan:
    """The plan of a group; with ``pairs`` (centred scores) also its same-root column pairs."""
    by_root: dict[int, list[int]] = {}
    for position, root in enumerate(roots):
        by_root.setdefault(root, []).append(position)
    same_root = [(i, j) for positions in by_root.values() for i in positions for j in positions] if pairs else []
    left = torch.tensor([i for i, _ in same_root], dtype=torch.long)
    right = torch.tensor([j for _, j in same_root], dtype=torch.long)
    return _GroupPlan(torch.tensor(columns), torch.tensor(roots), width, left, right)


class GateImportance(CalibratedImportance):
    """Scores from per-row gate derivatives ∂s/∂γ_c (γ = 1) of a per-sample objective s, summed over the coupled
    gated layers of a group, squared, then averaged over samples (``per_sample``) or summed over batches.

    When the groups to score are known before the pass (``scored_groups_ignoring`` set to the pruner's ignored
    layers, as :func:`compress.prune` does through ``criteria.prepare(..., ignored_layers=...)``), the pass
    accumulates Σ_rows (Σ_coupled ∂s/∂γ)² per group batch by batch: memory is one float64 per root channel,
    whatever the number of calibration samples. Otherwise (any torch-pruning pruner, whose ignored layers the
    criterion cannot see: enumerating every group of a transformer's graph can take more memory than the rows),
    or with ``keep_rows=True``, it keeps every row (``derivatives``, (rows, gated channels) float32 CPU;
    ``columns[name]`` a module's columns) and sums a group's rows when the group is scored.
    ``autocast``: on CUDA, run the pass under bf16 autocast with float32 gates (so the per-channel reductions of
    the derivatives are float32); otherwise the gates take each output's dtype.

    ``centred``: the gate point's output a becomes γ·a + β, and a row holds ∂s/∂γ − μ·∂s/∂β = Σ_positions
    (a − μ)·∂s/∂a, μ the channel's mean output over the calibration samples and positions (``output_means``):
    the first-order effect of replacing the channel by its mean. μ is known only after the pass, so the pass
    accumulates the moments Σ a², Σ a·∂s/∂β_k and Σ ∂s/∂β_k·∂s/∂β_k' (k, k' coupled into one root channel, a
    the coupled sum of ∂s/∂γ) and the score expands the square; with kept rows it keeps the ∂s/∂β rows too.
    """

    centred = False

    per_sample = True  # rows are samples; False: rows are batches (gate gradients summed over the batch)
    uses_dense_targets = True  # freeze the dense model's predictions per calibration sample
    uses_probabilities = False  # ... including its whole softmax

    def __init__(self, data: Iterable[Any] | None = None, *, autocast: bool = True, keep_rows: bool = False) -> None:
        super().__init__(data)
        self.autocast = autocast
        self.keep_rows = keep_rows
        self.scored_groups_ignoring: list[nn.Module] | None = None  # the pruner's ignored layers, when known
        self.extra_groups: list[Any] = []  # groups from outside the graph scored as well (attention heads)
        self.derivatives: Tensor | None = None
        self.columns: dict[str, slice] = {}
        self.shift_derivatives: Tensor | None = None  # centred: the kept rows of ∂s/∂β
        self.output_means: Tensor | None = None  # centred: μ per gated channel (column), float64
        self.moments: dict[GroupKey, list[Tensor]] = {}  # per group, float64: [Σ_rows (Σ_coupled ∂s/∂γ)²] (+ centred's)
        self.plans: dict[GroupKey, _GroupPlan] = {}
        self.rows_seen = 0  # samples (or batches) behind ``moments``
        self.dense_targets: list[FrozenPredictions] | None = None  # per calibration batch, on the CPU
        self._checksums: list[float] = []
        self.example_input: Tensor | None = None

    @property
    def state_bytes(self) -> int:
        """Bytes kept between passes: kept rows and per-group moments (the frozen dense targets excluded)."""
        kept = [t for t in (self.derivatives, self.shift_derivatives) if t is not None]
        return sum(t.nbytes for t in kept) + sum(m.nbytes for ms in self.moments.values() for m in ms)

    def reset(self) -> None:
        """Forget the frozen dense targets and the cache (to score a different dense model)."""
        self.derivatives, self.columns, self.moments, self.dense_targets, self._checksums = None, {}, {}, None, []
        self.shift_derivatives = self.output_means = None
        self.invalidate()

    def objective(self, logits: Tensor, targets: FrozenPredictions | None, labels: Tensor | None) -> Tensor:
        """s for a batch: per-sample values (B,), or one scalar for the batch when not ``per_sample``."""
        raise NotImplementedError

    def _targets(self, index: int, x: Tensor, logits: Tensor, freeze: bool) -> FrozenPredictions | None:
        """The dense model's predictions for batch ``index``: frozen at the first pass, checked against ``x``
        later."""
        if not self.uses_dense_targets:
            return None
        checksum = sum(float(t.detach().double().sum()) for t in tensors(x))
        if freeze:
            probabilities = logits.detach().float().softmax(1).cpu()
            confidence, classes = probabilities.max(1)
            self.dense_targets.append(FrozenPredictions(classes, confidence,
                                                        probabilities if self.uses_probabilities else None))
            self._checksums.append(checksum)
        elif (index >= len(self.dense_targets) or len(self.dense_targets[index]) != rows(x)
              or abs(checksum - self._checksums[index]) > 1e-6 * (1.0 + abs(self._checksums[index]))):
            raise CompressError("the calibration data differs from the pass that froze the dense model's predictions",
                                "pass the same calibration data, in a fixed order, at every pruning step "
                                "(or call reset() to score a new dense model)")
        return self.dense_targets[index].to(logits.device)

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        """One pass: the groups of ``graph`` (the model's pruning graph when None), then every batch's rows
        accumulated into their groups' sums."""
        plans: dict[GroupKey, _GroupPlan] = {}
        ignored = self.scored_groups_ignoring

        def plan_groups(graph: tp.DependencyGraph) -> None:
            if ignored is None:
                return  # rows are kept instead
            with quiet_third_party():
                groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS))
            plans.update(self._plans(groups + self.extra_groups, graph._module2name))

        self.moments, self.plans, self.rows_seen = {}, {}, 0
        self._pass(model, data, graph, plan_groups, plans, keep_rows=self.keep_rows or ignored is None)

    def _plans(self, groups: Iterable[Any], names: dict[nn.Module, str]) -> dict[GroupKey, _GroupPlan]:
        """Each group's columns in a batch row and the root channels they add into (groups without gated layers
        have none)."""
        plans = {}
        for group in groups:
            columns, roots, seen = [], [], set()
            for item in group:
                dep, idxs = item.dep, item.idxs
                name = names.get(dep.target.module)
                if not is_out_channel_pruning(dep) or name not in self.columns or (name, tuple(idxs)) in seen:
                    continue
                seen.add((name, tuple(idxs)))
                for root, local in zip(item.root_idxs, idxs):
                    if root is not None:
                        columns.append(self.columns[name].start + int(local))
                        roots.append(int(root))
            if columns:
                plans[group_key(group, names)] = _plan(columns, roots, len(group[0].idxs), self.centred)
        return plans

    def _accumulate(self, row: Tensor, plans: dict[GroupKey, _GroupPlan], shift_row: Tensor | None = None) -> None:
        """Add one batch's rows (B, gated channels) to every planned group's Σ (Σ_coupled ∂s/∂γ)²; with the
        rows of ∂s/∂β (``centred``) also the moments Σ a·∂s/∂β_k and Σ ∂s/∂β_k·∂s/∂β_k' (k, k' of one root)."""
        values = row.double()
        shifts = None if shift_row is None else shift_row.double()
        for key, plan in plans.items():
            total = torch.zeros(len(values), plan.width, dtype=torch.float64).index_add_(1, plan.roots,
                                                                                         values[:, plan.columns])
            moments = [(total ** 2).sum(0)]  # rows: samples, or batch sums when not per_sample
            if shifts is not None:
                b = shifts[:, plan.columns]
                moments += [(total[:, plan.roots] * b).sum(0), (b[:, plan.left] * b[:, plan.right]).sum(0)]
            previous = self.moments.get(key)
            self.moments[key] = moments if previous is None else [p + m for p, m in zip(previous, moments)]
            self.plans[key] = plan

    def _pass(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None,
              plan_groups: Any, plans: dict[GroupKey, _GroupPlan], keep_rows: bool) -> None:
        """Run the gated model over ``data``; after the first batch (when the gated widths are known) call
        ``plan_groups(graph)``, then accumulate every batch into ``plans`` (and keep the rows if ``keep_rows``)."""
        device = model_device(model)
        use_autocast = self.autocast and device.type == "cuda"
        gates: dict[str, list[Tensor]] = {}
        shifts: dict[str, list[Tensor]] = {}  # centred: the additive gates β
        output_sums: dict[str, Tensor] = {}  # centred: Σ of each channel's output over samples and positions
        output_counts: dict[str, int] = {}

        def hook(name: str):
            def apply(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
                if out.dim() == 0 or out.shape[0] != batch_rows[0]:
                    return out  # not one row per sample (Swin V2's position-bias MLP): nothing to score per sample
                dtype = torch.promote_types(out.dtype, torch.float32) if use_autocast else out.dtype
                shape = gate_shape(module, out)
                gate = torch.ones(shape, device=out.device, dtype=dtype, requires_grad=True)
                gates.setdefault(name, []).append(gate)  # a module called twice gets one gate per call
                if not self.centred:
                    return out * gate
                shift = torch.zeros(shape, device=out.device, dtype=dtype, requires_grad=True)
                shifts.setdefault(name, []).append(shift)
                total, count = channel_sums(module, out)
                output_sums[name] = output_sums.get(name, 0) + total
                output_counts[name] = output_counts.get(name, 0) + count
                return out * gate + shift
            return apply

        handles: list[Any] = []
        batch_rows = [0]  # the samples of the batch being run
        widths: dict[str, int] = {}
        kept_rows: list[Tensor] = []
        batches = 0
        with self._pass_context(handles) as freeze:
            for index, batch in enumerate(data):
                x = on_model(inputs_of(batch), model)
                if index == 0:
                    self.example_input = map_tensors(first_rows(x, 1), torch.Tensor.detach)
                    if graph is None:
                        graph = pruning_graph(model, self.example_input)
                    handles += [m.register_forward_hook(hook(n)) for n, m in gate_points(model, graph).items()]
                gates.clear()
                batch_rows[0] = rows(x)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    logits = predict(model, x)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                s = self.objective(logits, self._targets(index, x, logits, freeze), labels_of(batch))
                names = list(gates)
                flat = [g for n in names for g in gates[n]] + [b for n in names for b in shifts.get(n, [])]
                grads = iter(torch.autograd.grad(s.sum(), flat, allow_unused=True))
                per_name = self._per_name(gates, grads, batch_rows[0])
                if index == 0:
                    widths = {n: d.shape[1] for n, d in per_name.items()}
                    starts = torch.tensor([0] + list(widths.values())).cumsum(0).tolist()
                    self.columns = {n: slice(a, b) for n, a, b in zip(widths, starts[:-1], starts[1:])}
                    plan_groups(graph)
                row = self._row(per_name, widths, batch_rows[0], device)
                shift_row = self._row(self._per_name(shifts, grads, batch_rows[0]), widths, batch_rows[0],
                                      device) if self.centred else None
                self._accumulate(row, plans, shift_row)
                self.rows_seen += len(row)
                batches += 1
                if keep_rows:
                    kept_rows.append(row if shift_row is None else torch.stack([row, shift_row]))
            self._check_not_empty(batches)
        self._check_batch_count(batches)
        if self.centred:
            self.output_means = self._means(widths, output_sums, output_counts)
        kept = torch.cat(kept_rows, -2) if keep_rows else None
        self.derivatives, self.shift_derivatives = (kept[0], kept[1]) if keep_rows and self.centred else (kept, None)

    @contextmanager
    def _pass_context(self, handles: list[Any]) -> Iterator[bool]:
        """Around one calibration pass: yields whether it freezes the dense model's predictions (the first pass),
        forgets them again if the pass fails, and removes the pass's hooks (``handles``, filled by the pass)."""
        freeze = self.uses_dense_targets and self.dense_targets is None
        if freeze:
            self.dense_targets, self._checksums = [], []
        try:
            yield freeze
        except BaseException:
            if freeze:
                self.dense_targets = None
            raise
        finally:
            for h in handles:
                h.remove()

    def _check_not_empty(self, batches: int) -> None:
        if batches == 0:
            raise CompressError(f"{type(self).__name__} got no calibration batches", "pass a non-empty calibration set")

    def _check_batch_count(self, batches: int) -> None:
        if self.dense_targets is not None and len(self.dense_targets) != batches:
            raise CompressError("the calibration data has fewer batches than when the dense predictions were frozen",
                                "pass the same calibration data at every pruning step")

    @staticmethod
    def _per_name(gates: dict[str, list[Tensor]], grads: Iterator[Tensor | None], batch_rows: int) -> dict[str, Tensor]:
        """The next gradients of ``grads``, one per gate of ``gates``, summed over a module's calls: (B, channels)."""
        per_name = {}
        for n, calls in gates.items():
            total = sum((torch.zeros_like(g) if d is None else d) for g, d in zip(calls, grads))
            per_name[n] = total.reshape(batch_rows, -1)
        return per_name

    def _row(self, per_name: dict[str, Tensor], widths: dict[str, int], batch_rows: int,
             device: torch.device) -> Tensor:
        """One batch's rows (B, gated channels) in column order (one row per batch when not ``per_sample``)."""
        row = torch.cat([per_name[n] if n in per_name else torch.zeros(batch_rows, w, device=device)
                         for n, w in widths.items()], 1)
        return (row if self.per_sample else row.sum(0, keepdim=True)).to("cpu", torch.float32)

    @staticmethod
    def _means(widths: dict[str, int], sums: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        """μ per column: each gated channel's mean output over the samples (of every rank) and positions."""
        total = torch.cat([sums[n] if n in sums else torch.zeros(w, dtype=torch.float64) for n, w in widths.items()])
        count = torch.cat([torch.full((w,), float(counts.get(n, 0)), dtype=torch.float64) for n, w in widths.items()])
        reduced = all_reduce_sum(torch.cat([total, count]))
        return reduced[:len(total)] / reduced[len(total):].clamp(min=1.0)

    def group_derivatives(self, group: Any) -> Tensor | None:
        """(rows, root channels) float64: Σ over the group's gated out-channel layers of ∂s/∂γ, mapped to root idxs;
        None when no layer of the group is gated. Needs ``keep_rows=True``."""
        if self.derivatives is None:
            raise CompressError(f"{type(self).__name__} keeps no per-sample rows", "construct it with keep_rows=True")
        plan = self._plans([group], self.module_names(group)).get(group_key(group, self.module_names(group)))
        if plan is None:
            return None
        values = self.derivatives[:, plan.columns].double()
        if self.centred:
            values = values - self.output_means[plan.columns] * self.shift_derivatives[:, plan.columns].double()
        return torch.zeros(len(self.derivatives), plan.width, dtype=torch.float64).index_add_(1, plan.roots, values)

    def _squares(self, key: GroupKey) -> Tensor:
        """Σ_rows (Σ_coupled ∂s/∂γ)² of a planned group; ``centred``: Σ_rows (a − Σ_k μ_k ∂s/∂β_k)² from the moments."""
        moments = self.moments[key]
        if not self.centred:
            return moments[0]
        plan, mu = self.plans[key], self.output_means[self.plans[key].columns]
        cross = torch.zeros(plan.width, dtype=torch.float64).index_add_(0, plan.roots, mu * moments[1])
        pairs = torch.zeros(plan.width, dtype=torch.float64).index_add_(
            0, plan.roots[plan.left], mu[plan.left] * mu[plan.right] * moments[2])
        return (moments[0] - 2 * cross + pairs).clamp(min=0.0)

    def _group_sums(self, group: Any) -> Tensor | None:
        """Σ_rows (Σ_coupled ∂s/∂γ)² of ``group``: planned before the pass, else from the kept rows, else (a group
        with another root than planned) from one more pass of its own."""
        names = self.module_names(group)
        key = group_key(group, names)
        if key in self.moments:
            return self._squares(key)
        if self.derivatives is not None:
            d = self.group_derivatives(group)
            return None if d is None else (d ** 2).sum(0)
        plans = self._plans([group], names)
        if not plans:
            return None
        model = self._model()
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                seen = self.rows_seen
                self._pass(model, self.data, None, lambda _graph: None, plans, keep_rows=False)
                self.rows_seen = seen
        finally:
            model.train(was_training)
        return self._squares(key) if key in self.moments else None

    @torch.no_grad()
    def score(self, group: Any) -> Tensor | None:
        """Σ_rows (Σ_coupled ∂s/∂γ)², divided by the number of samples when ``per_sample``; under torch.distributed
        the sums and counts of all ranks (each on its shard), so every rank gets the union's scores."""
        sums = self._group_sums(group)
        if sums is None:
            return None
        total = all_reduce_sum(torch.cat([sums, torch.tensor([float(self.rows_seen)], dtype=torch.float64)]))
        return (total[:-1] / total[-1] if self.per_sample else total[:-1]).float()


class JBRImportance(GateImportance):
    """Exact per-sample JBR: E_x[(m(x)ᵀ J_g(x) w_g)²], the gate derivative of s(x) = m(x)ᵀ f(x).

    ``target="predicted"``: m(x) the one-hot predicted class of the dense model; ``"softmax"``: its probabilities.
    ``centred=True`` (``jbr-centred``): E_x[(m(x)ᵀ J_g (a_g(x) − μ_g))²], the TPV of removing the channel and
    replacing it by its mean output μ_g, which is what BatchNorm recalibration or mean replacement
    (``prune(..., mean_replacement=True)``) recover; see :class:`GateImportance`.
    """

    def __init__(self, data: Iterable[Any] | None = None, *, target: Target = "predicted", centred: bool = False,
                 autocast: bool = True, keep_rows: bool = False) -> None:
        if target not in ("predicted", "softmax"):
            raise CompressError(f"unknown JBR target {target!r}", "use target='predicted' or target='softmax'")
        super().__init__(data, autocast=autocast, keep_rows=keep_rows)
        self.target = target
        self.centred = centred

    @property
    def uses_probabilities(self) -> bool:  # type: ignore[override]
        return self.target == "softmax"

    def objective(self, logits: Tensor, targets: FrozenPredictions | None, labels: Tensor | None) -> Tensor:
        if self.target == "predicted":
            return logits.gather(1, targets.classes[:, None])[:, 0]
        return (targets.probabilities.to(logits.dtype) * logits).sum(1)


class JBRBatchImportance(GateImportance):
    """Batch-gradient JBR (reference implementation): Σ_batches (∂L_b/∂γ_g)², L_b the mean cross-entropy of the
    batch's samples whose dense confidence max softmax > ``confidence`` against their frozen predicted classes."""

    per_sample = False

    def __init__(self, data: Iterable[Any] | None = None, *, confidence: float = 0.9, autocast: bool = True,
                 keep_rows: bool = False) -> None:
        super().__init__(data, autocast=autocast, keep_rows=keep_rows)
        self.confidence = confidence

    def objective(self, logits: Tensor, targets: FrozenPredictions | None, labels: Tensor | None) -> Tensor:
        confident, pseudo = targets.confidence, targets.classes
        keep = (confident > self.confidence).to(logits.dtype)
        return (F.cross_entropy(logits, pseudo, reduction="none") * keep).sum() / keep.sum().clamp(min=1)

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        super()._calibrate(model, data, graph)
        confident = sum(int((t.confidence > self.confidence).sum()) for t in self.dense_targets)
        if not all_reduce_sum(torch.tensor([confident])).item():
            raise CompressError(f"no calibration sample has dense confidence > {self.confidence}, so jbr-batch has "
                                "nothing to score", "lower its confidence option or use 'jbr'")


class JacobianImportance(GateImportance):
    """Supervised gate criterion: E_x[(∂CE(f(x), y)/∂γ_g)²] with the true labels y of the calibration batches."""

    uses_dense_targets = False

    def objective(self, logits: Tensor, targets: FrozenPredictions | None, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise CompressError("the 'jacobian' criterion needs labelled calibration batches",
                                "pass (input, label) batches, or use the label-free 'jbr'")
        return F.cross_entropy(logits, labels.to(logits.device), reduction="none")
