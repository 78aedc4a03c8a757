"""Issue 17: final, selected and rewound points across seeds (95% t-intervals), the `select:` rule in the config,
and both on the leaderboard, in `sftlab rewind` and on the report's plane."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import yaml

from report_fake import write_arena, write_run
from sftlab.arena.leaderboard import TrialResult, build_leaderboard, format_leaderboard, mean_ci, t975
from sftlab.arena.plan import trial_hash
from sftlab.config import config_from_dict
from sftlab.configtools import ConfigError
from sftlab.errors import SftlabError
from sftlab.report import build_html, load
from sftlab.rewinding import rewind_run, stated_policy
from sftlab.trajectory import point_from_scores, rule_text

T2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (tables; scipy.stats.t.ppf)


def traj(*pts):
    """(step, accuracy, kl) -> oriented points with tight probe CIs (0.01)."""
    out = []
    for step, acc, kl in pts:
        task = {"name": "acc", "value": acc, "higher_is_better": True, "ci_low": acc - 0.01, "ci_high": acc + 0.01}
        ret = {"name": "kl", "value": kl, "higher_is_better": False, "ci_low": max(kl - 0.001, 0), "ci_high": kl + 0.001}
        out.append(point_from_scores(step, task, ret))
    return out


def trial(method, seed, pts, lr=1e-3):
    return TrialResult(f"{method}-s{seed}", method, 1000, lr, seed, pts, 1000, {"wall_s": 1.0})


# per seed: base; an early, cheap gain (the knee); the best task score; a final step that overshoots
SEEDS = {0: [(0, 0.2, 0.0), (4, 0.60, 0.02), (8, 0.80, 0.10), (12, 0.70, 0.20)],
         1: [(0, 0.2, 0.0), (4, 0.70, 0.02), (8, 0.85, 0.12), (12, 0.75, 0.25)],
         2: [(0, 0.2, 0.0), (4, 0.65, 0.01), (8, 0.75, 0.08), (12, 0.60, 0.15)]}


def hand_t(values):
    m, sd = statistics.fmean(values), statistics.stdev(values)
    half = T2 * sd / math.sqrt(len(values))
    return m - half, m + half


def test_t_quantile_and_interval():
    assert t975(2) == pytest.approx(T2, abs=1e-6)
    assert t975(1) == pytest.approx(12.7062047, abs=1e-6) and t975(100) == pytest.approx(1.9839715, abs=1e-6)
    m = mean_ci([1.0, 2.0, 4.0])
    assert (m["ci_low"], m["ci_high"]) == pytest.approx(hand_t([1.0, 2.0, 4.0])) and m["n"] == 3
    one = mean_ci([0.5])
    assert one == {"mean": 0.5, "ci_low": None, "ci_high": None, "sd": None, "n": 1}


def test_three_seeds_give_t_intervals_for_final_selected_and_rewound():
    board = build_leaderboard([trial("lora", s, traj(*p)) for s, p in SEEDS.items()])
    row = board["rows"][0]
    pts = row["points"]
    assert row["seeds"] == 3 and set(pts) == {"start", "final", "selected", "rewound"}
    at = {"start": 0, "final": 3, "selected": 1, "rewound": 2}  # index into each seed's path
    for name, i in at.items():
        acc = [SEEDS[s][i][1] for s in SEEDS]
        kl = [SEEDS[s][i][2] for s in SEEDS]
        assert pts[name]["steps"] == [SEEDS[s][i][0] for s in SEEDS]
        assert pts[name]["task"]["mean"] == pytest.approx(statistics.fmean(acc))
        assert (pts[name]["task"]["ci_low"], pts[name]["task"]["ci_high"]) == pytest.approx(hand_t(acc))
        assert (pts[name]["retention"]["ci_low"], pts[name]["retention"]["ci_high"]) == pytest.approx(hand_t(kl))
        assert pts[name]["task"]["n"] == 3
    assert pts["selected"]["base_kept"] == 0
    text = format_leaderboard(board)
    lo, hi = hand_t([0.60, 0.70, 0.65])
    assert f"0.65 [{lo:.4g}, {hi:.4g}] (n=3)" in text and "select: default" in text


def test_one_seed_says_n_1_and_has_no_interval():
    board = build_leaderboard([trial("lora", 0, traj(*SEEDS[0]))])
    sel = board["rows"][0]["points"]["selected"]
    assert sel["task"]["n"] == 1 and sel["task"]["ci_low"] is None
    assert "0.6 (n=1)" in format_leaderboard(board)


def test_the_select_rule_drives_the_leaderboard():
    results = [trial("lora", s, traj(*p)) for s, p in SEEDS.items()]
    budget = build_leaderboard(results, select={"max_kl": 0.13})  # best task within KL 0.13: step 8 everywhere
    assert budget["rows"][0]["points"]["selected"]["steps"] == [8, 8, 8]
    assert budget["select_rule"] == "select: {max_kl: 0.13}" and budget["select"] == {"max_kl": 0.13}
    floor = build_leaderboard(results, select={"min_task": 0.75})  # least KL with accuracy >= 0.75
    assert floor["rows"][0]["points"]["selected"]["steps"] == [8, 8, 8]
    strict = build_leaderboard(results, select={"max_kl": 0.0})  # no checkpoint is that faithful: the base
    sel = strict["rows"][0]["points"]["selected"]
    assert sel["steps"] == [0, 0, 0] and sel["base_kept"] == 3
    assert "base kept in 3/3 seed(s)" in format_leaderboard(strict)
    assert all(t["selected_reason"].startswith("best task score within") for t in strict["trials"])


def test_select_in_the_config_is_validated_and_trains_nothing():
    cfg = config_from_dict({"select": {"max_kl": 0.1}})
    assert cfg.select.max_kl == 0.1 and cfg.select.min_task is None
    with pytest.raises(ConfigError, match="not both; remove one"):
        config_from_dict({"select": {"max_kl": 0.1, "min_task": 0.8}})
    with pytest.raises(ConfigError, match=r"select.max_kl: must be >= 0"):
        config_from_dict({"select": {"max_kl": -1}})
    with pytest.raises(ConfigError, match="did you mean 'max_kl'"):
        config_from_dict({"select": {"maxkl": 0.1}})
    plain = config_from_dict({})
    assert cfg.hash() == plain.hash() and trial_hash(cfg) == trial_hash(plain)  # a rule never retrains anything


def test_arena_config_carries_select_to_every_trial(tmp_path):
    from sftlab.arena.plan import arena_from_dict

    with pytest.raises(ConfigError, match="select"):
        arena_from_dict({"train": {"steps": 4}, "select": {"max_kl": 0.1, "min_task": 0.5}})
    _, base = arena_from_dict({"train": {"steps": 4}, "select": {"min_task": 0.5}})
    assert base["select"] == {"min_task": 0.5}


# ---- sftlab rewind --------------------------------------------------------------------------------------------

def fake_run(folder, select=None):
    """A scored run with a valid config (task: heldout loss, lower is better; retention: KL)."""
    folder.mkdir(parents=True)
    path = [(3.0, 0.0), (2.0, 0.01), (1.5, 0.02), (1.2, 0.05), (1.1, 0.09)]
    lines = []
    for i, (loss, kl) in enumerate(path):
        sc = {"heldout_loss": {"value": loss, "kind": "task", "higher_is_better": False, "ci_low": loss - 0.05,
                               "ci_high": loss + 0.05},
              "kl_to_base": {"value": kl, "kind": "retention", "higher_is_better": False, "ci_low": kl,
                             "ci_high": kl}}
        lines.append({"step": 2 * i, "scores": sc, **({"path": f"checkpoints/step-{2 * i:06d}"} if i else {})})
    (folder / "trajectory.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    cfg = {"run": {"name": folder.name}, "method": {"name": "lora"}, **({"select": select} if select else {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return folder


def test_rewind_without_policy_uses_the_configs_rule(tmp_path):
    run = fake_run(tmp_path / "r", {"max_kl": 0.03})
    assert stated_policy(run, None, {}) == ("select", {"max_kl": 0.03}, "the run config's select: {max_kl: 0.03}")
    text = rewind_run(str(run), None, None, {})
    assert text.startswith("chosen: step 4 by the run config's select: {max_kl: 0.03}: best task score within")
    default = rewind_run(str(fake_run(tmp_path / "d")), None, None, {})
    assert "select: default" in default.splitlines()[0] and "knee of the checkpoints" in default
    assert rewind_run(str(run), "knee", None, {}).startswith("chosen: step ")  # --policy still wins
    assert stated_policy(run, None, {"min_task": 1.5})[:2] == ("select", {"min_task": 1.5})
    with pytest.raises(SftlabError, match="--policy weighted"):
        stated_policy(run, None, {"w": 0.5})


# ---- the report ----------------------------------------------------------------------------------------------

def seeded_arena(tmp_path, seeds, select=None):
    """An arena folder of two methods x `seeds`, with a leaderboard built by sftlab from the same trajectories."""
    from sftlab.rewinding import run_points

    folder = write_arena(tmp_path / "arena", hostile=False)
    trials, results = [], []
    for m, shift in (("lora", 0.0), ("oft", 0.1)):
        for s in seeds:
            name = f"{m}-s{s}"
            path = [(3.0, 0.0), (2.0 + shift + 0.1 * s, 0.01), (1.4 + 0.05 * s, 0.03 + 0.01 * s),
                    (1.1 + shift, 0.09)]
            d = write_run(folder / "trials" / name, name, m, path)
            trials.append({"name": name, "method": m, "budget": 1000, "lr": 1e-3, "seed": s,
                           "run_dir": f"trials/{name}", "status": "done", "trainable_params": 1000})
            results.append(TrialResult(name, m, 1000, 1e-3, s, run_points(d, "heldout_loss", "kl_to_base")[0],
                                       1000))
    (folder / "arena.json").write_text(json.dumps({"name": "arena", "config": {"select": select or {}},
                                                   "trials": trials}), encoding="utf-8")
    board = build_leaderboard(results, select=select)
    (folder / "leaderboard.json").write_text(json.dumps(board), encoding="utf-8")
    return folder


def plane_of(html):
    return html.split('<section id="plane">')[1].split("</section>")[0]


def test_plane_draws_one_mean_marker_with_whiskers_per_method(tmp_path):
    html = build_html(load(seeded_arena(tmp_path, [0, 1, 2])))
    plane = plane_of(html)
    groups = re.findall(r'<g class="spread" data-method="([^"]+)" data-n="(\d)".*?</g>', plane, re.S)
    assert sorted(groups) == [("lora", "3"), ("oft", "3")]
    assert plane.count('class="mean-marker"') == 2 and plane.count('class="whisker"') == 4
    assert plane.count('class="seed-pt"') == 6 and "95% t-interval" in plane
    assert "Final, selected and rewound points across seeds" in html and "(n=3)" in html


def test_plane_with_one_seed_says_n_1_without_whiskers(tmp_path):
    plane = plane_of(build_html(load(seeded_arena(tmp_path, [0]))))
    assert plane.count('class="mean-marker"') == 2 and 'class="whisker"' not in plane
    assert "n=1: no interval across seeds" in plane


def test_report_shows_the_rule_next_to_the_chosen_point(tmp_path):
    run = fake_run(tmp_path / "r", {"max_kl": 0.03})
    html = build_html(load(run))
    assert 'Recommended: <b>step 4</b> by <span class="rule">select: {max_kl: 0.03}</span>' in html
    assert "sftlab rewind" in html and "recommended by select: {max_kl: 0.03}" in html
    arena = build_html(load(seeded_arena(tmp_path, [0, 1], {"min_task": 1.5})))
    assert 'by <span class="rule">select: {min_task: 1.5}</span>, the chosen point is' in arena


def test_report_says_when_no_checkpoint_beats_the_base(tmp_path):
    html = build_html(load(fake_run(tmp_path / "r", {"max_kl": 0.001})))
    assert "No checkpoint beats the base under" in html and "the base (step 0) is kept" in html
    assert "Export it with" not in html
    assert rule_text({"max_kl": 0.001}) in html
