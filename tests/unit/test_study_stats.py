"""The study's statistics and verdicts on hand-made numbers: t intervals, crossings, correlations, and the
sentences that say "not enough data" or "does not reproduce" when the numbers say so."""

from __future__ import annotations

import math

import pytest

from sftlab.study.answers import _corr_verdict, best_by_weight
from sftlab.study.stats import correlation, crossing, evenly, mean_ci, ranks
from sftlab.trajectory import Point


def test_mean_ci_is_a_student_t_interval():
    e = mean_ci([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.n == 3
    assert e.high - e.mean == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    one = mean_ci([5.0, None, float("nan")])
    assert (one.mean, one.low, one.high, one.n) == (5.0, 5.0, 5.0, 1) and not one.excludes_zero()
    assert mean_ci([]).n == 0 and mean_ci([]).text() == "-"


def test_crossing_interpolates_between_checkpoints():
    pts = [(0, 0.1, 0.0), (10, 0.5, -0.2), (20, 0.9, -0.6)]
    assert crossing(pts, 0.7) == pytest.approx(-0.4)  # half-way from step 10 to 20
    assert crossing(pts, 0.5) == pytest.approx(-0.2)
    assert crossing(pts, 0.95) is None
    assert crossing(pts, 0.05) == 0.0  # the base already reaches it


def test_correlations_and_ranks():
    assert ranks([3.0, 1.0, 1.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]
    c = correlation([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 13])
    assert c.pearson > 0.99 and c.spearman == pytest.approx(1.0) and c.n == 6
    assert c.pearson_ci[0] < c.pearson <= c.pearson_ci[1]
    assert correlation([1, 2, None], [1, 2, 3]).n == 2
    assert evenly([2, 4, 6, 8, 10], 3) == [2, 6, 10] and evenly([2, 4], 5) == [2, 4] and evenly([1, 2, 3], 1) == [3]


def test_verdicts_say_when_a_finding_does_not_reproduce():
    small = correlation([1, 2, 3, 4], [1, 2, 3, 5])
    assert _corr_verdict(small, 0.71).startswith("not enough data")
    xs = list(range(12))
    opposite = correlation(xs, [-x + (x % 3) * 0.1 for x in xs])
    assert _corr_verdict(opposite, 0.71).startswith("does not reproduce at this size: the sign is opposite")
    noise = correlation(xs, [1, -1, 2, -2, 0, 1, -1, 2, 0, -2, 1, 0])
    assert "spans zero" in _corr_verdict(noise, -0.76) or "opposite" in _corr_verdict(noise, -0.76)
    agree = correlation(xs, [x + (x % 2) * 3 for x in xs])
    assert _corr_verdict(agree, 0.71).startswith("reproduces")


def test_best_alpha_is_the_weighted_best_after_scaling_over_base_and_grid():
    base = Point(0, 0.0, 0.0)
    half = Point(10, 0.8, -0.1, alpha=0.5)
    final = Point(10, 1.0, -1.0, alpha=1.0)
    assert best_by_weight([base, half, final], [half, final], 0.5) is half
    assert best_by_weight([base, half, final], [half, final], 1.0) is final


def test_centred_procrustes_is_peft_arenas_definition():
    """PEFT-Arena centres both activation matrices first (REFERENCES.md): a shift added to every token of the
    fine-tuned activations moves the uncentred residual, not the centred one."""
    import torch

    from sftlab.analysis.activations import compare, procrustes

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 8, generator=g) + 3.0
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    x1 = x0 @ q + 5.0  # a rotation plus a shared offset
    res = compare(x0, x1, ks=())
    assert res["procrustes_centred"] == pytest.approx(procrustes(x0 - x0.mean(0), x1 - x1.mean(0))[0])
    assert res["procrustes_centred"] < 1e-6 < res["procrustes_residual"]
