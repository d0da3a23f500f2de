"""TPV, test prediction variance: how much a weight perturbation δw moves the model's outputs on test inputs.

TPV(w*) = E_{x,δw} ||f(w*+δw, x) − f(w*, x)||² ≈ Tr(H_eff·C), with H_eff = E_x[J(x)ᵀJ(x)], J(x) the (K × P) Jacobian
of the K logits w.r.t. the parameters and C = Cov(δw). For independent noise C is diagonal, so only diag(H_eff)
is needed; it is estimated here by Hutchinson's method, checked against an exact jacrev reference, and the TPV
itself is measured by Monte Carlo for a concrete perturbation (noise, real quantization, channel removal).

Under torch.distributed every estimate sums its running statistics over the ranks (each on its shard of the
data): ``linearized_tpv`` and ``exact_diag`` then equal one process on the union; Hutchinson draws its probes per
rank, so it is an estimate of the same quantity with the same spread, identical on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vmap

from compress.batches import Inputs, first_rows, map_tensors, predict, predict_with, rows, split_rows
from compress.data import iter_inputs
from compress.distributed import all_reduce_sum, all_reduce_sums, is_distributed
from compress.errors import CompressError
from compress.nn_helpers import eval_mode, on_model, weight_layers  # re-exported: criteria.tpv.eval_mode, .weight_layers
from compress.quiet import quiet_third_party

Estimator = Literal["single", "batched"]
# A perturbation maps (parameter name, w*, generator) to δw, or None to leave that parameter alone.
Perturbation = Callable[[str, Tensor, torch.Generator], "Tensor | None"]


# --- shared helpers (also used by criteria.qnoise) -------------------------------------------------------------

def select_params(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Parameters by name; default: the weights of all Conv2d/Linear layers (``<layer>.weight``)."""
    params = dict(model.named_parameters())
    if names is None:
        return {f"{layer}.weight": params[f"{layer}.weight"] for layer in weight_layers(model)}
    missing = [n for n in names if n not in params]
    if missing:
        raise CompressError(f"model has no parameter {', '.join(missing)}", "pass names from model.named_parameters()")
    return {n: params[n] for n in names}


def model_inputs(model: nn.Module, data: Iterable[Any], num_samples: int | None = None) -> Iterator[Inputs]:
    """Input batches of ``data`` on the model's device and (floating) dtype, at most ``num_samples`` in all."""
    seen = 0
    for x in iter_inputs(data):
        if num_samples is not None:
            if seen >= num_samples:
                return
            x = first_rows(x, num_samples - seen)
        seen += rows(x)
        yield on_model(x, model)


def rademacher(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """±1 entries drawn on the CPU from ``generator`` (device-independent), returned on ``like``'s device/dtype."""
    return (torch.randint(0, 2, tuple(shape), generator=generator) * 2 - 1).to(like.device, like.dtype)


def per_channel(t: Tensor) -> Tensor:
    """Sum over all dims but the first (output channel) of a parameter-shaped tensor; leading dim = units."""
    return t.reshape(*t.shape[:2], -1).sum(-1) if t.dim() > 2 else t


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo mean and its standard error (same shape)."""

    value: Tensor
    stderr: Tensor


class RatioMean:
    """Σ_u z_u / Σ_u m_u over i.i.d. units u (a unit covers m_u samples), with its ratio-estimator standard error.

    SE² = n/(n−1) · Σ_u (z_u − m_u·mean)² / (Σ_u m_u)²; accumulated in float64 as running sums.
    """

    def __init__(self) -> None:
        self.n, self.m, self.mm = 0, 0.0, 0.0
        self.z = self.zz = self.mz = None  # type: ignore[assignment]

    def add(self, z: Tensor, m: Tensor) -> None:
        """Add units: ``z`` of shape (units, ...), ``m`` of shape (units,)."""
        z, m = z.detach().double(), m.to(z.device, torch.float64)
        mb = m.reshape(-1, *[1] * (z.dim() - 1))
        sums = (z.sum(0), (z * z).sum(0), (mb * z).sum(0))
        self.z, self.zz, self.mz = sums if self.z is None else (a + b for a, b in zip((self.z, self.zz, self.mz), sums))
        self.n += len(z)
        self.m += float(m.sum())
        self.mm += float((m * m).sum())

    def reduce_across_ranks(self) -> None:
        """Replace the running sums by their sums over the torch.distributed ranks (no-op in a single process)."""
        if not is_distributed():
            return
        counts = all_reduce_sum(torch.tensor([self.n, self.m, self.mm], dtype=torch.float64))
        self.n, self.m, self.mm = int(counts[0]), float(counts[1]), float(counts[2])
        sums = all_reduce_sums({"z": self.z, "zz": self.zz, "mz": self.mz})
        self.z, self.zz, self.mz = sums["z"], sums["zz"], sums["mz"]

    def result(self) -> Estimate:
        mean = self.z / self.m
        if self.n < 2:
            return Estimate(mean, torch.full_like(mean, float("nan")))
        ss = (self.zz - 2 * mean * self.mz + mean * mean * self.mm).clamp_min(0)
        return Estimate(mean, (ss * self.n / (self.n - 1)).sqrt() / self.m)


# --- Hutchinson estimate of diag(H_eff) -----------------------------------------------------------------------

@dataclass(frozen=True)
class DiagHeff:
    """Hutchinson estimate of diag(H_eff) = E_x diag(J(x)ᵀJ(x)), with standard errors at every aggregation level.

    ``param``: parameter-shaped; ``channel``: summed per output channel (dim 0); ``tensor``: summed per parameter
    tensor; ``trace``: Σ over all selected parameters (= Tr of H_eff restricted to them). Standard errors come from
    the spread across i.i.d. units: one sample (``single``) or one batch (``batched``), probes averaged inside.
    """

    param: dict[str, Estimate]
    channel: dict[str, Estimate]
    tensor: dict[str, Estimate]
    trace: Estimate
    num_samples: int
    num_probes: int
    num_units: int
    estimator: str

    @property
    def diag(self) -> dict[str, Tensor]:
        return {n: e.value for n, e in self.param.items()}


def _output_fn(model: nn.Module, params: dict[str, Tensor]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """f(params, x) → logits of shape (batch, K), other parameters and buffers taken from ``model``."""
    def f(p: dict[str, Tensor], x: Inputs) -> Tensor:
        return predict_with(model, p, x).reshape(rows(x), -1)
    return f


@torch.no_grad()  # torch.func.grad inside still differentiates; nothing outside records a graph
def _squared_vjps_single(f, params, x, probes, gen, vectorized) -> dict[str, Tensor]:
    """(J(x_i)ᵀ v_ij)² averaged over the probes j, one row per sample i: one backward per (x_i, v_ij)."""
    first = f(params, first_rows(x, 1))
    k, n = first.shape[1], rows(x)
    v = rademacher((n, probes, k), gen, first)
    xs, vs = map_tensors(x, lambda t: t.repeat_interleave(probes, 0)), v.reshape(-1, k)

    def vjp_one(p: dict[str, Tensor], xi: Inputs, vi: Tensor) -> dict[str, Tensor]:
        return grad(lambda q: (f(q, map_tensors(xi, lambda t: t[None]))[0] * vi).sum())(p)

    grads = None
    if vectorized:
        try:
            grads = vmap(vjp_one, in_dims=(None, 0, 0))(params, xs, vs)
        except (RuntimeError, NotImplementedError) as err:  # a model vmap cannot batch: fall back to a loop
            warnings.warn(f"vmap failed ({str(err).splitlines()[0]}); using a per-sample backward loop")
    if grads is None:
        per_row = [vjp_one(params, map_tensors(xs, lambda t, i=i: t[i]), vs[i]) for i in range(len(vs))]
        grads = {name: torch.stack([r[name] for r in per_row]) for name in params}
    return {name: (g * g).reshape(n, probes, *g.shape[1:]).mean(1) for name, g in grads.items()}


def _squared_vjps_batched(f, params, x, probes, gen) -> dict[str, Tensor]:
    """(∇_w Σ_b v_bᵀ f(x_b))² averaged over probes, one row: one backward per batch; cross terms have zero mean."""
    p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    out = f(p, x)
    acc = {n: torch.zeros_like(t) for n, t in p.items()}
    for j in range(probes):
        v = rademacher(out.shape, gen, out)
        grads = torch.autograd.grad((out * v).sum(), list(p.values()), retain_graph=j < probes - 1,
                                    allow_unused=True)  # layers an eval forward never calls (auxiliary heads): 0
        for n, g in zip(p, grads):
            if g is not None:
                acc[n] += g * g / probes
    return {n: a[None] for n, a in acc.items()}


def _units(f, params, inputs, estimator, probes, gen, chunk_size, vectorized):
    """i.i.d. units (z: name → (units, *shape), m: samples per unit) of the Hutchinson estimator."""
    for x in inputs:
        if estimator == "batched":
            yield _squared_vjps_batched(f, params, x, probes, gen), torch.tensor([float(rows(x))])
        else:
            for chunk in split_rows(x, chunk_size):  # bounds memory at chunk_size·probes per-sample gradients
                yield _squared_vjps_single(f, params, chunk, probes, gen, vectorized), torch.ones(rows(chunk))


def hutchinson_diag(model: nn.Module, data: Iterable[Any], *, params: Sequence[str] | None = None,
                    estimator: Estimator = "batched", probes: int = 1, num_samples: int | None = None,
                    seed: int = 0, chunk_size: int = 32, vectorized: bool = True) -> DiagHeff:
    """diag(H_eff)_p ≈ E_x E_v (J(x)ᵀv)_p², v Rademacher in output space (E[vvᵀ] = I).

    ``single``: one vector-Jacobian product per (sample, probe), vectorised with torch.func.vmap over chunks of
    ``chunk_size`` samples (``vectorized=False``, or a model vmap rejects: a per-sample loop). ``batched``: one
    backward per batch of (Σ_b v_bᵀ f(x_b)) with independent v_b per sample; its square has mean Σ_b diag(J_bᵀJ_b)
    because E[v_b v_cᵀ] = 0 for b ≠ c. ``probes`` Rademacher vectors per sample, drawn from
    ``torch.Generator().manual_seed(seed)``. The model runs in eval mode; its train/eval state is restored.
    """
    if estimator not in ("single", "batched"):
        raise CompressError(f"unknown estimator {estimator!r}", "use 'single' or 'batched'")
    if probes < 1:
        raise CompressError(f"probes must be >= 1, got {probes}", "pass probes=1 or more")
    selected = {n: t.detach() for n, t in select_params(model, params).items()}
    f, gen = _output_fn(model, selected), torch.Generator().manual_seed(seed)
    stats = {level: {n: RatioMean() for n in selected} for level in ("param", "channel", "tensor")}
    total, seen = RatioMean(), 0
    with eval_mode(model):
        inputs = model_inputs(model, data, num_samples)
        for z, m in _units(f, selected, inputs, estimator, probes, gen, chunk_size, vectorized):
            for n, zn in z.items():
                stats["param"][n].add(zn, m)
                stats["channel"][n].add(per_channel(zn), m)
                stats["tensor"][n].add(zn.reshape(len(zn), -1).sum(1), m)
            total.add(sum(zn.reshape(len(zn), -1).sum(1) for zn in z.values()), m)
            seen += int(m.sum())
    seen = int(all_reduce_sum(torch.tensor([seen])).item())
    if seen == 0:
        raise CompressError("no input samples for the Hutchinson estimate", "pass a non-empty data iterable")
    for estimate in [total] + [s for d in stats.values() for s in d.values()]:
        estimate.reduce_across_ranks()
    results = {level: {n: s.result() for n, s in d.items()} for level, d in stats.items()}
    return DiagHeff(results["param"], results["channel"], results["tensor"], total.result(), seen, probes,
                    total.n, estimator)


@torch.no_grad()
def exact_diag(model: nn.Module, data: Iterable[Any], *, params: Sequence[str] | None = None,
               num_samples: int | None = None) -> dict[str, Tensor]:
    """Exact diag(H_eff)_p = E_x Σ_k J_kp(x)² from the full Jacobian (torch.func.jacrev); for tiny models only.

    Tr(H_eff) = Σ_p of the result. The model runs in eval mode (samples independent, BN uses running stats).
    """
    selected = {n: t.detach() for n, t in select_params(model, params).items()}
    f = _output_fn(model, selected)
    acc, seen = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in selected.items()}, 0
    with eval_mode(model):
        for x in model_inputs(model, data, num_samples):
            jac = jacrev(f)(selected, x)  # name -> (batch, K, *param.shape)
            for n, j in jac.items():
                acc[n] += (j.double() ** 2).sum((0, 1))
            seen += rows(x)
    acc, seen = all_reduce_sums(acc), int(all_reduce_sum(torch.tensor([seen])).item())
    return {n: a / seen for n, a in acc.items()}


# --- first-order TPV of a deterministic perturbation ---------------------------------------------------------

@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention kernels that forward-mode AD and double backward can differentiate: nn.MultiheadAttention's eval
    fast path (``_native_multi_head_attention``) off, scaled-dot-product attention on its math backend (the CPU
    flash kernel has no JVP and no derivative of its backward); both restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@torch.no_grad()
def linearized_tpv(model: nn.Module, data: Iterable[Any], deltas: Mapping[str, Mapping[Any, Tensor]], *,
                   num_samples: int | None = None) -> dict[str, dict[Any, float]]:
    """E_x ||J_p(x) δ||² for each parameter p and each candidate perturbation δ of it (``deltas[p][key]``).

    The first-order TPV of a *deterministic* δw = δ on one tensor: δᵀ H_eff δ with the full H_eff block of p, so
    correlated errors (torchao's biased rounding) count, which the diagonal models miss. One forward-mode
    Jacobian-vector product per (tensor, batch), vmapped over the tensor's candidates (a loop where vmap fails).
    """
    inputs = list(model_inputs(model, data, num_samples))
    params = dict(model.named_parameters())
    unknown = [n for n in deltas if n not in params]
    if unknown:
        raise CompressError(f"no parameters named {unknown[:3]}", "use names from model.named_parameters()")
    total = int(all_reduce_sum(torch.tensor([sum(rows(x) for x in inputs)])).item())  # every rank's samples
    out: dict[str, dict[Any, float]] = {}
    # the first jvp loads torch decompositions via torch.jit.script (quiet); attention kernels without forward AD off
    with eval_mode(model), quiet_third_party(), differentiable_attention():
        for name, by_key in deltas.items():
            if not by_key:
                out[name] = {}
                continue
            w = params[name].detach()
            keys = list(by_key)
            tangents = torch.stack([by_key[k].to(w) for k in keys])

            def jvp_sq(x: Inputs, t: Tensor) -> Tensor:
                f = lambda v: predict_with(model, {name: v}, x).reshape(rows(x), -1)  # noqa: E731
                return jvp(f, (w,), (t,))[1].double().pow(2).sum()

            sums = torch.zeros(len(keys), dtype=torch.float64, device=w.device)
            for x in inputs:
                try:
                    sums += vmap(lambda t: jvp_sq(x, t))(tangents)
                except (RuntimeError, NotImplementedError) as err:  # a model vmap cannot batch: one JVP per candidate
                    warnings.warn(f"vmap failed ({str(err).splitlines()[0]}); using one JVP per candidate")
                    sums += torch.stack([jvp_sq(x, t) for t in tangents])
            out[name] = {k: float(v) / total for k, v in zip(keys, all_reduce_sum(sums))}
    return out


# --- empirical TPV by Monte Carlo ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmpiricalTPV:
    """E_{x,δw} ||f(w*+δw, x) − f(w*, x)||²: ``value``, one value per draw of δw (each averaged over all x) and the
    standard error across draws (nan for a single draw; it does not include the finite-x error)."""

    value: float
    stderr: float
    per_draw: Tensor
    num_samples: int


def empirical_tpv(model: nn.Module, data: Iterable[Any], perturbation: Perturbation, *,
                  params: Sequence[str] | None = None, draws: int = 1, seed: int = 0,
                  num_samples: int | None = None) -> EmpiricalTPV:
    """Monte-Carlo TPV of ``perturbation`` over ``draws`` draws of δw on the inputs of ``data`` (eval mode).

    The weights are restored bit-exactly to w* afterwards, also when the perturbation or the forward raises.
    """
    selected = select_params(model, params)
    inputs = list(model_inputs(model, data, num_samples))
    gen, per_draw = torch.Generator().manual_seed(seed), []
    original = {n: p.detach().clone() for n, p in selected.items()}
    with eval_mode(model), torch.no_grad():
        reference = [predict(model, x).reshape(rows(x), -1) for x in inputs]
        try:
            for _ in range(draws):
                for n, p in selected.items():
                    delta = perturbation(n, original[n], gen)
                    if delta is not None:
                        p.add_(delta.to(p.device, p.dtype))
                sq = sum(float(((predict(model, x).reshape(rows(x), -1) - ref).double() ** 2).sum())
                         for x, ref in zip(inputs, reference))
                per_draw.append(sq / sum(rows(x) for x in inputs))
                for n, p in selected.items():
                    p.copy_(original[n])
        finally:
            for n, p in selected.items():
                p.copy_(original[n])
    values = torch.tensor(per_draw, dtype=torch.float64)
    stderr = float(values.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    return EmpiricalTPV(float(values.mean()), stderr, values, sum(rows(x) for x in inputs))


def gaussian_noise(sigma: float | Mapping[str, float | Tensor]) -> Perturbation:
    """δw ~ N(0, σ²) i.i.d. per weight; ``sigma`` one value, or per parameter name (scalar or broadcastable)."""
    def perturb(name: str, w: Tensor, gen: torch.Generator) -> Tensor | None:
        s = sigma if isinstance(sigma, (int, float)) else sigma.get(name)
        if s is None:
            return None
        return torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device) * torch.as_tensor(s).to(w)
    return perturb


def uniform_noise(step: Mapping[str, Tensor]) -> Perturbation:
    """δw ~ U[−Δ/2, Δ/2] per weight (variance Δ²/12), Δ per parameter name broadcastable to the weight."""
    def perturb(name: str, w: Tensor, gen: torch.Generator) -> Tensor | None:
        if name not in step:
            return None
        return (torch.rand(w.shape, generator=gen, dtype=w.dtype).to(w.device) - 0.5) * step[name].to(w)
    return perturb


def replaced_weights(new_weight: Callable[[str, Tensor], Tensor | None]) -> Perturbation:
    """δw = Q(w) − w for a deterministic replacement Q (e.g. fake quantization); Q returns None to skip a name."""
    def perturb(name: str, w: Tensor, gen: torch.Generator) -> Tensor | None:
        q = new_weight(name, w)
        return None if q is None else q.to(w) - w
    return perturb


def removed_channels(channels: Mapping[str, Sequence[int]]) -> Perturbation:
    """δw = −w on the listed output channels (dim 0) of each named parameter: those channels are zeroed."""
    def perturb(name: str, w: Tensor, gen: torch.Generator) -> Tensor | None:
        if name not in channels:
            return None
        delta = torch.zeros_like(w)
        idx = torch.as_tensor(list(channels[name]), dtype=torch.long, device=w.device)
        delta[idx] = -w[idx]
        return delta
    return perturb


# --- train-vs-test stability ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stability:
    """The same estimate on two input sets (e.g. train and test) and ``ratio = second / first``."""

    first: float
    second: float
    ratio: float


def stability(estimate: Callable[[Iterable[Any]], float], first: Iterable[Any], second: Iterable[Any]) -> Stability:
    """Evaluate ``estimate`` (data → number, e.g. ``lambda d: float(hutchinson_diag(m, d).trace.value)``) twice."""
    a, b = float(estimate(first)), float(estimate(second))
    return Stability(a, b, b / a if a != 0 else float("inf"))
