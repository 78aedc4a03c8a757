"""`sftlab study` end to end on a tiny random model: two tasks (a label task scored by label scoring, a
generative one by greedy generation), full, LoRA and OFT, two seeds, four steps. The findings page has a
section per question with numbers from the runs; a rerun skips every stage; a study stopped after its first
arena resumes without retraining it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.cli import main

COLOURS = ["red", "blue", "green", "black", "white", "pink"]


def study_config(tmp: Path, model_dir: Path) -> Path:
    chats = write_jsonl(tmp / "chats.jsonl", memorisable_chats(16))
    general = tmp / "general.txt"
    general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i}."
                                   for i in range(8)))
    cfg = {
        "study": {"name": "s", "output_dir": str(tmp / "out"), "models": [str(model_dir)],
                  "tasks": ["colours", "say"], "methods": ["full", "lora", "oft"], "budgets": ["4k"],
                  "seeds": [0, 1], "lrs": {"full": [1e-3], "lora": [1e-2], "oft": [1e-2]},
                  "custom_tasks": {
                      "colours": {"train": str(chats), "probe": {"name": "classify", "path": str(chats),
                                                                 "labels": COLOURS}},
                      "say": {"train": str(chats), "probe": {"name": "generate", "path": str(chats), "limit": 6,
                                                             "max_new_tokens": 2, "metric": "rouge_l"}}},
                  "retention": {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0},
                  "alphas": [0.5, 1.0], "analyze_steps": 2, "analyze_texts": 4, "analyze_layers": "0,1",
                  "findings": str(tmp / "docs" / "findings.md")},
        "run": {"seed": 0},
        "data": {"max_length": 64},
        "train": {"steps": 4, "batch_size": 4, "threads": 1},
        "checkpoint": {"every": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
            and (p.name in ("trajectory.jsonl", "summary.json") or p.parent.name == "paths")}


@pytest.mark.slow
def test_study_end_to_end_resumes_and_skips(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from sftlab.study import runner

    cfg = study_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out" / "s"
    first = f"{tiny_model_dir.name}-colours"
    # stopped right after its first arena finished every stage
    real_entry = runner.run_entry

    def stop_after_first(study, entry):
        real_entry(study, entry)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_entry", stop_after_first)
    assert main(["study", str(cfg)]) == 130
    assert (out / first / "leaderboard.json").is_file() and not (out / f"{tiny_model_dir.name}-say").exists()
    before = mtimes(out / first)
    assert before
    monkeypatch.setattr(runner, "run_entry", real_entry)
    assert main(["study", str(cfg)]) == 0
    assert mtimes(out / first) == before  # the first arena was not trained, scored or analysed again

    # every stage's output
    second = out / f"{tiny_model_dir.name}-say"
    for arena in (out / first, second):
        board = json.loads((arena / "leaderboard.json").read_text())
        kept = [t for t in board["trials"] if t["kept"]]
        assert len(kept) == 6  # 3 methods x 2 seeds, one rate each
        for t in kept:
            path = json.loads((arena / "paths" / f"{t['trial']}.json").read_text())
            kinds = {"full": ["additive"], "lora": ["additive"], "oft": ["rotation", "additive"]}[t["method"]]
            assert sorted(path["kinds"]) == sorted(kinds)
            assert all([p["alpha"] for p in path["kinds"][k]] == [0.5, 1.0] for k in kinds)
            summary = json.loads((arena / "trials" / t["trial"] / "analysis" / "summary.json").read_text())
            assert sorted(map(int, summary["steps"])) == [2, 4]
            assert "procrustes_centred" in summary["steps"]["4"]["activations"]["general"]["mean"]
    # generation scored at every checkpoint of the generative task, so its trajectory has both axes
    say_trial = next(p for p in (second / "trials").iterdir() if p.is_dir())
    lines = [json.loads(x) for x in (say_trial / "trajectory.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in lines if "generate" in x.get("scores", {})}) == [0, 2, 4]

    page = (tmp_path / "docs" / "findings.md").read_text()
    for q in "abcde":
        assert re.search(rf"^## \({q}\) ", page, re.M), q
    assert page.count(f"### {first}") == 5 and (tmp_path / "docs" / "findings" / f"{first}-plane.svg").is_file()
    assert (tmp_path / "docs" / "findings" / f"{first}-oft-alpha.svg").is_file()
    # numbers come from the runs: each method's hypervolume in (b) is the leaderboard's
    board = json.loads((out / first / "leaderboard.json").read_text())
    section_b = page.split("## (b)")[1].split("## (c)")[0].split(f"### {first}")[1].split("###")[0]
    for row in board["rows"]:
        line = next(x for x in section_b.splitlines() if x.startswith(f"| {row['method']} |"))
        assert f"| {row['hypervolume']:.3f} |" in line, (line, row["hypervolume"])
    findings = json.loads((out / "findings.json").read_text())
    a = findings["arenas"][0]
    assert a["a"]["answer"] and a["d"]["rows"] and a["e"]["correlations"]["cka"]["n"] == 12
    # the final checkpoint is the same point on both OFT paths
    last = a["d"]["rows"][-1]
    assert last["alpha"] == 1.0 and last["rotation"]["kl"]["mean"] == pytest.approx(last["additive"]["kl"]["mean"],
                                                                                    rel=1e-3, abs=1e-6)

    # a rerun skips everything: nothing trains, generates, interpolates or analyses
    import sftlab.analysis
    import sftlab.interpolate
    import sftlab.scoring
    from sftlab.train.loop import Trainer

    def refuse(*a, **k):
        raise AssertionError("a finished stage ran again")

    for mod, name in ((Trainer, "run"), (sftlab.scoring, "evaluate_run"), (sftlab.interpolate, "Interpolator"),
                      (sftlab.analysis, "analyze_run")):
        monkeypatch.setattr(mod, name, refuse)
    everything = mtimes(out)
    assert main(["study", str(cfg)]) == 0
    assert mtimes(out) == everything


def test_study_plan_validates_before_training(tmp_path, tiny_model_dir, capsys):
    cfg = study_config(tmp_path, tiny_model_dir)
    assert main(["study", str(cfg), "--plan"]) == 0
    assert "2 arena(s)" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main(["study", str(cfg), "study.tasks=[nope]"]) == 2
    assert "neither built in" in capsys.readouterr().err
    assert main(["study", str(cfg), "study.lrs.lora=[-1]"]) == 2
