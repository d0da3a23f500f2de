"""JBR gate derivatives against brute force in float64 on a tiny residual CNN; the criteria registry end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import criteria
from compress import CompressError
from compress.data import synthetic
from compress.small_resnet import SmallResNet
from criteria.jbr import JBRImportance, group_key
from criteria.registry import HessianImportance, TaylorImportance
from tiny_resnet import COUPLED, GATED, X_SHAPE, TinyResNet, graph_of, groups_of

def brute_force_rows(net: nn.Module, chunks: list[torch.Tensor], objective) -> dict[str, torch.Tensor]:
    """One backward per chunk (a sample, or a batch) of objective(logits, chunk index) w.r.t. the parameters,
    reduced per gated channel to Σ_{params of the channel} w·∂w (BN γ, β; conv/linear weights and bias)."""
    modules = dict(net.named_modules())
    params = {n: [p for p in (modules[n].weight, modules[n].bias) if p is not None] for n in GATED}
    flat = [p for n in GATED for p in params[n]]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in GATED}
    for i, x in enumerate(chunks):
        grads = iter(torch.autograd.grad(objective(net(x), i), flat))
        for n in GATED:
            rows[n].append(sum((p * next(grads)).reshape(p.shape[0], -1).sum(1) for p in params[n]))
    return {n: torch.stack(r).detach() for n, r in rows.items()}


def per_sample_objective(kind: str, net: nn.Module, batches: list) -> tuple[list[torch.Tensor], object]:
    """The samples one by one, and s(logits, i): m(x)ᵀf with the dense prediction, or CE with the true label."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        probs = net(x).softmax(1)
    objectives = {"predicted": lambda out, i: out[0, probs[i].argmax()],
                  "softmax": lambda out, i: (probs[i] * out[0]).sum(),
                  "jacobian": lambda out, i: F.cross_entropy(out, y[i:i + 1])}
    return list(x[:, None]), objectives[kind]


def make(kind: str, batches: list, keep_rows: bool = False) -> criteria.registry.CalibratedImportance:
    if kind == "jacobian":
        return criteria.get("jacobian", batches, keep_rows=keep_rows, normalizer="none")
    return criteria.get("jbr", batches, target=kind, keep_rows=keep_rows, normalizer="none")


def gated_names(net: nn.Module, group) -> set[str]:
    """The gated layers whose output channels the group removes."""
    names = {id(m): n for n, m in net.named_modules()}
    return {names[id(dep.target.module)] for dep, _ in group
            if dep.handler.__name__ == "prune_out_channels" and names.get(id(dep.target.module)) in GATED}


@pytest.mark.parametrize("kind", ["predicted", "softmax", "jacobian"])
def test_gate_derivatives_equal_the_per_sample_loop(tiny, batches, kind):
    imp = make(kind, batches, keep_rows=True)
    imp.prepare(tiny)
    assert set(imp.columns) == set(GATED)  # conv->BN pairs gate the BN, other convs / linears themselves
    expected = brute_force_rows(tiny, *per_sample_objective(kind, tiny, batches))
    for name, rows in expected.items():
        torch.testing.assert_close(imp.derivatives[:, imp.columns[name]].double(), rows, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["predicted", "jacobian"])
def test_group_scores_square_the_coupled_sum_of_brute_force_derivatives(tiny, batches, kind):
    imp = make(kind, batches)
    rows = brute_force_rows(tiny, *per_sample_objective(kind, tiny, batches))
    matched = []
    for group in groups_of(tiny):  # every channel keeps its index in every layer here: idxs == root idxs
        gated = gated_names(tiny, group)
        assert gated in COUPLED
        matched.append(gated)
        expected = (sum(rows[n] for n in gated) ** 2).mean(0)
        torch.testing.assert_close(imp(group).double(), expected, rtol=1e-5, atol=1e-9)
    assert sorted(map(sorted, matched)) == sorted(map(sorted, COUPLED))


def scaled_objective(net: nn.Module, x: torch.Tensor, cls: torch.Tensor, names: set[str], c: int,
                     scale: float) -> torch.Tensor:
    """m(x)ᵀf with channel c of every named gated layer scaled by ``scale`` (BN γ and β, or conv weight and bias)."""
    scaled = copy.deepcopy(net)
    modules = dict(scaled.named_modules())
    with torch.no_grad():
        for n in names:
            for p in (modules[n].weight, modules[n].bias):
                p[c] *= scale
        return scaled(x).gather(1, cls[:, None])[:, 0]


@pytest.mark.parametrize("coupling", [{"bn0", "abn2", "cbn2"}, {"d2", "down"}])
def test_coupled_score_is_the_first_order_change_of_removing_the_whole_group(tiny, batches, coupling):
    imp = criteria.get("jbr", batches, keep_rows=True, normalizer="none")
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        cls = tiny(x).argmax(1)
    group = next(g for g in groups_of(tiny) if gated_names(tiny, g) == coupling)
    scores = imp(group)
    per_sample = imp.group_derivatives(group)  # (samples, channels)
    c, t = int(per_sample.abs().sum(0).argmax()), 1e-5  # a live channel (ReLUs kill some in this tiny net)
    slope = (scaled_objective(tiny, x, cls, coupling, c, 1 - t) - scaled_objective(tiny, x, cls, coupling, c, 1 + t)) / (2 * t)
    assert slope.abs().max() > 1e-3
    torch.testing.assert_close(slope, -per_sample[:, c], atol=1e-6, rtol=1e-6)
    assert scores[c].item() == pytest.approx(float((slope ** 2).mean()), rel=1e-5)
    # scaling to 0 is the real removal: torch-pruning's pruned copy computes the same outputs
    pruned = copy.deepcopy(tiny)
    root = next(g for g in groups_of(pruned) if gated_names(pruned, g) == coupling)[0].dep
    graph_of(pruned).get_pruning_group(root.target.module, root.handler, idxs=[c]).prune()
    with torch.no_grad():
        removed = pruned(x).gather(1, cls[:, None])[:, 0]
    torch.testing.assert_close(removed, scaled_objective(tiny, x, cls, coupling, c, 0.0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["jbr", "jbr-batch", "jacobian"])
def test_scores_summed_per_group_equal_those_from_every_row_and_memory_stays_per_channel(tiny, batches, name):
    """Told the pruner's ignored layers, the pass keeps one float64 per root channel, not one float per (sample,
    channel); its scores equal those from the kept rows. A group from another graph (other roots) is scored by one
    more pass of its own. Not told them (inside any torch-pruning pruner), it keeps the rows."""
    options = {"confidence": 0.0} if name == "jbr-batch" else {}
    summed, rows = (criteria.get(name, batches, normalizer="none", **options),
                    criteria.get(name, batches, normalizer="none", **options))
    criteria.prepare(summed, tiny, ignored_layers=[tiny.head])
    criteria.prepare(rows, tiny)
    assert rows.derivatives is not None and not rows.moments
    for group in groups_of(tiny):
        torch.testing.assert_close(summed(group), rows(group), rtol=1e-6, atol=1e-12)
    assert summed.derivatives is None
    assert sum(moments[0].numel() for moments in summed.moments.values()) <= max(c.stop for c in summed.columns.values())
    first_keys, graph = set(summed.moments), graph_of(tiny)
    head_input = graph.get_pruning_group(tiny.head, tp.prune_linear_in_channels, idxs=list(range(tiny.head.in_features)))
    assert summed(head_input) is not None and group_key(head_input, graph._module2name) not in first_keys
    torch.testing.assert_close(summed(head_input), rows(head_input), rtol=1e-6, atol=1e-12)


def test_jbr_batch_is_the_squared_batch_gradient_of_confident_cross_entropy(tiny, batches):
    xs = [b[0] for b in batches]
    with torch.no_grad():
        probs = [tiny(x).softmax(1) for x in xs]
    threshold = float(torch.cat(probs).max(1).values.median())
    imp = criteria.get("jbr-batch", batches, confidence=threshold, keep_rows=True, normalizer="none")

    def objective(out, i):
        conf, pseudo = probs[i].max(1)
        keep = conf > threshold
        return F.cross_entropy(out[keep], pseudo[keep]) if keep.any() else out.sum() * 0

    kept = torch.cat(probs).max(1).values > threshold
    assert 0 < int(kept.sum()) < len(kept)  # the mask matters for this check
    rows = brute_force_rows(tiny, xs, objective)  # one row per batch
    imp.prepare(tiny)
    for name, expected in rows.items():
        torch.testing.assert_close(imp.derivatives[:, imp.columns[name]].double(), expected, atol=1e-7, rtol=1e-6)
    for group in groups_of(tiny):
        expected = (sum(rows[n] for n in gated_names(tiny, group)) ** 2).sum(0)
        torch.testing.assert_close(imp(group).double(), expected, rtol=1e-5, atol=1e-12)


def test_gradient_baselines_match_their_definitions(tiny, batches):
    x = torch.cat([b[0] for b in batches])
    params = dict(tiny.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for xi in x:  # torch-pruning's documented per-sample usage, accumulated correctly
        out = tiny(xi[None])
        for (n, p), g in zip(params.items(), torch.autograd.grad(F.cross_entropy(out, out.argmax(1)), list(params.values()))):
            fisher[n] += g * g / len(x)
    for vectorize in (True, False):
        hessian = HessianImportance(batches, vectorize=vectorize)
        hessian.prepare(tiny)
        for n, p in params.items():
            torch.testing.assert_close(p.grad, fisher[n], atol=1e-12, rtol=1e-8)
    taylor = TaylorImportance(batches)
    taylor.prepare(tiny)
    for n, p in params.items():
        expected = sum(torch.autograd.grad(F.cross_entropy(out, out.argmax(1)), p)[0]
                       for out in (tiny(b[0]) for b in batches))
        torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=1e-8)


def test_cache_is_reused_until_the_structure_changes_and_dense_targets_stay_frozen(tiny, batches):
    imp = criteria.get("jbr", batches, normalizer="none")
    pruner = tp.pruner.BasePruner(tiny, torch.zeros(1, *X_SHAPE, dtype=torch.float64), importance=imp,
                                  pruning_ratio=0.3, ignored_layers=[tiny.head], global_pruning=True, iterative_steps=2)
    group = groups_of(tiny)[0]
    imp(group)
    first, targets = imp.moments, imp.dense_targets
    imp(group), criteria.prepare(imp, copy.deepcopy(tiny))  # same structure, even a copy: no new pass
    assert imp.moments is first
    pruner.step()  # no prepare needed: the pruner's groups lead to the model, whose structure changed
    imp(groups_of(tiny)[0])
    assert imp.moments is not first and imp.dense_targets is targets
    assert max(c.stop for c in imp.columns.values()) == sum(dict(tiny.named_modules())[n].weight.shape[0] for n in GATED)
    with pytest.raises(CompressError, match="same calibration data"):
        imp.prepare(copy.deepcopy(tiny), list(reversed(batches)))


def test_user_errors(tiny, batches):
    with pytest.raises(CompressError, match="no calibration data"):
        criteria.get("jbr")(groups_of(tiny)[0])
    with pytest.raises(CompressError, match="labelled"):
        criteria.prepare(criteria.get("jacobian"), tiny, [x for x, _ in batches])
    with pytest.raises(CompressError, match="nothing to score"):
        criteria.prepare(criteria.get("jbr-batch"), tiny, batches)  # an untrained net is never 90% confident
    with pytest.raises(CompressError, match="target"):
        JBRImportance(batches, target="logits")
    with pytest.raises(CompressError, match="unknown criterion 'nope'.*jbr, .*random"):
        criteria.get("nope")


@pytest.mark.parametrize("name", criteria.names())
def test_every_criterion_runs_through_the_pruner(name):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():  # default BN init (γ = 1) ties every 'bn' score
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    data = list(torch.utils.data.DataLoader(synthetic(16), batch_size=8))
    imp = criteria.get(name, data, **({"confidence": 0.0} if name in ("jbr-batch", "jbr-ref") else {}))  # random net: unsure
    assert isinstance(imp, tp.importance.Importance)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, 1, 28, 28), importance=imp, global_pruning=True,
                                  iterative_steps=2, pruning_ratio=0.3, ignored_layers=[model.fc])
    for _ in range(2):
        criteria.prepare(imp, model)  # the uniform hook: a no-op for magnitude criteria, cached for the rest
        pruner.step()
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before


def test_jbr_mac_divides_by_the_macs_a_removal_really_saves(tiny, batches):
    from compress.plan import layer_macs

    x = torch.zeros(1, *X_SHAPE, dtype=torch.float64)
    imp, plain = criteria.get("jbr-mac", batches), criteria.get("jbr", batches, normalizer="none")
    before = sum(layer_macs(tiny, x).values())
    for group in groups_of(tiny):
        scores, saved = imp(group), imp.macs_saved(group)
        pruned = copy.deepcopy(tiny)
        root = next(g for g in groups_of(pruned) if gated_names(pruned, g) == gated_names(tiny, group))[0].dep
        graph_of(pruned).get_pruning_group(root.target.module, root.handler, idxs=[1]).prune()
        assert saved[1].item() == pytest.approx(before - sum(layer_macs(pruned, x).values()))
        torch.testing.assert_close(scores.double(), (plain(group).double() / saved).float().double())


@pytest.mark.parametrize("pruner", ["BasePruner", "MetaPruner", "MagnitudePruner", "GroupNormPruner", "BNScalePruner",
                                    "GrowingRegPruner"])
@pytest.mark.parametrize("global_pruning", [True, False])
def test_jbr_needs_no_hook_inside_any_torch_pruning_pruner(tiny, batches, pruner, global_pruning):
    imp = criteria.get("jbr", batches, normalizer="none")
    net = getattr(tp.pruner, pruner)(tiny, torch.zeros(1, *X_SHAPE, dtype=torch.float64), importance=imp,
                                     global_pruning=global_pruning, iterative_steps=2, pruning_ratio=0.3,
                                     ignored_layers=[tiny.head])
    widths = []
    for _ in range(2):
        net.step()
        widths.append(max(c.stop for c in imp.columns.values()))  # the pass of this step: before its pruning
        assert tiny(batches[0][0]).shape == (5, 3)
    assert widths[1] < widths[0] and sum(p.numel() for p in tiny.parameters()) < 0.9 * sum(
        p.numel() for p in TinyResNet().parameters())


def centred_brute_force(net: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Per sample and gated channel, Σ_positions (a − μ)·∂s/∂a with s = f_m(x), m the dense predicted class and μ
    the channel's mean output over all samples and positions: one backward per sample through the kept outputs."""
    modules = dict(net.named_modules())
    xs, objective = per_sample_objective("predicted", net, batches)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in GATED]
    try:
        with torch.no_grad():
            net(torch.cat(xs))
            means = {n: o.transpose(0, 1).reshape(o.shape[1], -1).mean(1) for n, o in outputs.items()}
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in GATED}
        for i, x in enumerate(xs):
            s = objective(net(x), i)
            grads = torch.autograd.grad(s, [outputs[n] for n in GATED])
            for n, g in zip(GATED, grads):
                centred = outputs[n] - means[n].reshape(1, -1, *[1] * (g.dim() - 2))
                rows[n].append((centred * g).reshape(1, g.shape[1], -1).sum(2)[0].detach())
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("planned", [True, False])
def test_centred_jbr_squares_the_coupled_sum_of_brute_force_mean_replacement_effects(tiny, batches, planned):
    imp = criteria.get("jbr-centred", batches, normalizer="none")
    if planned:  # the groups are known before the pass: moments per group, no rows kept
        criteria.prepare(imp, tiny, batches, ignored_layers=[tiny.head])
        assert imp.derivatives is None and imp.moments
    rows = centred_brute_force(tiny, batches)
    for group in groups_of(tiny):
        names = gated_names(tiny, group)
        expected = (sum(rows[n] for n in names) ** 2).mean(0)
        torch.testing.assert_close(imp(group).double(), expected, rtol=1e-5, atol=1e-9)
    if not planned:
        assert imp.derivatives is not None and imp.shift_derivatives is not None


def test_centring_changes_every_groups_scores(tiny, batches):
    plain = criteria.get("jbr", batches, normalizer="none")
    centred = criteria.get("jbr-centred", batches, normalizer="none")
    differs = [not torch.allclose(plain(g), centred(g)) for g in groups_of(tiny)]
    assert all(differs)


def _scaled_gradients(net: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂L/∂s of L = mean CE(f(x), y*) for a multiplicative gate s on each layer's output channels (every parameter
    of the channel scaled) and on each conv/linear's input channels, by autograd through torch.func."""
    from torch.func import functional_call

    modules = dict(net.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name in ("a1", "abn1", "a2", "d1", "dbn1", "d2"):
        layer = modules[name]
        sides = ("out",) if isinstance(layer, nn.BatchNorm2d) else ("out", "in")
        for side in sides:
            width = layer.weight.shape[0 if side == "out" else 1]
            s = torch.ones(width, dtype=torch.float64, requires_grad=True)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1) if side == "out" else (1, -1) + (1,) * (layer.weight.dim() - 2)
            params = {f"{name}.weight": layer.weight * s.reshape(shape)}
            if side == "out" and layer.bias is not None:
                params[f"{name}.bias"] = layer.bias * s
            loss = F.cross_entropy(functional_call(net, params, (x,)), classes)
            out[f"{name}:{side}"] = torch.autograd.grad(loss, s)[0]
    return out


def test_jbr_ref_sums_the_squared_per_layer_gate_derivatives_of_the_batch_loss(tiny, batches):
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        classes = tiny(x).argmax(1)
    imp = criteria.get("jbr-ref", [x], confidence=0.0)  # one batch of every sample: the order does not matter
    assert imp.normalizer == "none"
    d = _scaled_gradients(tiny, x, classes)
    expected = {"a1": d["a1:out"] ** 2 + d["abn1:out"] ** 2 + d["a2:in"] ** 2,
                "d1": d["d1:out"] ** 2 + d["dbn1:out"] ** 2 + d["d2:in"] ** 2}
    graph = graph_of(tiny)
    for name, value in expected.items():
        group = graph.get_pruning_group(getattr(tiny, name), tp.prune_conv_out_channels, idxs=list(range(len(value))))
        torch.testing.assert_close(imp(group).double(), value, rtol=1e-5, atol=1e-12)


def test_jbr_ref_reshuffles_its_confident_pool_at_every_pass(tiny, batches):
    imp = criteria.get("jbr-ref", batches, confidence=0.0, batch_size=3).importance
    criteria.prepare(imp, tiny)
    first = {k: v.clone() for k, v in imp.terms.items()}
    imp.invalidate()
    criteria.prepare(imp, tiny)
    assert imp.passes == 2 and len(imp.pool[1]) == 10
    assert any(not torch.allclose(first[k], imp.terms[k]) for k in first)  # other batches, other batch gradients
    with pytest.raises(CompressError, match="no calibration sample has dense confidence > 0.999"):
        criteria.prepare(criteria.get("jbr-ref", batches, confidence=0.999), tiny)
