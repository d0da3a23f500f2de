"""One registry of pruning criteria by name; each is a torch-pruning Importance, so every pruner can use it.

Criteria that need data (``Criterion.uses_data``) are :class:`~criteria.calibrated.CalibratedImportance` objects:
they take calibration ``data`` at construction or through :func:`prepare`, run their passes when a group of a model
with a new structure is scored, and cache the result per structure. The gradient baselines are label-free:
``taylor`` uses the gradient of the cross-entropy against the model's own predicted classes, ``hessian`` the mean
of its per-sample squared gradients (OBD with the Fisher diagonal). Magnitude criteria need nothing.

:func:`register` adds a criterion from outside the toolkit; every lookup here (``names``, ``describe``, ``get``,
``uses_data``, ``needs_labels``, ``NEEDS_LABELS``) sees it at once.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.batches import map_tensors, predict, predict_with, rows, split_rows
from compress.data import inputs_of
from compress.distributed import all_reduce_sum, all_reduce_sums
from compress.errors import CompressError
from compress.nn_helpers import on_model

from .allocated import AllocatedImportance
from .calibrated import CalibratedImportance
from .jbr import GateImportance, JacobianImportance, JBRBatchImportance, JBRImportance
from .jbr_recal import RecalibratedJBRImportance
from .jbr_ref import JBRReferenceImportance
from .normalize import DEFAULT_NORMALIZER, NormalizedImportance, check_normalizer

PER_SAMPLE_FLOATS = 1 << 26  # per-sample gradients held at once by the hessian pass (256 MB of float32)


def _own_prediction_loss(logits: Tensor, reduction: str = "mean") -> Tensor:
    """CE(f(x), argmax f(x)): the label-free loss of the gradient baselines."""
    return F.cross_entropy(logits, logits.detach().argmax(1), reduction=reduction)


class _GradientStatistic(CalibratedImportance):
    """A per-parameter statistic from calibration passes, written into ``p.grad`` of the scored model, where
    torch-pruning's gradient importances read it."""

    def _calibrate(self, model: nn.Module, data: Iterable[Any], graph: tp.DependencyGraph | None) -> None:
        self.statistics = self._statistics(model, data)

    def _apply(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.grad = self.statistics[n].clone() if n in self.statistics else torch.zeros_like(p)

    def _statistics(self, model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
        raise NotImplementedError


class TaylorImportance(_GradientStatistic, tp.importance.GroupTaylorImportance):
    """torch-pruning's group Taylor score Σ|w·∂L/∂w| (BatchNorm never scored: see its prune_groupnorm branch),
    L = Σ_batches mean CE(f(x), argmax f(x)) of the model being pruned."""

    def __init__(self, data: Iterable[Any] | None = None, **options: Any) -> None:
        tp.importance.GroupTaylorImportance.__init__(self, **{"normalizer": None, **options})
        CalibratedImportance.__init__(self, data)

    score = tp.importance.GroupTaylorImportance.__call__  # scoring; __call__ (CalibratedImportance) refreshes first

    def _statistics(self, model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for batch in data:
            loss = _own_prediction_loss(predict(model, on_model(inputs_of(batch), model)))
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    sums[n] += g
            count += 1
        if count == 0:
            raise CompressError("the taylor criterion got no calibration batches", "pass a non-empty calibration set")
        return all_reduce_sums(sums)  # under torch.distributed: Σ over every rank's batches


class HessianImportance(_GradientStatistic, tp.importance.GroupHessianImportance):
    """torch-pruning's OBD score Σ w²·E_x[(∂ℓ_x/∂w)²] (Fisher diagonal), ℓ_x = CE(f(x), argmax f(x)) per sample.

    torch-pruning documents a loop of one backward per sample into ``accumulate_grad``; in 1.6.1 that method tests
    ``name in self._accu_grad`` but stores by parameter, so it keeps only the last sample. The same per-sample
    squared gradients are computed here with ``torch.func`` (vmap of grad, ``PER_SAMPLE_FLOATS`` at a time), or
    with the per-sample loop when ``vectorize=False`` or when the model cannot be vmapped."""

    def __init__(self, data: Iterable[Any] | None = None, *, vectorize: bool = True, **options: Any) -> None:
        tp.importance.GroupHessianImportance.__init__(self, **{"normalizer": None, **options})
        CalibratedImportance.__init__(self, data)
        self.vectorize = vectorize

    score = tp.importance.GroupHessianImportance.__call__

    def _statistics(self, model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        squares = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for batch in data:
            x = on_model(inputs_of(batch), model)
            for n, sq in self._squared_gradients(model, params, x).items():
                squares[n] += sq
            count += rows(x)
        if count == 0:
            raise CompressError("the hessian criterion got no calibration batches", "pass a non-empty calibration set")
        self._accu_grad, self._counter = {}, {}  # nothing for torch-pruning's own accumulation to write over p.grad
        squares = all_reduce_sums(squares)  # under torch.distributed: every rank's samples
        count = int(all_reduce_sum(torch.tensor([count])).item())
        return {n: s / count for n, s in squares.items()}

    def _squared_gradients(self, model: nn.Module, params: dict[str, nn.Parameter], x: Any) -> dict[str, Tensor]:
        """Σ over the samples of x of (∂ℓ_x/∂w)² per parameter."""
        if self.vectorize:
            try:
                return self._vmapped(model, params, x)
            except RuntimeError:  # data-dependent control flow, in-place ops on buffers, ...: loop instead
                self.vectorize = False
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for xi in split_rows(x, 1):
            grads = torch.autograd.grad(_own_prediction_loss(predict(model, xi)), list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    total[n] += g * g
        return total

    @staticmethod
    def _vmapped(model: nn.Module, params: dict[str, nn.Parameter], x: Any) -> dict[str, Tensor]:
        from torch.func import grad, vmap

        fixed = {**{n: p.detach() for n, p in model.named_parameters() if n not in params}, **dict(model.named_buffers())}

        def loss(weights: dict[str, Tensor], xi: Any) -> Tensor:
            one = map_tensors(xi, lambda t: t[None])
            return _own_prediction_loss(predict_with(model, (weights, fixed), one))

        per_sample = vmap(grad(loss), in_dims=(None, 0))
        detached = {n: p.detach() for n, p in params.items()}
        chunk = max(1, PER_SAMPLE_FLOATS // max(1, sum(p.numel() for p in params.values())))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for part in split_rows(x, chunk):
            for n, g in per_sample(detached, part).items():
                total[n] += (g * g).sum(0)
        return total


@dataclass(frozen=True)
class Criterion:
    """A registry entry: ``make(**options)`` builds the Importance (raw scores); ``uses_data``: it is called as
    ``make(data, **options)``; ``needs_labels``: its calibration batches must be (input, label); ``normalizer``:
    its own default normaliser, else :data:`~criteria.normalize.DEFAULT_NORMALIZER`."""

    make: Callable[..., tp.importance.Importance]
    description: str
    uses_data: bool = False
    needs_labels: bool = False
    normalizer: str | None = None


_REGISTRY: dict[str, Criterion] = {
    "jbr": Criterion(JBRImportance, "exact per-sample JBR: E_x[(m(x)ᵀ J_g w_g)²], m = dense model's predicted class",
                     uses_data=True),
    "jbr-centred": Criterion(lambda data=None, **kw: JBRImportance(data, centred=True, **kw),
                             "JBR of replacing the channel by its mean: E_x[(m(x)ᵀ J_g (a_g(x) − μ_g))²]", uses_data=True),
    "jbr-recal": Criterion(RecalibratedJBRImportance, "first-order TPV of removal then BN recalibration, gated "
                           "where the channel is read (mean and scale restored at the next BatchNorm)", uses_data=True),
    "jbr-mac": Criterion(JBRImportance, "JBR divided by the MACs the removal saves", uses_data=True,
                         normalizer="macs"),
    "jbr-batch": Criterion(JBRBatchImportance, "batch-gradient JBR on confident frozen pseudo-labels (reference)",
                           uses_data=True),
    "jbr-ref": Criterion(JBRReferenceImportance, "the TPV paper's JBR: Σ_batches (∂CE/∂γ)² per layer, summed over "
                         "the group, on confident frozen pseudo-labels reshuffled per pass", uses_data=True,
                         normalizer="none"),
    "jacobian": Criterion(JacobianImportance, "E_x[(∂CE(f, y)/∂γ_g)²] with the true labels y", uses_data=True,
                          needs_labels=True),
    "l1": Criterion(lambda **kw: tp.importance.GroupMagnitudeImportance(**{"p": 1, "normalizer": None, **kw}),
                    "group L1 norm of weights"),
    "l2": Criterion(lambda **kw: tp.importance.GroupMagnitudeImportance(**{"p": 2, "normalizer": None, **kw}),
                    "group L2 norm of weights"),
    "taylor": Criterion(TaylorImportance, "Σ|w·∇L| on the model's own predictions (BN not scored)", uses_data=True),
    "hessian": Criterion(HessianImportance, "OBD: w²·E[(∇ℓ)²] (Fisher diagonal) on own predictions", uses_data=True),
    "bn": Criterion(lambda **kw: tp.importance.BNScaleImportance(**{"normalizer": None, **kw}), "|γ| of BatchNorm"),
    "fpgm": Criterion(lambda **kw: tp.importance.FPGMImportance(**{"normalizer": None, **kw}),
                      "filter pruning via geometric median"),
    "lamp": Criterion(tp.importance.LAMPImportance, "layer-adaptive magnitude pruning (its LAMP rescaling, then the "
                      "normaliser)"),
    "random": Criterion(tp.importance.RandomImportance, "uniformly random scores"),
}


class _NeedsLabels(Set):
    """The names of the criteria whose calibration batches need labels: a read-only live view of the registry, so
    ``name in NEEDS_LABELS`` also sees criteria registered after it was imported."""

    def __contains__(self, name: object) -> bool:
        entry = _REGISTRY.get(name) if isinstance(name, str) else None
        return entry is not None and entry.needs_labels

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, c in _REGISTRY.items() if c.needs_labels])

    def __len__(self) -> int:
        return sum(c.needs_labels for c in _REGISTRY.values())

    def __repr__(self) -> str:
        return f"NEEDS_LABELS({sorted(self)})"


NEEDS_LABELS: Set[str] = _NeedsLabels()


def register(name: str, factory: Callable[..., tp.importance.Importance], description: str = "", *,
             uses_data: bool = False, needs_labels: bool = False, normalizer: str | None = None,
             overwrite: bool = False) -> None:
    """Add criterion ``name``: ``factory(**options)`` (``factory(data, **options)`` when ``uses_data``) returns a
    torch-pruning ``Importance``, e.g. a :class:`~criteria.calibrated.CalibratedImportance` subclass for one that
    learns from calibration data. ``needs_labels``: its calibration batches must be (input, label) (implies
    ``uses_data``). ``normalizer``: its default normaliser (else the common default); :func:`get` applies it to
    the factory's scores, so the factory should return raw scores. A name already registered (built-ins
    included) is replaced only with ``overwrite=True``."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise CompressError(f"criterion name {name!r} must be a non-empty string without surrounding spaces",
                            "pass a name such as 'my-criterion'")
    if not callable(factory):
        raise CompressError(f"criterion {name!r}: the factory {factory!r} is not callable",
                            "pass an Importance class or a function returning a torch-pruning Importance")
    if needs_labels and not uses_data:
        raise CompressError(f"criterion {name!r} needs labels but does not use data",
                            "register it with uses_data=True as well")
    if name in _REGISTRY and not overwrite:
        raise CompressError(f"criterion {name!r} is already registered",
                            "choose another name, or pass overwrite=True to replace it")
    if normalizer is not None:
        check_normalizer(normalizer)
    _REGISTRY[name] = Criterion(factory, " ".join(str(description).split()), uses_data=uses_data,
                                needs_labels=needs_labels, normalizer=normalizer)


def names() -> list[str]:
    """All criterion names."""
    return list(_REGISTRY)


def describe() -> dict[str, str]:
    """One line per criterion name."""
    return {n: c.description for n, c in _REGISTRY.items()}


COMPOSITE = "@"  # "SELECT@ALLOCATE": channels chosen by SELECT, how many per group by ALLOCATE


def parts(name: str) -> tuple[str, str | None]:
    """(selection, allocation) of a criterion name: ``"jbr-centred@bn"`` -> ("jbr-centred", "bn"), a registered
    name -> (name, None); a one-line CompressError for unknown parts."""
    select, _, allocate = name.partition(COMPOSITE) if isinstance(name, str) else (name, "", "")
    for part in (select, allocate) if allocate else (select,):
        _entry(part)
    if COMPOSITE in allocate or (COMPOSITE in name and not allocate):
        raise CompressError(f"criterion {name!r} is not NAME or SELECT{COMPOSITE}ALLOCATE",
                            f"e.g. jbr-centred{COMPOSITE}bn: channels chosen by jbr-centred, how many per layer by bn")
    return select, allocate or None


def uses_data(name: str) -> bool:
    """Whether criterion ``name`` runs calibration passes (and so needs ``data``)."""
    return any(_entry(p).uses_data for p in parts(name) if p)


def needs_labels(name: str) -> bool:
    """Whether criterion ``name`` needs labelled calibration batches, (input, label)."""
    return any(_entry(p).needs_labels for p in parts(name) if p)


def _entry(name: str) -> Criterion:
    if name not in _REGISTRY:
        raise CompressError(f"unknown criterion {name!r}", f"use one of {', '.join(_REGISTRY)}, or SELECT{COMPOSITE}"
                            "ALLOCATE of two of them")
    return _REGISTRY[name]


def default_normalizer(name: str) -> str:
    """The normaliser :func:`get` applies to criterion ``name`` unless told otherwise (of a composite name: its
    allocation criterion's, since the normaliser only changes how many channels each group loses)."""
    select, allocate = parts(name)
    return _entry(allocate or select).normalizer or DEFAULT_NORMALIZER


def get(name: str, data: Iterable[Any] | None = None, *, normalizer: str | None = None,
        **options: Any) -> CalibratedImportance:
    """The torch-pruning Importance registered as ``name``, its scores normalised per group by ``normalizer``
    (one of :data:`~criteria.normalize.NORMALIZERS`; default :func:`default_normalizer`); ``data`` goes to
    criteria that use it (ignored by the others), ``options`` to its constructor (e.g. ``target="softmax"`` for
    jbr, ``confidence`` for jbr-batch). The criterion itself is ``.importance`` of the result.

    ``"SELECT@ALLOCATE"`` (e.g. ``"jbr-centred@bn"``): an :class:`~criteria.allocated.AllocatedImportance`, each
    group losing as many channels as ALLOCATE (normalised by ``normalizer``) would remove, the ones SELECT ranks
    lowest (SELECT's own normalised scores where ALLOCATE has none); ``options`` go to SELECT."""
    select, allocate = parts(name)
    if allocate is not None:
        return AllocatedImportance(get(select, data, normalizer=normalizer, **options),
                                   get(allocate, data, normalizer=normalizer), data)
    entry = _entry(name)
    normalizer = check_normalizer(normalizer or default_normalizer(name))
    try:
        importance = entry.make(data, **options) if entry.uses_data else entry.make(**options)
    except TypeError as err:
        raise CompressError(f"bad options for criterion {name}: {err}", "check the criterion's options") from err
    if not isinstance(importance, tp.importance.Importance):
        raise CompressError(f"criterion {name!r} built a {type(importance).__name__}, not a torch-pruning Importance",
                            "make its factory return a torch_pruning.importance.Importance (e.g. a subclass)")
    return NormalizedImportance(importance, normalizer, data)


def _gate_criteria(importance: tp.importance.Importance) -> list[GateImportance]:
    """The JBR gate criteria inside ``importance`` (normalised, or the parts of a composite)."""
    if isinstance(importance, NormalizedImportance):
        return _gate_criteria(importance.importance)
    if isinstance(importance, AllocatedImportance):
        return _gate_criteria(importance.select) + _gate_criteria(importance.allocate)
    return [importance] if isinstance(importance, GateImportance) else []


def prepare(importance: tp.importance.Importance, model: nn.Module, data: Iterable[Any] | None = None,
            graph: tp.DependencyGraph | None = None, ignored_layers: Sequence[nn.Module] | None = None,
            extra_groups: Sequence[Any] = ()) -> None:
    """Run the calibration passes ``importance`` needs on ``model`` (a no-op for data-free criteria).

    Optional when ``data`` was given to :func:`get`: scoring a group then runs the passes itself whenever the
    model's structure changed. Passes are cached per structure, so calling this before every ``pruner.step()``
    (or on structurally equal copies) costs nothing after the first time. ``graph``: the dependency graph the
    pruner will use (default: the model's own); ``ignored_layers``: the pruner's, so that the groups it will score
    are known before the pass (JBR then keeps one sum per channel instead of one value per sample and channel);
    ``extra_groups``: groups built outside the graph that will be scored too (attention heads)."""
    for inner in _gate_criteria(importance) if ignored_layers is not None else []:
        inner.scored_groups_ignoring = list(ignored_layers)
        inner.extra_groups = list(extra_groups)
    if isinstance(importance, CalibratedImportance):
        importance.prepare(model, data, graph)
