"""Every criterion honours ``normalizer``: its scores per group are the raw scores divided as documented."""

from __future__ import annotations

import pytest
import torch

import criteria
from compress import CompressError, Target, prune
from compress.data import synthetic
from compress.small_resnet import SmallResNet
from tiny_resnet import groups_of

OPTIONS = {"jbr-batch": {"confidence": 0.0}, "jbr-ref": {"confidence": 0.0}}  # a random net is never 90% confident
DIVISORS = {"mean": torch.mean, "max": torch.max, "sum": torch.sum}


def _scores(name: str, data, normalizer: str, groups) -> tuple[list, criteria.normalize.NormalizedImportance]:
    imp = criteria.get(name, data, normalizer=normalizer, **OPTIONS.get(name, {}))
    out = []
    for group in groups:
        torch.manual_seed(0)  # the random criterion draws the same scores for every normaliser
        out.append(imp(group))
    return out, imp


@pytest.mark.parametrize("name", criteria.names())
def test_every_criterion_honours_the_normalizer(tiny, batches, name):
    groups = groups_of(tiny)
    raw, _ = _scores(name, batches, "none", groups)
    assert any(r is not None for r in raw)
    for normalizer, divide in DIVISORS.items():
        scores, imp = _scores(name, batches, normalizer, groups)
        assert imp.normalizer == normalizer
        for r, s in zip(raw, scores):
            if r is None:
                assert s is None
                continue
            expected = r / divide(r) if divide(r) > 0 else r
            torch.testing.assert_close(s.double(), expected.double(), rtol=1e-5, atol=1e-12)
    scores, imp = _scores(name, batches, "macs", groups)
    for group, r, s in zip(groups, raw, scores):
        if r is not None:
            saved = imp.macs_saved(group)
            assert bool((saved > 0).all())
            torch.testing.assert_close(s.double(), r.double() / saved, rtol=1e-5, atol=1e-12)


def test_each_criterion_has_one_default_but_jbr_mac_and_the_papers_jbr():
    assert criteria.DEFAULT_NORMALIZER in criteria.NORMALIZERS
    assert criteria.default_normalizer("jbr-mac") == "macs" and criteria.default_normalizer("jbr-ref") == "none"
    others = {criteria.default_normalizer(n) for n in criteria.names() if n not in ("jbr-mac", "jbr-ref")}
    assert others == {criteria.DEFAULT_NORMALIZER}
    assert criteria.get("l2").normalizer == criteria.DEFAULT_NORMALIZER


def test_an_unknown_normalizer_is_one_line_before_any_work():
    with pytest.raises(CompressError, match=r"unknown normalizer 'median'; fix: use one of none, mean, max, sum, macs"):
        criteria.get("l1", normalizer="median")
    model = SmallResNet().eval()
    with pytest.raises(CompressError, match="unknown normalizer"):
        prune(model, synthetic(8), "l1", Target(macs=0.5), normalizer="median", progress=False)


def test_prune_uses_the_normalizer_and_it_changes_the_global_ranking():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = synthetic(32)
    widths = {}
    for normalizer in ("none", "mean", "macs"):
        r = prune(model, data, "l2", Target(macs=0.6), steps=1, normalizer=normalizer, progress=False)
        assert r.macs_ratio == pytest.approx(0.6, abs=0.02)
        widths[normalizer] = tuple(layer.after for layer in r.layers)
    assert len(set(widths.values())) == 3  # three different global rankings
