"""``python -m compress.bench removal``: how well each criterion predicts the damage of removing one channel, before
and after BatchNorm recalibration (the ablation behind a criterion that leads before recalibration and trails after).

For a seeded sample of root channels of the model's pruning groups (the classifier's outputs excluded): zero the
channel in every layer of its group (the same function as removing it), measure the test prediction variance it
causes on the calibration inputs, T(c) = E_x[(m(x)ᵀ(f'(x) − f(x)))²] with m(x) the dense model's predicted class
(what JBR estimates to first order), once with the dense BatchNorm statistics (``frozen``) and once after
recalibrating them on the same inputs (``recal``); the dense model is recalibrated on those inputs first, so
T measures the removal alone and the scores see the statistics recalibration starts from; then score every group with each criterion (raw scores, no
normaliser, on the same inputs) and report the Spearman rank correlation of score and T over the sampled channels.
A score that ranks the channels as their damage after recalibration does is what the global ranking needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import criteria
from criteria.jbr import LAYERS, is_out_channel_pruning, pruning_graph

from ..adapters import adapter_for
from ..adapters.spec import spec_of
from ..atomic import write_text
from ..batches import first_rows, predict
from ..data import FashionMNIST, calibration, inputs_of
from ..nn_helpers import on_model
from ..output import machine, markdown_table, write_json
from ..recover import recalibrate_bn
from .pruning import ARCHS, dense_model

DEFAULT_CRITERIA = ["jbr", "jbr-centred", "jbr-recal", "taylor", "bn", "l2", "random"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="small_resnet", choices=ARCHS)
    p.add_argument("--train-epochs", type=int, default=None, help="as for the pruning benchmark (cache key)")
    p.add_argument("--train-samples", type=int, default=None, help="train the dense model on a subset (tests)")
    p.add_argument("--criteria", nargs="+", default=DEFAULT_CRITERIA, choices=criteria.names())
    p.add_argument("--channels", type=int, default=128, help="root channels sampled (all when fewer)")
    p.add_argument("--calibration", type=int, default=256, help="calibration samples (scores, T and recalibration)")
    p.add_argument("--calibration-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties broken by position)."""
    ranks = [t.double().argsort().argsort().double() for t in (a, b)]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


@torch.no_grad()
def predicted_logits(model: nn.Module, data: Any, classes: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """s(x) = f(x)[m(x)] over the batches of ``data``, m the given classes per batch (default: the model's own)."""
    values, seen = [], []
    for index, batch in enumerate(data):
        logits = predict(model, on_model(inputs_of(batch), model)).double()
        m = logits.argmax(1) if classes is None else classes[index]
        seen.append(m)
        values.append(logits.gather(1, m[:, None])[:, 0])
    return torch.cat(values), seen


@torch.no_grad()
def zero_channel(group: Any, channel: int) -> None:
    """Zero root channel ``channel`` of ``group`` in every layer that outputs it (weight rows, bias, BatchNorm scale
    and shift), so the channel is 0 wherever it is read: what removing it does."""
    for item in group:
        if not is_out_channel_pruning(item.dep):
            continue
        layer = item.dep.target.module
        local = [int(i) for i, r in zip(item.idxs, item.root_idxs) if r is not None and int(r) == channel]
        for name in ("weight", "bias"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, Tensor) and local:
                tensor[local] = 0


def _sampled(groups: list[Any], count: int, seed: int) -> list[tuple[int, int]]:
    """(group index, root channel) pairs, a seeded uniform sample over all root channels."""
    pairs = [(g, c) for g, group in enumerate(groups) for c in range(len(group[0].idxs))]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:count]
    return [pairs[int(i)] for i in order]


def damage(model: nn.Module, groups: list[Any], pairs: list[tuple[int, int]], calib: Any) -> list[dict[str, Any]]:
    """T(c) frozen and after recalibration for each sampled channel; the model is restored after each."""
    dense, classes = predicted_logits(model, calib)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    names = {m: n for n, m in model.named_modules()}
    try:
        for g, c in pairs:
            zero_channel(groups[g], c)
            frozen, _ = predicted_logits(model, calib, classes)
            recalibrate_bn(model, calib, progress=False)
            recal, _ = predicted_logits(model, calib, classes)
            model.load_state_dict(original)
            rows.append({"group": names.get(groups[g][0].dep.target.module, "?"), "group_index": g, "channel": c,
                         "T_frozen": float(((frozen - dense) ** 2).mean()),
                         "T_recal": float(((recal - dense) ** 2).mean())})
    finally:
        model.load_state_dict(original)
    return rows


def scores(model: nn.Module, groups: list[Any], ignored: list[nn.Module], graph: Any, calib: Any,
           names: list[str]) -> dict[str, list[Tensor | None]]:
    """Each criterion's raw scores of every group."""
    out = {}
    for name in names:
        torch.manual_seed(0)
        importance = criteria.get(name, calib, normalizer="none")
        criteria.prepare(importance, model, calib, graph=graph, ignored_layers=ignored)
        out[name] = [importance(group) for group in groups]
    return out


def calib_for(model: nn.Module, args: argparse.Namespace) -> Any:
    """The seeded calibration subset of the training images, in the model's input shape."""
    shape = spec_of(model).input_shape
    train = FashionMNIST("train", channels=shape[0], image_size=shape[-1])
    return calibration(train, args.calibration, args.calibration_batch, seed=args.seed)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    model = dense_model(args).eval()
    recalibrate_bn(model, calib_for(model, args), progress=False)  # the reference: T measures the removal alone
    calib = calib_for(model, args)
    example = first_rows(on_model(inputs_of(next(iter(calib))), model), 1)
    adapter = adapter_for(model)
    ignored = adapter.never_pruned(model)
    graph = pruning_graph(model, example)
    groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS))
    pairs = _sampled(groups, args.channels, args.seed)
    rows = damage(model, groups, pairs, calib)
    scored = scores(model, groups, ignored, graph, calib, args.criteria)
    for row in rows:
        for name, per_group in scored.items():
            s = per_group[row["group_index"]]
            row[name] = float("nan") if s is None else float(s[row["channel"]])
    frozen = torch.tensor([r["T_frozen"] for r in rows])
    recal = torch.tensor([r["T_recal"] for r in rows])
    summary = [{"criterion": name, "frozen": spearman(torch.tensor([r[name] for r in rows]), frozen),
                "recal": spearman(torch.tensor([r[name] for r in rows]), recal)} for name in args.criteria]
    summary.append({"criterion": "T frozen", "frozen": 1.0, "recal": spearman(frozen, recal)})
    payload = {"benchmark": "removal", "machine": machine(), "settings": vars(args), "summary": summary, "rows": rows}
    write_json(out / "removal.json", payload)
    table = markdown_table(["score", "Spearman ρ with T frozen", "Spearman ρ with T after BN recal"],
                           [[s["criterion"], f"{s['frozen']:.3f}", f"{s['recal']:.3f}"] for s in summary])
    write_text(out / "removal.md", f"{args.arch}: {len(rows)} channels of {len(groups)} groups, "
               f"{args.calibration} calibration images\n\n{table}", overwrite=True)
    for s in summary:
        print(f"{s['criterion']}: rho frozen {s['frozen']:.3f}, rho recal {s['recal']:.3f}", flush=True)
    return payload

