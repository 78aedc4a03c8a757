"""Budgets people use (issue 17): a share of the base's parameters, natural shapes, and a cap that is flagged
instead of a budget silently stretched or a trial silently dropped."""

from __future__ import annotations

import pytest

from sftlab.arena.leaderboard import TrialResult, build_leaderboard, format_leaderboard
from sftlab.methods.budget import BudgetError, budget_count, parse_count, solve_budget
from sftlab.methods.budget_rules import MAX_VIRTUAL_TOKENS
from sftlab.trajectory import Point

from test_budget import SMOLLM2, SMOLLM2_TOTAL

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_a_share_is_a_count_of_the_bases_parameters():
    assert budget_count("1%", SMOLLM2) == round(SMOLLM2_TOTAL / 100) == 1_345_150
    assert budget_count("0.5%", SMOLLM2) == round(SMOLLM2_TOTAL / 200)
    assert budget_count("50k", SMOLLM2) == 50_000 and budget_count(1234, SMOLLM2) == 1234
    with pytest.raises(BudgetError, match="share of the base's parameters; give the model"):
        parse_count("1%")
    for bad in ("0%", "150%"):
        with pytest.raises(BudgetError, match="above 0% and at most 100%"):
            budget_count(bad, SMOLLM2)


def test_one_percent_solves_to_rank_on_every_linear_layer():
    sol = solve_budget(SMOLLM2, "lora", "1%")
    assert sol.target == 1_345_150 and abs(sol.rel_error) <= 0.10 and not sol.capped
    assert sol.options == {"r": 4, "target_modules": ["all-linear"], "layers": None}  # 1,221,120: -9.2%
    assert solve_budget(SMOLLM2, "dora", "1%").options["target_modules"] == ["all-linear"]
    assert solve_budget(SMOLLM2, "boft", "1%").options["target_modules"] == ["all-linear"]


def test_layer_subsets_take_the_most_layers_that_fit():
    # DoRA at 50k: rank 1 on 3 layers (46,080, -7.8%) rather than rank 2 on 2 (51,072, +2.1%, the closer)
    sol = solve_budget(SMOLLM2, "dora", 50_000)
    assert sol.options["r"] == 1 and len(sol.options["layers"]) == 3 and sol.within_tolerance
    assert solve_budget(SMOLLM2, "lora", 100_000).description == "rank 1 on all-linear, 10 of 30 layers (1,4,7,...,28)"


def test_out_of_reach_is_capped_and_flagged_only_when_asked():
    with pytest.raises(BudgetError, match="within 25%"):
        solve_budget(SMOLLM2, "prompt", "1%")  # `sftlab budget` still refuses
    sol = solve_budget(SMOLLM2, "prompt", "1%", cap=True)
    assert sol.capped and sol.options == {"num_virtual_tokens": MAX_VIRTUAL_TOKENS}
    assert sol.trainable == 512 * 576 and "capped" in sol.warning and "22% of the 1,345,150 asked" in sol.warning
    ia3 = solve_budget(SMOLLM2, "ia3", "1%", cap=True)
    assert ia3.capped and ia3.trainable == 184_320  # one vector per projection, every layer
    # reachable budgets are never capped; a budget below the smallest setting is still refused
    assert not solve_budget(SMOLLM2, "prompt", 50_000, cap=True).capped
    with pytest.raises(BudgetError, match="closest"):
        solve_budget(SMOLLM2, "prefix", 10, cap=True)


def test_the_leaderboard_flags_a_trial_off_its_budget():
    pts = [Point(0, 0.1, 0.0, meta={"task_name": "acc", "retention_name": "kl"}),
           Point(4, 0.5, -0.2, meta={"task_name": "acc", "retention_name": "kl"})]
    board = build_leaderboard([TrialResult("lora", "lora", 1000, 1e-3, 0, pts, 1020),
                               TrialResult("prompt", "prompt", 1000, 1e-3, 0, pts, 220)])
    flags = {r["method"]: r["off_budget"] for r in board["rows"]}
    assert flags == {"lora": False, "prompt": True}
    text = format_leaderboard(board)
    assert "220!" in text and "1,020!" not in text and "capped at its largest setting" in text
