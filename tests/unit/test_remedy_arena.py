"""arena.remedies: each forgetting remedy is an axis of the arena like methods and learning rates; every variant
is its own leaderboard row (METHOD+REMEDY); ema's row reads its averaged trajectory, wise's adds its alphas."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import arena_config
from sftlab.arena import load_arena, plan_trials
from sftlab.configtools import ConfigError


def _arena(tmp_path, model_dir, **arena):
    return load_arena(arena_config(tmp_path, model_dir, **arena))


def test_each_remedy_is_a_named_variant_of_every_trial(tmp_path, tiny_model_dir):
    arena, base = _arena(tmp_path, tiny_model_dir, methods=["full", "lora", "prompt"],
                         lrs={"full": [1e-3], "lora": [1e-2], "prompt": [3e-2]},
                         remedies=["none", "kl", {"name": "l2sp", "weight": 0.1, "label": "l2sp0.1"}, "wise"])
    trials = {t.name: t for t in plan_trials(arena, base)}
    assert "lora-4k-lr0.01-s0" in trials  # the plain trial keeps its name (resumable arenas)
    kl = trials["lora-4k-kl-lr0.01-s0"]
    assert kl.label == "lora+kl" and [r.name for r in kl.cfg.remedies] == ["kl"]
    l2 = trials["full-ref-l2sp0.1-lr0.001-s0"]
    assert l2.label == "full+l2sp0.1" and l2.cfg.remedies[0].options.weight == 0.1
    assert l2.hash != trials["full-ref-lr0.001-s0"].hash
    # a variant a method cannot take is refused with the reason, the others go on
    wise_prompt = trials["prompt-4k-wise-lr0.03-s0"]
    assert wise_prompt.refused and "virtual tokens" in wise_prompt.note
    assert trials["lora-4k-wise-lr0.01-s0"].record()["extra_points"].endswith("wise.json")


def test_bad_remedy_axes_are_one_line_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="arena.remedies: lists a variant twice"):
        _arena(tmp_path, tiny_model_dir, remedies=["kl", {"name": "kl", "weight": 1}])
    with pytest.raises(ConfigError, match=r"arena.remedies\[1\].name: unknown remedy 'kll'; did you mean 'kl'"):
        _arena(tmp_path, tiny_model_dir, remedies=["none", "kll"])
    with pytest.raises(ConfigError, match=r"arena.remedies\[0\].weight: must be > 0"):
        _arena(tmp_path, tiny_model_dir, remedies=[{"name": "kl", "weight": -1}])


def test_an_arena_with_remedies_ranks_each_variant(tmp_path, tiny_model_dir, capsys):
    from sftlab.arena.runner import run_arena

    path = arena_config(tmp_path, tiny_model_dir, methods=["lora"], lrs={"lora": [1e-2]},
                        remedies=["none", "l2sp", {"name": "ema", "decay": 0.5}])
    folder = run_arena(str(path))
    board = json.loads((folder / "leaderboard.json").read_text())
    assert sorted(r["method"] for r in board["rows"]) == ["lora", "lora+ema", "lora+l2sp"]
    meta = json.loads((folder / "arena.json").read_text())
    ema = next(t for t in meta["trials"] if t["label"] == "lora+ema")
    assert ema["scores_dir"].endswith("/ema") and (folder / ema["scores_dir"] / "trajectory.jsonl").is_file()
