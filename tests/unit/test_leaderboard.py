"""The arena leaderboard on hand-made trajectories: normalised hypervolume, the learning-rate rule, seeds."""

from __future__ import annotations

import math

import pytest

from sftlab.arena.leaderboard import TrialResult, build_leaderboard, format_leaderboard
from sftlab.trajectory import point_from_scores


def traj(*pts, ci=0.0):
    """(step, accuracy (higher better), kl (lower better)) -> oriented Points."""
    out = []
    for step, acc, kl in pts:
        task = {"name": "acc", "value": acc, "higher_is_better": True, "ci_low": acc - ci, "ci_high": acc + ci}
        ret = {"name": "kl", "value": kl, "higher_is_better": False, "ci_low": kl - ci, "ci_high": kl + ci}
        out.append(point_from_scores(step, task, ret))
    return out


def trial(name, method, lr, seed, pts, **stats):
    return TrialResult(name, method, 1000, lr, seed, pts, 1000, {"tokens_per_s": 100.0, "peak_mem_mb": 10.0,
                                                                 "wall_s": 5.0, **stats})


BASE = (0, 0.2, 0.0)


def test_hypervolume_is_normalised_over_all_trials_and_the_base():
    # all points: acc in [0.2, 1.0], kl in [0, 1.0]; after scaling, a trial reaching (acc 1.0, kl 0.5) alone
    # dominates the box [0, 1] x [0, 0.5] (retention oriented: kl 0.5 -> 0.5 of the way from worst to best)
    a = trial("a", "lora", 1e-3, 0, traj(BASE, (4, 1.0, 0.5)))
    b = trial("b", "oft", 1e-3, 0, traj(BASE, (4, 0.6, 1.0)))
    board = build_leaderboard([a, b])
    hv = {t["trial"]: t["hypervolume"] for t in board["trials"]}
    assert hv["a"] == pytest.approx(1.0 * 0.5)
    # b: (acc 0.5 scaled, kl 1.0 -> 0 of the way) adds nothing; its base point (0, 1) has zero width: 0
    assert hv["b"] == pytest.approx(0.0)
    assert board["reference_point"] == pytest.approx([0.2, 1.0])  # the worst observed, in the scores' units
    assert board["ideal_point"] == pytest.approx([1.0, 0.0])
    assert [r["method"] for r in board["rows"]] == ["lora", "oft"]


def test_learning_rate_kept_by_the_stated_rule():
    fast = traj(BASE, (4, 0.9, 0.8))  # more accurate, far from the base
    gentle = traj(BASE, (2, 0.5, 0.05), (4, 0.7, 0.1))  # less accurate, close to the base
    results = [trial("lora-hi", "lora", 1e-2, 0, fast), trial("lora-lo", "lora", 1e-3, 0, gentle)]
    by_hv = build_leaderboard(results, "hypervolume")
    by_task = build_leaderboard(results, "final_task")
    assert by_hv["rows"][0]["lr"] == [1e-3] and by_task["rows"][0]["lr"] == [1e-2]
    assert "hypervolume" in by_hv["rule"] and "final task" in by_task["rule"]
    kept = [t["trial"] for t in by_hv["trials"] if t["kept"]]
    assert kept == ["lora-lo"]


def test_seeds_give_mean_and_spread_and_overshoot_counts():
    s0 = traj(BASE, (4, 0.8, 0.2), (8, 0.4, 0.6), ci=0.01)  # overshoot: step 4 beats the final on both axes
    s1 = traj(BASE, (4, 0.5, 0.2), (8, 0.6, 0.3), ci=0.01)
    board = build_leaderboard([trial("x0", "full", 3e-5, 0, s0, wall_s=4.0),
                               trial("x1", "full", 3e-5, 1, s1, wall_s=6.0)])
    row = board["rows"][0]
    assert row["seeds"] == 2 and row["final_task"] == pytest.approx(0.5)
    assert row["final_task_sd"] == pytest.approx(math.sqrt(((0.4 - 0.5) ** 2 + (0.6 - 0.5) ** 2) / 1))
    assert row["final_retention"] == pytest.approx(0.45) and row["wall_s"] == pytest.approx(5.0)
    assert row["final_dominated"] == 1  # seed 0 overshot, seed 1 did not
    assert next(t for t in board["trials"] if t["trial"] == "x0")["dominated_by"] == [4]
    text = format_leaderboard(board)
    assert "1/2" in text and "0.5±0.1414" in text and "reference point" in text


def test_empty_and_unknown_rule():
    assert build_leaderboard([])["rows"] == []
    with pytest.raises(ValueError, match="lr rule"):
        build_leaderboard([trial("a", "lora", 1e-3, 0, traj(BASE))], "best")
