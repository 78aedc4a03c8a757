"""Scores along the path, end to end on a tiny model: the score callback during training, `sftlab eval`
afterwards (the same numbers), `sftlab frontier` (a clean run is not flagged; planted overshoot on hand-made points is in
tests/unit/test_trajectory.py) and
`sftlab rewind` (a chosen, explained, exported point)."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model, memorisable_chats, task_files, tiny_config
from sftlab.cli import main
from sftlab.config import parse_probes
from sftlab.probes.writing import DIMENSIONS
from sftlab.runs import Run
from sftlab.train.loop import Trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return task_files(tmp_path_factory.mktemp("traj-data"))


def probes(files):
    chats, general = files
    return [{"name": "heldout_loss", "path": str(chats)}, {"name": "kl_to_base", "path": str(general), "k": 8}]


def train(tmp_path, model_dir, files, name, method=None, **sections):
    data = files[0]
    cfg = tiny_config(tmp_path, model_dir, data, method=method, run={"name": name},
                      train={"steps": 8, "batch_size": 4, "lr": 1e-2, "threads": 1, **sections.pop("train", {})},
                      checkpoint={"every": 2}, **sections)
    cfg.probes = parse_probes(probes(files))
    t = Trainer(cfg)
    t.run()
    return t


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, files):
    tmp = tmp_path_factory.mktemp("traj")
    model_dir = build_tiny_model(tmp / "model", dropout=0.1)
    return train(tmp, model_dir, files, "lora", method={"name": "lora", "r": 4, "dropout": 0.1})


def test_every_checkpoint_and_the_start_are_scored(lora_run):
    entries = Run(lora_run.run_dir).trajectory()
    assert [e["step"] for e in entries] == [0, 2, 4, 6, 8]
    for e in entries:
        assert {"heldout_loss", "kl_to_base"} <= set(e["scores"])
        for s in e["scores"].values():
            assert s["n"] > 0 and s["ci_low"] <= s["value"] <= s["ci_high"]
    assert abs(entries[0]["scores"]["kl_to_base"]["value"]) < 1e-6  # LoRA starts as the base
    assert entries[-1]["scores"]["heldout_loss"]["value"] < entries[0]["scores"]["heldout_loss"]["value"]


def test_scoring_during_training_does_not_change_training(lora_run, tmp_path, files):
    """Dropout is on: scoring must not consume the training RNG stream."""
    cfg = lora_run.cfg
    import dataclasses

    plain = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="noprobe", output_dir=str(tmp_path)),
                                probes=[])
    t = Trainer(plain)
    t.run()
    wa = {n: p for n, p in lora_run.model.named_parameters() if p.requires_grad}
    wb = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) == 0.0


def test_offline_eval_gives_the_training_time_numbers(lora_run, capsys):
    during = {e["step"]: e["scores"] for e in Run(lora_run.run_dir).trajectory()}
    assert main(["eval", str(lora_run.run_dir), "--steps", "0,4,8"]) == 0
    after = {e["step"]: e["scores"] for e in Run(lora_run.run_dir).trajectory()}
    for step in (0, 4, 8):
        for name in ("heldout_loss", "kl_to_base"):
            assert after[step][name]["value"] == pytest.approx(during[step][name]["value"], abs=1e-5)


def test_frontier_and_rewind_on_a_clean_run(lora_run, tmp_path, capsys):
    assert main(["frontier", str(lora_run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "heldout_loss" in out and "kl_to_base" in out and "*" in out
    assert "no overshoot" in out
    dest = tmp_path / "chosen"
    assert main(["rewind", str(lora_run.run_dir), "--policy", "weighted", "--weight", "0.7", "-o", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "chosen: step" in out and "weighted" in out
    assert (dest / "adapter_config.json").is_file() or (dest / "config.json").is_file()


def test_planted_overshoot_with_a_high_learning_rate_is_detected(lora_run, tmp_path, files, capsys):
    """Full fine-tuning at lr 1.0 without clipping wrecks the model within a few Adam steps (every weight moves
    by ~lr per step, 50x the weights' scale): the final checkpoint is far worse on both axes than where the run
    started, beyond the confidence intervals. Detected, explained, and rewinding picks an earlier point. (A
    chaotic mid-run optimum is not needed for the check, and on two machines it did not reproduce.)"""
    model_dir = Run(lora_run.run_dir).base_ref().location
    t = train(tmp_path, model_dir, files, "hot", method={"name": "full"},
              train={"lr": 1.0, "max_grad_norm": 0.0, "steps": 6, "max_bad_steps": 6})
    from sftlab.rewinding import run_points
    from sftlab.trajectory import overshoot

    points, _, _ = run_points(t.run_dir)
    assert overshoot(points), [(p.step, p.task, p.retention) for p in points]
    assert main(["frontier", str(t.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "overshoot: the final checkpoint (step 6) is dominated" in out
    assert main(["rewind", str(t.run_dir), "--policy", "knee"]) == 0
    out = capsys.readouterr().out
    chosen = int(out.split("chosen: step")[1].split()[0].strip(",.:"))
    assert chosen < 6


def test_rewind_search_between_checkpoints(lora_run, tmp_path, capsys):
    dest = tmp_path / "between"
    assert main(["rewind", str(lora_run.run_dir), "--policy", "knee", "--search", "--alphas", "0.5,1.0",
                 "-o", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "search between the base and step" in out
    assert (dest / "config.json").is_file() or (dest / "adapter_config.json").is_file()
    meta = json.loads((dest / "sftlab_export.json").read_text())
    assert "step" in meta


def step0_line(run_dir):
    lines = [json.loads(x) for x in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    return next(x for x in lines if x["step"] == 0 and "scores" in x)


def test_base_scores_are_shared_between_runs(lora_run, tmp_path, files, monkeypatch):
    """A second run from the same base with the same probes reuses the step-0 scores (an arena's trials pay for
    the base once); prompt tuning does not start at the base, so it scores its own start; editing a probe's
    file is a new key."""
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    model_dir = Run(lora_run.run_dir).base_ref().location
    first = train(tmp_path, model_dir, files, "a", method={"name": "lora", "r": 4, "dropout": 0.1})
    again = train(tmp_path, model_dir, files, "b", method={"name": "ia3"}, train={"steps": 2})
    assert "shared" not in step0_line(first.run_dir) and "shared" in step0_line(again.run_dir)
    assert step0_line(again.run_dir)["scores"] == step0_line(first.run_dir)["scores"]
    prompt = train(tmp_path, model_dir, files, "c", method={"name": "prompt", "num_virtual_tokens": 2},
                   train={"steps": 2})
    assert "shared" not in step0_line(prompt.run_dir)
    assert step0_line(prompt.run_dir)["scores"]["kl_to_base"]["value"] > 0
    with open(files[0], "a") as f:  # the probe's data changed: the old base scores must not be used
        f.write(json.dumps(memorisable_chats(17)[-1]) + "\n")
    edited = train(tmp_path, model_dir, files, "d", method={"name": "ia3"}, train={"steps": 2})
    assert "shared" not in step0_line(edited.run_dir)


def test_generation_probes_default_to_base_final_and_frontier(lora_run, tmp_path, files, capsys):
    """Generation is not cheap: training scores likelihood probes only; `sftlab eval --generation` then runs
    the generation probes on step 0, the final checkpoint and the frontier points (or where --steps says)."""
    from sftlab.rewinding import generation_steps
    from sftlab.trajectory import pareto_front
    from sftlab.rewinding import run_points

    model_dir = Run(lora_run.run_dir).base_ref().location
    cfg = tiny_config(tmp_path, model_dir, files[0], method={"name": "lora", "r": 4}, run={"name": "gen"},
                      train={"steps": 8, "batch_size": 4, "lr": 1e-2, "threads": 1}, checkpoint={"every": 2})
    cfg.probes = parse_probes(probes(files) + [{"name": "generate", "path": str(files[0]), "limit": 4,
                                                "max_new_tokens": 4},
                                               {"name": "quality", "path": str(files[0]), "limit": 4,
                                                "max_new_tokens": 4, "dimensions": list(DIMENSIONS)}])
    Trainer(cfg).run()
    run_dir = cfg.run_dir
    assert not any("generate" in e["scores"] for e in Run(run_dir).trajectory())  # not during training
    points, _, _ = run_points(run_dir)
    expected = sorted({0, 8} | {p.step for p in pareto_front(points)})
    assert generation_steps(run_dir) == expected
    assert main(["eval", str(run_dir), "--generation"]) == 0
    scored = sorted(e["step"] for e in Run(run_dir).trajectory() if "generate" in e["scores"])
    assert scored == expected
    sample = next(e for e in Run(run_dir).trajectory() if "generate" in e["scores"])["scores"]["generate"]
    assert sample["extra"]["samples"] and "output" in sample["extra"]["samples"][0]
    # the writing dimensions ride along: each per generation-scored checkpoint, with CIs, and in the report
    quality = [e for e in Run(run_dir).trajectory() if "quality" in e["scores"]]
    assert sorted(e["step"] for e in quality) == expected
    for e in quality:
        dims = e["scores"]["quality"]["extra"]["dimensions"]
        assert set(DIMENSIONS) <= set(dims)
        assert all(d["ci_low"] <= d["mean"] <= d["ci_high"] for d in dims.values() if d["n"])
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    section = page.split('<section id="writing">')[1].split("</section>")[0]
    assert all(f"<b>{d}</b>" in section for d in DIMENSIONS) and section.count("<th>step ") == len(expected) - 1
