"""criteria.tpv against brute force in float64 on tiny networks: Hutchinson vs exact jacrev, Monte-Carlo TPV."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from criteria.tpv import (empirical_tpv, exact_diag, gaussian_noise, hutchinson_diag, removed_channels,
                          replaced_weights, select_params, stability, uniform_noise)

Z = 4.5  # z-score bound; everything is seeded, so a pass is deterministic


def tiny_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tiny_convnet() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def inputs(model: nn.Module, n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    shape = (5,) if isinstance(model[0], nn.Linear) else (2, 6, 6)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return list(x.split(batch))


def close(est, exact: torch.Tensor) -> None:
    """|estimate − exact| within Z standard errors, elementwise (exact zeros have zero spread)."""
    err = (est.value - exact).abs()
    assert (err <= Z * est.stderr + 1e-12 * exact.abs().max()).all(), float((err / est.stderr).max())


@pytest.mark.parametrize("make", [tiny_mlp, tiny_convnet])
@pytest.mark.parametrize("estimator,n,batch,probes", [("single", 300, 50, 4), ("batched", 1600, 16, 4)])
def test_hutchinson_converges_to_exact_jacobian(make, estimator, n, batch, probes) -> None:
    model = make().train()
    data = inputs(model, n, batch)
    exact = exact_diag(model, data)
    est = hutchinson_diag(model, data, estimator=estimator, probes=probes, seed=3)
    assert model.training and all(m.training for m in model.modules())  # train state restored
    assert est.num_samples == n and est.estimator == estimator and est.num_probes == probes
    trace = sum(d.sum() for d in exact.values())
    # precise enough that a factor 1.25 error could not pass, and correct within the reported error
    assert float(est.trace.stderr) < 0.05 * float(trace)
    close(est.trace, trace)
    for name, d in exact.items():
        close(est.param[name], d)
        close(est.channel[name], d.reshape(len(d), -1).sum(1))
        close(est.tensor[name], d.sum())


def test_hutchinson_detects_a_wrong_scale() -> None:
    """The statistical check rejects an estimate off by 1.5x: the tolerance is not vacuous."""
    model = tiny_convnet()
    data = inputs(model, 300, 50)
    exact = sum(d.sum() for d in exact_diag(model, data).values())
    est = hutchinson_diag(model, data, estimator="single", probes=4)
    assert abs(1.5 * float(est.trace.value) - float(exact)) > Z * 1.5 * float(est.trace.stderr)


def test_single_vmap_equals_loop_and_selected_params() -> None:
    model = tiny_convnet()
    data = inputs(model, 12, 5)
    names = ["0.weight", "1.weight", "6.bias"]
    vec = hutchinson_diag(model, data, params=names, estimator="single", probes=3, seed=7, chunk_size=4)
    loop = hutchinson_diag(model, data, params=names, estimator="single", probes=3, seed=7, chunk_size=4,
                          vectorized=False)
    assert list(vec.param) == names and vec.num_units == 12
    for n in names:
        torch.testing.assert_close(vec.param[n].value, loop.param[n].value, rtol=1e-10, atol=1e-14)
    assert list(hutchinson_diag(model, data).param) == ["0.weight", "3.weight", "6.weight"]  # default: conv/linear


def test_exact_diag_of_a_linear_layer_is_second_moment_of_inputs() -> None:
    """f = Wx + b: ∂f_k/∂W_kj = x_j, so diag(H_eff)_{kj} = E[x_j²] and diag for b is 1."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    data = inputs(tiny_mlp(), 40, 8)
    exact = exact_diag(model, data, params=["0.weight", "0.bias"])
    second_moment = torch.cat(data).pow(2).mean(0)
    torch.testing.assert_close(exact["0.weight"], second_moment.expand(3, 5))
    torch.testing.assert_close(exact["0.bias"], torch.ones(3, dtype=torch.float64))


def test_gaussian_noise_tpv_matches_trace_on_linear_model() -> None:
    """For f = Wx + b and δW ~ N(0, σ²): E||δW x||² = σ² Σ_p diag(H_eff)_p exactly."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    data = inputs(tiny_mlp(), 64, 16)
    predicted = 0.1 ** 2 * float(exact_diag(model, data)["0.weight"].sum())
    tpv = empirical_tpv(model, data, gaussian_noise(0.1), draws=800, seed=1)
    assert tpv.stderr < 0.05 * predicted and abs(tpv.value - predicted) < Z * tpv.stderr


def test_uniform_noise_tpv_matches_delta_squared_over_twelve_on_linear_model() -> None:
    model = nn.Sequential(nn.Linear(5, 3)).double()
    data = inputs(tiny_mlp(), 64, 16)
    step = torch.tensor([[0.05], [0.2], [0.1]], dtype=torch.float64)  # one Δ per output row
    predicted = float((step ** 2 / 12 * exact_diag(model, data)["0.weight"]).sum())
    tpv = empirical_tpv(model, data, uniform_noise({"0.weight": step}), draws=800, seed=2)
    assert tpv.stderr < 0.05 * predicted and abs(tpv.value - predicted) < Z * tpv.stderr


def test_small_noise_tpv_is_first_order_trace_on_nonlinear_model() -> None:
    model = tiny_convnet()
    data = inputs(model, 32, 16)
    sigma = 1e-3
    predicted = sigma ** 2 * float(sum(d.sum() for d in exact_diag(model, data).values()))
    tpv = empirical_tpv(model, data, gaussian_noise(sigma), draws=400, seed=3)
    assert abs(tpv.value - predicted) < Z * tpv.stderr + 1e-3 * predicted


def brute_force_tpv(model: nn.Module, changed: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        x = torch.cat(data)
        return float((changed.eval()(x) - model.eval()(x)).pow(2).sum(1).mean())


def test_channel_removal_and_replacement_match_brute_force() -> None:
    model = tiny_convnet().eval()
    data = inputs(model, 20, 7)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned[0].weight[[1, 3]] = 0
        pruned[6].weight[0] = 0
    tpv = empirical_tpv(model, data, removed_channels({"0.weight": [1, 3], "6.weight": [0]}))
    assert tpv.value == pytest.approx(brute_force_tpv(model, pruned, data), rel=1e-12)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in select_params(rounded).values():
            p.copy_(torch.round(p * 8) / 8)
    tpv = empirical_tpv(model, data, replaced_weights(lambda name, w: torch.round(w * 8) / 8))
    assert tpv.value == pytest.approx(brute_force_tpv(model, rounded, data), rel=1e-12)


def test_empirical_tpv_restores_weights_when_something_fails() -> None:
    model = tiny_convnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = inputs(model, 8, 4)

    def fails_on_last_layer(name, w, gen):
        if name == "6.weight":
            raise RuntimeError("perturbation failed")
        return torch.ones_like(w)

    with pytest.raises(RuntimeError, match="perturbation failed"):
        empirical_tpv(model, data, fails_on_last_layer)
    bad_data = data + [torch.zeros(2, 7, 6, 6, dtype=torch.float64)]  # wrong channel count: forward raises
    with pytest.raises(RuntimeError):
        empirical_tpv(model, bad_data, gaussian_noise(1.0))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.training


def test_stability_reports_both_values_and_ratio() -> None:
    model = tiny_mlp()
    trace = lambda d: float(hutchinson_diag(model, d, estimator="single", probes=2).trace.value)  # noqa: E731
    first, second = inputs(model, 200, 50, seed=0), inputs(model, 200, 50, seed=1)
    s = stability(trace, first, second)
    assert s.ratio == pytest.approx(s.second / s.first) and 0.7 < s.ratio < 1.4
    assert stability(trace, first, first).ratio == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_hutchinson_on_cuda_matches_cpu() -> None:
    model = tiny_convnet()
    data = inputs(model, 16, 8)
    for estimator in ("single", "batched"):
        cpu = hutchinson_diag(model, data, estimator=estimator, probes=2)
        gpu = hutchinson_diag(copy.deepcopy(model).cuda(), data, estimator=estimator, probes=2)
        torch.testing.assert_close(gpu.trace.value.cpu(), cpu.trace.value, rtol=1e-8, atol=0)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_convnet])
def test_linearized_tpv_is_the_quadratic_form_of_the_exact_jacobian(make) -> None:
    """E_x ||J_p(x) δ||² = δᵀ H_eff δ with the full Jacobian from jacrev, per sample, for several δ per tensor; and
    it is the small-ε limit of the measured ||f(w + εδ) − f(w)||² / ε²."""
    from torch.func import functional_call, jacrev

    from criteria.tpv import linearized_tpv

    model = make().eval()
    data = inputs(model, 12, 5)
    g = torch.Generator().manual_seed(4)
    params = dict(model.named_parameters())
    deltas = {n: {k: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for k in ("a", "b", 3)}
              for n in ("0.weight", f"{len(model) - 1}.weight")}
    got = linearized_tpv(model, data, deltas)
    for name, by_key in deltas.items():
        w = params[name].detach()
        for key, d in by_key.items():
            total = 0.0
            for x in torch.cat(data).split(1):
                jac = jacrev(lambda v: functional_call(model, {name: v}, (x,)).reshape(-1))(w)  # (K, *w.shape)
                total += float((jac.detach().reshape(len(jac), -1) @ d.reshape(-1)).pow(2).sum())
            assert got[name][key] == pytest.approx(total / 12, rel=1e-10)
        eps, d = 1e-5, by_key["a"]
        measured = empirical_tpv(model, data, replaced_weights(lambda n, w: w + eps * d if n == name else None))
        assert measured.value / eps ** 2 == pytest.approx(got[name]["a"], rel=1e-3)


def test_linearized_tpv_names_unknown_parameters() -> None:
    from compress.errors import CompressError
    from criteria.tpv import linearized_tpv

    with pytest.raises(CompressError, match="no parameters named"):
        linearized_tpv(tiny_mlp(), inputs(tiny_mlp(), 4, 4), {"nope.weight": {}})


class _Attention(nn.Module):
    """Linear -> self-attention (nn.MultiheadAttention, whose eval fast path has no forward-mode AD) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_linearized_tpv_through_multihead_attention_matches_finite_differences() -> None:
    """Transformers go through the JVP predictor too: E_x ||J δ||² through nn.MultiheadAttention in eval mode (its
    fast path is switched off for the JVP) equals the small-ε limit of the measured output change."""
    from criteria.tpv import linearized_tpv

    torch.manual_seed(0)
    model = _Attention().double().eval()
    data = [torch.randn(4, 5, 3, dtype=torch.float64) for _ in range(2)]
    d = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        got = linearized_tpv(model, data, {"embed.weight": {4: d}})["embed.weight"][4]
        eps = 1e-6
        measured = empirical_tpv(model, data, replaced_weights(lambda n, w: w + eps * d if n == "embed.weight" else None))
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards
    assert measured.value / eps ** 2 == pytest.approx(got, rel=1e-4)
