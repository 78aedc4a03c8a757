"""Frontier, overshoot, rewind policies and hypervolume on hand-made points (no models)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sftlab.errors import SftlabError
from sftlab.registry import RegistryError
from sftlab.trajectory import (POLICIES, Point, dominates, dominates_significantly, hypervolume_2d, orient,
                               orient_ci, overshoot, pareto_front, point_from_scores, rewind)


def P(step, task, ret, ci=None, alpha=None):
    """A point; ci is a half-width applied to both axes."""
    if ci is None:
        return Point(step, task, ret, alpha=alpha)
    return Point(step, task, ret, (task - ci, task + ci), (ret - ci, ret + ci), alpha=alpha)


def steps(points):
    return [p.step for p in points]


def test_no_torch_at_import():
    code = "import sys, sftlab.trajectory; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- orientation ------------------------------------------------------------------------------------

def test_orient_negates_lower_is_better_and_flips_its_interval():
    assert orient(2.5, True) == 2.5 and orient(2.5, False) == -2.5
    assert orient_ci((1.0, 3.0), False) == (-3.0, -1.0)
    assert orient_ci((1.0, 3.0), True) == (1.0, 3.0) and orient_ci(None, False) is None


def test_point_from_score_dicts():
    task = {"name": "exact_match", "value": 0.9, "higher_is_better": True, "ci_low": 0.85, "ci_high": 0.95}
    kl = {"name": "kl", "value": 0.2, "higher_is_better": False, "ci_low": 0.15, "ci_high": 0.3}
    p = point_from_scores(10, task, kl)
    assert (p.task, p.retention) == (0.9, -0.2)
    assert p.task_ci == (0.85, 0.95) and p.retention_ci == (-0.3, -0.15)
    assert p.ci("retention") == (-0.3, -0.15)
    no_ci = point_from_scores(0, {"value": 1.0}, {"value": 3.0, "higher_is_better": False})
    assert no_ci.ci("task") == (1.0, 1.0) and no_ci.retention == -3.0


# ---- Pareto logic -----------------------------------------------------------------------------------

def test_front_of_a_clear_tradeoff():
    pts = [P(0, 0.0, 1.0), P(10, 0.5, 0.9), P(20, 0.4, 0.8), P(30, 0.9, 0.5), P(40, 0.85, 0.4)]
    assert steps(pareto_front(pts)) == [0, 10, 30]  # 20 is dominated by 10, 40 by 30


def test_ties_on_one_axis():
    a, b = P(10, 0.5, 0.8), P(20, 0.5, 0.6)  # same task, a keeps more
    assert dominates(a, b) and not dominates(b, a)
    assert steps(pareto_front([a, b])) == [10]
    assert not dominates(a, b, tol=0.3), "a difference within tol does not dominate"
    assert steps(pareto_front([a, b], tol=0.3)) == [10, 20]


def test_exact_duplicates_are_both_kept():
    a, b = P(10, 0.5, 0.5), P(20, 0.5, 0.5)
    assert not dominates(a, b) and not dominates(b, a)
    assert steps(pareto_front([a, b, P(30, 0.1, 0.1)])) == [10, 20]


def test_one_point_is_its_own_front():
    assert steps(pareto_front([P(5, 0.1, -3.0)])) == [5]
    assert pareto_front([]) == []


def test_everything_dominated_by_the_base():
    base = P(0, 0.5, 1.0)
    pts = [base, P(10, 0.4, 0.9), P(20, 0.5, 0.7), P(30, 0.3, 1.0)]
    assert steps(pareto_front(pts)) == [0]
    assert steps(overshoot(pts)) == [0]  # without CIs, plain dominance by more than tol counts
    choice = rewind(pts, "knee")  # no checkpoint beats the base: the base is kept, and the reason says so
    assert choice.point.step == 0 and "the base (task 0.5, retention 1) is kept" in choice.reason


# ---- significance -----------------------------------------------------------------------------------

def test_noise_sized_differences_with_overlapping_cis_are_not_overshoot():
    pts = [P(0, 0.0, 1.0, ci=0.02), P(10, 0.60, 0.91, ci=0.05), P(20, 0.59, 0.90, ci=0.05)]
    # step 10 is better on both axes by a hair, so it dominates on values...
    assert dominates(pts[1], pts[2])
    # ...but its intervals overlap the final point's, so that is no evidence of overshoot
    assert not dominates_significantly(pts[1], pts[2])
    assert overshoot(pts) == []


def test_a_planted_clear_drop_is_overshoot():
    pts = [P(0, 0.0, 1.0, ci=0.02), P(10, 0.60, 0.91, ci=0.02), P(20, 0.80, 0.85, ci=0.02),
           P(30, 0.79, 0.50, ci=0.02)]  # the last step lost retention and gained nothing
    assert steps(overshoot(pts)) == [20]
    assert steps(overshoot(pts[:3])) == []


def test_significance_rule_allows_a_tolerated_slip_on_the_other_axis():
    a = P(10, 0.795, 0.90, ci=0.01)
    b = P(20, 0.80, 0.50, ci=0.01)
    assert not dominates(a, b)  # a is slightly worse on task
    assert dominates_significantly(a, b, tol=0.01)  # within tol on task, clearly better on retention
    assert not dominates_significantly(a, b, tol=0.0)


def test_tolerance_blocks_significance_even_with_tight_cis():
    a, b = P(10, 0.5, 0.52, ci=0.001), P(20, 0.5, 0.50, ci=0.001)
    assert dominates_significantly(a, b, tol=0.0)
    assert not dominates_significantly(a, b, tol=0.05)


def test_final_is_the_latest_checkpoint_even_when_interpolations_share_its_step():
    pts = [P(0, 0.0, 1.0), P(20, 0.7, 0.9, alpha=0.5), P(20, 0.7, 0.5)]
    assert overshoot(pts)[0].alpha == 0.5


# ---- rewind policies --------------------------------------------------------------------------------

# base; a steep early gain; the knee; more task at a high retention price; the final point overshoots
HAND = [P(0, 0.10, -1.00), P(10, 0.60, -1.05), P(20, 0.80, -1.10), P(30, 0.85, -1.60), P(40, 0.84, -1.90)]


def test_policies_are_registered():
    assert POLICIES.names() == ["knee", "max_retention_with_task", "max_task_with_retention_loss", "select",
                              "weighted"]
    with pytest.raises(RegistryError, match="did you mean 'knee'"):
        rewind(HAND, "kne")
    with pytest.raises(SftlabError, match="unknown option 'w'"):
        rewind(HAND, "knee", w=0.3)


def test_knee_is_the_bulge_of_the_front():
    choice = rewind(HAND, "knee")
    assert choice.point.step == 20
    assert choice.reason.startswith("knee of the checkpoints whose task score is above the base's 95% CI")
    assert "3 Pareto-optimal candidates" in choice.reason
    assert "task 0.8" in choice.reason and "distance 0." in choice.reason


def test_knee_is_never_the_base_when_a_checkpoint_beats_its_ci():
    """The base is the origin of the plane, not a candidate: even where it would be nearest the ideal corner
    (it loses little task and keeps all retention), a checkpoint above the base's task CI is chosen."""
    far = [P(0, 0.10, -1.00), P(20, 0.30, -1.80), P(30, 0.05, -1.9)]  # step 20 scaled (1, 0.11), base (0.2, 1)
    assert rewind(far, "knee").point.step == 20
    two = [P(0, 0.10, -1.00), P(20, 0.60, -1.05), P(30, 0.90, -1.80)]  # two candidates on their own chord
    choice = rewind(two, "knee")
    assert choice.point.step == 20 and "no knee" in choice.reason
    # with CIs: step 20's gain is inside the base's interval, so only step 30 qualifies
    noisy = [P(0, 0.10, -1.00, ci=0.25), P(20, 0.30, -1.01, ci=0.25), P(30, 0.60, -1.50, ci=0.1)]
    assert rewind(noisy, "knee").point.step == 30
    # no checkpoint above the base's CI: the base, said so
    flat = [P(0, 0.10, -1.00, ci=0.25), P(20, 0.30, -1.01, ci=0.25)]
    choice = rewind(flat, "knee")
    assert choice.point.step == 0 and "no checkpoint's task score is above the base's 95% CI" in choice.reason


def test_max_task_with_retention_loss():
    choice = rewind(HAND, "max_task_with_retention_loss", max_loss=0.2)
    assert choice.point.step == 20
    assert "at most 0.2 below" in choice.reason and "drop is 0.1" in choice.reason and "2 of 5" in choice.reason
    assert rewind(HAND, "max_task_with_retention_loss", max_loss=1.0).point.step == 30
    keep = rewind(HAND, "max_task_with_retention_loss", max_loss=0.0)  # nothing trained is that faithful
    assert keep.point.step == 0 and "is kept" in keep.reason and "lost at most 0" in keep.reason


def test_max_retention_with_task():
    choice = rewind(HAND, "max_retention_with_task", min_task=0.7)
    assert choice.point.step == 20 and "at least 0.7" in choice.reason and "3 of 5" in choice.reason
    keep = rewind(HAND, "max_retention_with_task", min_task=0.9)  # nothing reaches it: the base, said so
    assert keep.point.step == 0 and "no checkpoint reaches it (the best is step 30" in keep.reason
    with pytest.raises(SftlabError, match="best is step 30"):  # and without a base, an error
        rewind(HAND[1:], "max_retention_with_task", min_task=0.9)


def test_select_states_the_rule():
    assert rewind(HAND, "select", max_kl=0.2).point.step == 20
    assert rewind(HAND, "select", min_task=0.7).point.step == 20
    default = rewind(HAND, "select")
    assert default.point.step == 20 and "(the default rule)" in default.reason
    with pytest.raises(SftlabError, match="not both"):
        rewind(HAND, "select", max_kl=0.1, min_task=0.5)


def test_max_retention_with_task_in_a_loss_metrics_own_units():
    loss = [point_from_scores(s, {"name": "loss", "value": v, "higher_is_better": False},
                              {"value": r}) for s, v, r in [(0, 3.0, 1.0), (10, 0.5, 0.9), (20, 0.2, 0.5)]]
    choice = rewind(loss, "max_retention_with_task", min_task=0.6)  # "task loss at most 0.6"
    assert choice.point.step == 10 and "at most 0.6" in choice.reason
    assert "loss 0.5 (lower is better)" in choice.reason


def test_weighted():
    assert rewind(HAND, "weighted", w=1.0).point.step == 30
    assert rewind(HAND, "weighted", w=0.0).point.step == 0
    choice = rewind(HAND, "weighted", w=0.5)
    # scaled: task (x - 0.1)/0.75, retention (x + 1.9)/0.9 -> step 20 scores 0.5*0.933 + 0.5*0.889 = 0.911
    assert choice.point.step == 20 and "0.911" in choice.reason and "0.5 x task 0.933" in choice.reason
    with pytest.raises(SftlabError, match="w must be in"):
        rewind(HAND, "weighted", w=2)


def test_ties_go_to_the_earlier_point():
    pts = [P(0, 0.0, 1.0), P(10, 0.5, 0.5), P(20, 0.5, 0.5)]
    assert rewind(pts, "weighted", w=1.0).point.step == 10


def test_policies_needing_the_base_say_so():
    with pytest.raises(SftlabError, match="step 0"):
        rewind(HAND[1:], "max_task_with_retention_loss", max_loss=0.1)


# ---- hypervolume ------------------------------------------------------------------------------------

def test_hypervolume_hand_computed():
    # ref (0, 0); points (1, 3), (2, 2), (3, 1) and the dominated (1, 1):
    # union of rectangles = 3*1 + 2*1 + 1*1 = 6
    pts = [P(1, 1, 3), P(2, 2, 2), P(3, 3, 1), P(4, 1, 1)]
    assert hypervolume_2d(pts, (0.0, 0.0)) == pytest.approx(6.0)
    # normalised to the box ref (0, 0) .. ideal (4, 4): 6 / 16
    assert hypervolume_2d(pts, (0.0, 0.0), ideal=(4.0, 4.0)) == pytest.approx(6 / 16)
    # ref (1, 1): only (2, 2) lies strictly above it on both axes
    assert hypervolume_2d(pts, (1.0, 1.0)) == pytest.approx(1.0)
    # ref (0.5, 0.5): strips from the highest task down: 2.5*0.5 + 1.5*1.0 + 0.5*1.0
    assert hypervolume_2d(pts, (0.5, 0.5)) == pytest.approx(3.25)
    assert hypervolume_2d([], (0.0, 0.0)) == 0.0
    with pytest.raises(SftlabError):
        hypervolume_2d(pts, (0.0, 0.0), ideal=(4.0, 0.0))
