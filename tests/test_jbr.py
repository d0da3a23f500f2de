"""JBR gate derivatives against brute force in float64 on a tiny residual CNN; the criteria registry end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import criteria
from compress import CompressError, resolve
from compress.data import synthetic
from criteria.jbr import GateImportance, is_out_channel_pruning


class TinyResNet(nn.Module):
    """Stem, an identity block (channels coupled with the stem) and a downsampling block, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.a1, self.abn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.a2, self.abn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b1, self.bbn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.b2 = nn.Conv2d(6, 6, 3, padding=1)  # no BN: gated on the conv output
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.abn2(self.a2(F.relu(self.abn1(self.a1(x))))) + x)
        x = F.relu(self.b2(F.relu(self.bbn1(self.b1(x)))) + self.down(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    net = TinyResNet().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)]


def _channel_params(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters that make up each gated channel's output (BN affine, or conv weight and bias)."""
    return {"bn0": [net.bn0.weight, net.bn0.bias], "abn1": [net.abn1.weight, net.abn1.bias],
            "abn2": [net.abn2.weight, net.abn2.bias], "bbn1": [net.bbn1.weight, net.bbn1.bias],
            "b2": [net.b2.weight, net.b2.bias], "down": [net.down.weight, net.down.bias]}


def brute_force_derivatives(net, batches):
    """Per-sample loop: d(m(x)ᵀ f(x)) w.r.t. every parameter, reduced to Σ_{params of channel c} w·∂w."""
    rows = {name: [] for name in _channel_params(net)}
    for x in torch.cat(batches):
        out = net(x[None])[0]
        target = out[out.argmax()]
        for name, params in _channel_params(net).items():
            grads = torch.autograd.grad(target, params, retain_graph=True)
            rows[name].append(sum((p * g).reshape(p.shape[0], -1).sum(1) for p, g in zip(params, grads)))
    return {name: torch.stack(r) for name, r in rows.items()}


def test_gate_derivatives_equal_per_sample_loop(tiny, batches):
    imp = criteria.get("jbr")
    imp.prepare(tiny, batches)
    expected = brute_force_derivatives(tiny, batches)
    assert set(imp._derivs) == set(expected) | {"head"}  # conv->BN pairs gate the BN; unpaired convs themselves
    for name, d in expected.items():
        torch.testing.assert_close(imp._derivs[name].double(), d, atol=1e-6, rtol=1e-5)


def _groups(net):
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    return list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[net.head]))


def test_group_scores_sum_coupled_derivatives_before_squaring(tiny, batches):
    imp = criteria.get("jbr")
    imp.prepare(tiny, batches)
    d = brute_force_derivatives(tiny, batches)
    names = {id(m): n for n, m in tiny.named_modules()}
    coupled_seen = False
    for group in _groups(tiny):
        gated = {names.get(id(dep.target.module)) for dep, _ in group if is_out_channel_pruning(dep)} & set(d)
        expected = (sum(d[n] for n in gated) ** 2).mean(0)  # all layers here keep channel order: idxs == root idxs
        torch.testing.assert_close(imp(group).double(), expected.float().double(), rtol=1e-5, atol=1e-9)
        coupled_seen |= gated >= {"bn0", "abn2"}
    assert coupled_seen  # the stem's channels are coupled with the identity block's output


def test_coupled_score_is_first_order_change_of_removing_the_group(tiny, batches):
    """Scaling every coupled channel c by (1 - t): d/dt of m(x)ᵀf at t=0 equals minus the summed gate derivative."""
    imp = criteria.get("jbr")
    imp.prepare(tiny, batches)
    x = torch.cat(batches)
    with torch.no_grad():
        cls = tiny(x).argmax(1)
    group = next(g for g in _groups(tiny) if any(dep.target.module is tiny.bn0 for dep, _ in g))
    per_sample = imp.row_derivatives(group).double()  # (samples, channels)
    c, t = 2, 1e-6

    def objective(scale):
        net = TinyResNet().double().eval()
        net.load_state_dict(tiny.state_dict())
        with torch.no_grad():
            for bn in (net.bn0, net.abn2):  # the coupled BNs: scaling γ_c and β_c scales the channel's output
                bn.weight[c] *= scale
                bn.bias[c] *= scale
            return net(x).gather(1, cls[:, None])[:, 0]

    finite_difference = (objective(1 - t) - objective(1 + t)) / (2 * t)
    torch.testing.assert_close(finite_difference, -per_sample[:, c], atol=1e-6, rtol=1e-5)
    assert imp(group)[c].item() == pytest.approx(float((per_sample[:, c] ** 2).mean()), rel=1e-5)


def test_jbr_batch_is_squared_batch_gradient_of_confident_cross_entropy(tiny, batches):
    with torch.no_grad():
        threshold = float(tiny(torch.cat(batches)).softmax(1).max(1).values.median())
    imp = criteria.get("jbr-batch", confidence=threshold)
    imp.prepare(tiny, batches)
    expected = []
    for x in batches:
        with torch.no_grad():
            probs = tiny(x).softmax(1)
        conf, pseudo = probs.max(1)
        keep = conf > threshold
        assert 0 < keep.sum() < len(x)  # the mask matters for this check
        loss = F.cross_entropy(tiny(x)[keep], pseudo[keep])
        grads = torch.autograd.grad(loss, [tiny.bbn1.weight, tiny.bbn1.bias])
        expected.append(tiny.bbn1.weight * grads[0] + tiny.bbn1.bias * grads[1])
    torch.testing.assert_close(imp._derivs["bbn1"].double(), torch.stack(expected).detach(), atol=1e-7, rtol=1e-5)


def test_scores_before_prepare_and_jacobian_without_labels_are_user_errors(tiny, batches):
    with pytest.raises(CompressError, match="criteria.prepare"):
        criteria.get("jbr")(_groups(tiny)[0])
    with pytest.raises(CompressError, match="labelled"):
        criteria.get("jacobian").prepare(tiny, batches)
    with pytest.raises(CompressError, match="nothing to score"):
        criteria.get("jbr-batch").prepare(tiny, batches)  # an untrained net is never 90% confident
    with pytest.raises(CompressError, match="unknown criterion"):
        criteria.get("nope")


def test_cache_is_reused_until_the_structure_changes(tiny, batches):
    imp = criteria.get("jbr")
    imp.prepare(tiny, batches)
    first = imp._derivs
    imp.prepare(tiny, batches)
    assert imp._derivs is first
    pruner = tp.pruner.BasePruner(tiny, torch.zeros(1, 2, 6, 6, dtype=torch.float64), importance=imp,
                                  pruning_ratio=0.3, ignored_layers=[tiny.head], global_pruning=True)
    pruner.step()
    imp.prepare(tiny, batches)
    assert imp._derivs is not first and imp._derivs["b2"].shape[1] == tiny.b2.out_channels


@pytest.mark.parametrize("name", criteria.names())
def test_every_criterion_runs_through_the_pruner(name):
    torch.manual_seed(0)
    model = resolve("small_resnet").eval()
    with torch.no_grad():  # default BN init (γ = 1) ties every 'bn' score
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    data = [(x, y) for x, y in torch.utils.data.DataLoader(synthetic(32), batch_size=16)]
    imp = criteria.get(name, **({"confidence": 0.0} if name == "jbr-batch" else {}))  # random net: never confident
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, 1, 28, 28), importance=imp, global_pruning=True,
                                  iterative_steps=2, pruning_ratio=0.3, ignored_layers=[model.fc])
    for _ in range(2):
        criteria.prepare(imp, model, data)
        pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_macs_saved_equals_the_conv_and_linear_macs_a_removal_removes(tiny, batches):
    """jbr-mac's denominator: removing one channel of a group really saves that many Conv/Linear MACs."""
    import copy

    from compress.plan import layer_macs

    imp = criteria.get("jbr-mac")
    imp.prepare(tiny, batches)
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    before = sum(layer_macs(tiny, x).values())
    for k, group in enumerate(_groups(tiny)):
        saved = imp.macs_saved(group)
        net = copy.deepcopy(tiny)
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        root = graph.get_pruning_group(dict(net.named_modules())[{id(m): n for n, m in tiny.named_modules()}[
            id(group[0].dep.target.module)]], group[0].dep.handler.__self__.prune_out_channels, idxs=[1])
        root.prune()
        assert saved[1].item() == pytest.approx(before - sum(layer_macs(net, x).values()))
        scores = imp(group)
        plain = criteria.get("jbr")
        plain.prepare(tiny, batches)
        torch.testing.assert_close(scores.double(), (plain(group).double() / saved).float().double())
