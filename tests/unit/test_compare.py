"""`sftlab compare`: paired changes of a generation score between two points and along a pipeline, on hand-made
run directories (no model), and where a pipeline scores its generation probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftlab.compare import (compare_pipeline, compare_points, compare_text, paired_change, parse_point,
                            resolve_point)
from sftlab.configtools import ConfigError
from sftlab.errors import SftlabError
from sftlab.pipeline import generation_mode, generation_points

SOURCES = [f"prompts.jsonl:{i + 1}" for i in range(8)]


def quality(values: dict[str, list], sources=SOURCES) -> dict:
    return {"name": "quality", "kind": "task", "value": 0.0,
            "extra": {"per_answer": {"sources": list(sources), "values": values}}}


def run_dir(folder: Path, name: str, points: dict[int, dict], kl: dict[int, float], select: dict | None = None) -> Path:
    """A run with choice + KL at every step and the quality score (per-answer values) where `points` has it."""
    run = folder / name
    run.mkdir(parents=True)
    cfg = {"run": {"name": name, "output_dir": str(folder)}, "model": {"path": "unused"},
           "probes": [{"name": "choice", "path": "c.jsonl"}, {"name": "kl_to_base", "n": 2}],
           **({"select": select} if select else {})}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step, k in kl.items():
        line = {"step": step, "scores": {
            "choice": {"value": 0.5 + step / 100, "kind": "task", "ci_low": 0.45 + step / 100,
                       "ci_high": 0.55 + step / 100},
            "kl_to_base": {"value": k, "kind": "retention", "higher_is_better": False, "ci_low": k, "ci_high": k}}}
        if step:
            line.update(path=f"checkpoints/step-{step:06d}", sha256="x")
        lines.append(json.dumps(line))
    for step, values in points.items():  # as the pipeline appends them: a later line per scored step
        lines.append(json.dumps({"step": step, "scores": {"quality": quality(values)}}))
    (run / "trajectory.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_paired_change_is_the_mean_difference_and_its_ci_excludes_zero_for_a_steady_shift():
    a = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    b = [x + 5 + (i % 3) for i, x in enumerate(a)]  # +5..+7 on every prompt
    c = paired_change(a, b)
    assert c["change"] == pytest.approx(sum(5 + i % 3 for i in range(8)) / 8) and c["n"] == 8
    assert 5 <= c["ci_low"] < c["change"] < c["ci_high"] <= 7
    # unpaired, the prompts' spread (10..80) would swamp a +6 shift; paired, it cancels
    noisy = paired_change([0, 1, 0, 1], [1, 0, 1, 0])
    assert noisy["ci_low"] < 0 < noisy["ci_high"]


def test_unscored_answers_drop_out_of_the_pairs():
    c = paired_change([1.0, None, 3.0], [2.0, 5.0, None])
    assert c["n"] == 1 and c["change"] == 1.0
    assert paired_change([None], [1.0])["n"] == 0


@pytest.mark.parametrize("text, want", [("runs/a:12", ("runs/a", "step", 12)), ("runs/a:0", ("runs/a", "step", 0)),
                                        ("runs/a@last", ("runs/a", "last", None)),
                                        ("runs/a@selected", ("runs/a", "selected", None)),
                                        ("runs/a", ("runs/a", "selected", None))])
def test_point_forms(text, want):
    assert parse_point(text) == want


@pytest.mark.parametrize("text, message", [("runs/a@best", "after @ write selected or last"),
                                           ("runs/a:x", "STEP must be a checkpoint's step")])
def test_bad_point_is_one_line(text, message):
    with pytest.raises(SftlabError, match=message):
        parse_point(text)


def test_two_points_of_a_run(tmp_path):
    base = {"readability": [50.0 + i for i in range(8)], "actionability": [0.1] * 8}
    later = {"readability": [60.0 + i for i in range(8)], "actionability": [0.1] * 8}
    run = run_dir(tmp_path, "r", {0: base, 12: later}, {0: 0.0, 6: 0.1, 12: 0.2})
    out = compare_points(f"{run}:0", f"{run}:12")
    assert out["score"] == "quality" and out["retention"]["b"]["value"] == 0.2
    assert out["dimensions"]["readability"]["change"]["change"] == pytest.approx(10.0)
    assert out["dimensions"]["actionability"]["change"]["change"] == 0.0
    text = compare_text(f"{run}:0", f"{run}:12", dims=["readability"])
    assert "+10 [10, 10] *" in text and "actionability" not in text
    assert resolve_point(f"{run}@last").step == 12


def test_a_point_without_the_score_names_the_eval_command(tmp_path):
    run = run_dir(tmp_path, "r", {0: {"readability": [1.0] * 8}}, {0: 0.0, 6: 0.1})
    with pytest.raises(SftlabError, match=f"sftlab eval {run} --generation --steps 6"):
        compare_points(f"{run}:0", f"{run}:6")


def test_different_prompts_are_refused(tmp_path):
    run = run_dir(tmp_path, "r", {0: {"readability": [1.0] * 8}}, {0: 0.0, 6: 0.1})
    lines = (run / "trajectory.jsonl").read_text().splitlines()
    other = {"step": 6, "scores": {"quality": quality({"readability": [1.0] * 7}, SOURCES[:7])}}
    (run / "trajectory.jsonl").write_text("\n".join(lines + [json.dumps(other)]) + "\n")
    with pytest.raises(SftlabError, match="answered different prompts"):
        compare_points(f"{run}:0", f"{run}:6")


def test_a_pipeline_shows_each_stage_against_the_one_before_and_the_base(tmp_path):
    folder = tmp_path / "pipe"
    r = lambda v: {"readability": [v + i for i in range(8)]}  # noqa: E731
    run_dir(folder, "sft", {0: r(50.0), 6: r(52.0)}, {0: 0.0, 6: 0.05})
    run_dir(folder, "dpo", {12: r(60.0)}, {0: 0.05, 12: 0.3})
    (folder / "pipeline.json").write_text(json.dumps({
        "sft": {"config_hash": "a", "selected": {"step": 6}}, "dpo": {"config_hash": "b", "selected": {"step": 12}}}))
    out = compare_pipeline(folder)
    assert [p["point"] for p in out["points"]] == ["base", "sft:6", "dpo:12"] and out["prompts"] == 8
    assert out["points"][0]["dimensions"]["readability"]["mean"] == pytest.approx(53.5)
    assert out["points"][2]["vs_previous"]["readability"]["change"]["change"] == pytest.approx(8.0)
    assert out["points"][2]["vs_base"]["readability"]["change"]["change"] == pytest.approx(10.0)
    assert out["points"][2]["retention"]["value"] == 0.3
    text = compare_text(str(folder), None)
    assert "change vs base" in text and "+10 [10, 10] *" in text and "kl_to_base" in text
    with pytest.raises(SftlabError, match="not a pipeline folder"):
        compare_text(str(folder / "sft"), None)


def test_where_a_pipeline_scores_generation_probes(tmp_path):
    assert generation_mode({}, "p") == "selected"
    with pytest.raises(ConfigError, match="generation: 'all'; write one of selected, frontier, none"):
        generation_mode({"generation": "all"}, "p")
    run = run_dir(tmp_path, "r", {}, {0: 0.0, 6: 0.1, 12: 0.2})
    assert generation_points(run, "selected", {"step": 6}, first=True) == [0, 6]
    assert generation_points(run, "selected", {"step": 6}, first=False) == [6]
    assert generation_points(run, "selected", {"step": 0}, first=False) == [0]  # kept its start: score that
    assert generation_points(run, "none", {"step": 6}, first=True) == []
    assert 12 in generation_points(run, "frontier", {"step": 6}, first=False)
