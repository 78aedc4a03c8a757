"""`sftlab pipeline`'s `from`: parsing, validation before anything trains, and which checkpoint of a finished stage
the next one starts from (its select: rule, its last, a named step), on hand-made run directories (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftlab.configtools import ConfigError
from sftlab.errors import SftlabError
from sftlab.pipeline import Source, parse_source, plan, read_pipeline, resolve_start, stage_config
from sftlab.rewinding import run_points
from sftlab.train.checkpoint import hash_files
from sftlab.trajectory import rewind

PROBES = [{"name": "heldout_loss", "path": "task.jsonl"}, {"name": "kl_to_base", "path": "general.txt"}]


def scores(acc: float, kl: float) -> dict:
    return {"acc": {"value": acc, "kind": "task", "ci_low": acc - 0.05, "ci_high": acc + 0.05},
            "kl": {"value": kl, "kind": "retention", "higher_is_better": False}}


# step: (task accuracy, KL to the base); step 0 is the stage's starting model
PATH = {0: (0.1, 0.0), 2: (0.6, 0.1), 4: (0.8, 0.3), 6: (0.85, 1.5)}
FLAT = {0: (0.5, 0.0), 2: (0.5, 0.2), 4: (0.52, 0.4)}  # nothing beats the start's CI: the rule keeps step 0


def fake_stage(folder: Path, name: str, path: dict | None = PATH, probes=PROBES, start: dict | None = None,
               select: dict | None = None) -> Path:
    """A finished stage: config.yaml, provenance.json (with the trainer's `start` when given), trajectory.jsonl."""
    run = folder / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"run": {"name": name, "output_dir": str(folder)}, "model": {"path": "unused"}, "probes": probes,
           **({"select": select} if select else {})}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "provenance.json").write_text(json.dumps({"format": 1, **({"start": start} if start else {})}))
    lines = []
    for step, point in (path or {0: None, 2: None, 4: None}).items():
        line = {"step": step}
        if step:
            ckpt = run / "checkpoints" / f"step-{step:06d}"
            ckpt.mkdir()
            (ckpt / "adapter_config.json").write_text(json.dumps({"stage": name, "step": step}))
            line.update(path=f"checkpoints/step-{step:06d}", sha256=hash_files(ckpt))
        if point is not None:
            line["scores"] = scores(*point)
        lines.append(json.dumps(line))
    (run / "trajectory.jsonl").write_text("\n".join(lines) + "\n")
    return run


def sha(run: Path, step: int) -> str:
    return hash_files(run / "checkpoints" / f"step-{step:06d}")


def write_pipeline(tmp: Path, stages: list[dict]) -> Path:
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp / "pipe"), "stages": stages}))
    return path


def stage(name: str, src: str | None = None, probes=PROBES, **config) -> dict:
    cfg = {"data": {"train": [{"path": "t.jsonl"}]}, "probes": probes, **config}
    return {"name": name, "config": cfg, **({"from": src} if src else {})}


def resolved(tmp: Path, stages: list[dict], name: str) -> tuple[str, dict]:
    folder, parsed, configs = plan(write_pipeline(tmp, stages))
    st = next(s for s in parsed if s.name == name)
    return resolve_start(folder, st, configs[st.source.stage])


# ---- parsing and validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("sft", Source("sft", "default", None, "sft")), ("sft@selected", Source("sft", "selected", None, "sft@selected")),
    ("sft@last", Source("sft", "last", None, "sft@last")), ("sft:12", Source("sft", "step", 12, "sft:12"))])
def test_from_forms(text, want):
    assert parse_source(text, "from") == want


@pytest.mark.parametrize("text, message", [("sft@best", "after @ write selected or last"),
                                           ("sft:x", "STEP must be a checkpoint's step"),
                                           ("sft:0", "STEP must be a checkpoint's step"),
                                           ("dpo", "must name an earlier stage (sft)")])
def test_bad_from_is_one_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pipeline(write_pipeline(tmp_path, [stage("sft"), stage("dpo", text)]))


def test_selected_from_a_stage_without_probes_is_refused_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match="sft has no probes to score it.*sft@last"):
        plan(write_pipeline(tmp_path, [stage("sft", probes=[]), stage("dpo", "sft@selected")]))
    with pytest.raises(ConfigError, match="no probes"):  # a stated rule is a wish to select too
        plan(write_pipeline(tmp_path, [stage("sft", probes=[], select={"max_kl": 0.1}), stage("dpo", "sft")]))
    with pytest.raises(ConfigError, match="scoring.during_training: false"):
        plan(write_pipeline(tmp_path, [stage("sft", scoring={"during_training": False}), stage("dpo", "sft")]))
    plan(write_pipeline(tmp_path, [stage("sft", probes=[]), stage("dpo", "sft")]))  # plain from: its last


def test_model_path_is_inherited_down_the_chain(tmp_path):
    folder, stages = read_pipeline(write_pipeline(tmp_path, [
        stage("sft", model={"path": "/models/base"}), stage("a", "sft"), stage("b", "a")]))
    by = {s.name: s for s in stages}
    cfg = stage_config(folder, by["b"], by, str(folder / "a") + ":4")
    assert cfg.model.path == "/models/base" and cfg.model.init_from == str(folder / "a") + ":4"
    assert stage_config(folder, by["b"], by, "").model.init_from == ""  # '' : the bare base


# ---- which checkpoint ---------------------------------------------------------------------------------------

def test_default_from_is_the_selected_checkpoint_not_the_last(tmp_path):
    run = fake_stage(tmp_path / "pipe", "sft")
    init, rec = resolved(tmp_path, [stage("sft"), stage("dpo", "sft")], "dpo")
    points, _, _ = run_points(run)
    assert rewind(points, "select").point.step == 4  # the knee; the last is 6
    assert init == f"{run}:4"
    assert rec["how"] == "selected" and rec["step"] == 4 and rec["sha256"] == sha(run, 4)
    assert rec["checkpoint"] == "checkpoints/step-000004" and "knee" in rec["rule"] and "step 4" in rec["reason"]


def test_the_source_stages_own_rule_chooses(tmp_path):
    fake_stage(tmp_path / "pipe", "sft")
    init, rec = resolved(tmp_path, [stage("sft", select={"max_kl": 0.2}), stage("dpo", "sft@selected")], "dpo")
    assert rec["step"] == 2 and init.endswith("sft:2") and "max_kl: 0.2" in rec["rule"]


def test_last_and_a_named_step(tmp_path):
    run = fake_stage(tmp_path / "pipe", "sft")
    init, rec = resolved(tmp_path, [stage("sft"), stage("dpo", "sft@last")], "dpo")
    assert init == str(run) and rec["step"] == 6 and rec["how"] == "last"  # no step: as `from: sft` was before
    init, rec = resolved(tmp_path, [stage("sft"), stage("dpo", "sft:2")], "dpo")
    assert init == f"{run}:2" and rec["sha256"] == sha(run, 2)
    with pytest.raises(SftlabError, match=r"no checkpoint at step 3; have \[2, 4, 6\]"):
        resolved(tmp_path, [stage("sft"), stage("dpo", "sft:3")], "dpo")


def test_a_stage_without_probes_gives_its_last_checkpoint_and_says_why(tmp_path):
    run = fake_stage(tmp_path / "pipe", "sft", path=None, probes=[])
    init, rec = resolved(tmp_path, [stage("sft", probes=[]), stage("dpo", "sft")], "dpo")
    assert init == str(run) and rec["step"] == 4 and "has no probes" in rec["reason"]


def test_probes_without_a_retention_score_are_a_one_line_error_naming_the_way_out(tmp_path):
    run = fake_stage(tmp_path / "pipe", "sft")
    lines = [json.loads(x) for x in (run / "trajectory.jsonl").read_text().splitlines()]
    for line in lines:
        line["scores"].pop("kl")
    (run / "trajectory.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(SftlabError) as e:
        resolved(tmp_path, [stage("sft"), stage("dpo", "sft")], "dpo")
    assert "no retention score" in str(e.value) and "from: sft@last" in str(e.value)
    assert "\n" not in str(e.value)


def test_when_the_rule_keeps_the_start_the_next_stage_starts_where_that_stage_started(tmp_path):
    fake_stage(tmp_path / "pipe", "sft", path=FLAT)
    init, rec = resolved(tmp_path, [stage("sft"), stage("a", "sft")], "a")
    assert init == "" and rec["step"] == 0 and "starts from the base model" in rec["reason"]  # sft started there
    sft = fake_stage(tmp_path / "pipe", "sft2")
    fake_stage(tmp_path / "pipe", "a2", path=FLAT, start={"run": "/moved/elsewhere", "run_rel": "../sft2", "step": 4,
                                                          "sha256": sha(sft, 4)})  # found through run_rel
    init, rec = resolved(tmp_path, [stage("sft2"), stage("a2", "sft2"), stage("b2", "a2")], "b2")
    assert init == f"{sft}:4" and rec["step"] == 0 and rec["sha256"] == sha(sft, 4)
    assert rec["starts_at"] == {"run": str(sft), "step": 4}


def test_a_stage_finished_from_the_last_checkpoint_is_told_how_to_keep_it(tmp_path):
    """Before multi-round pipelines `from: sft` meant sft's last checkpoint; a stage finished that way is not
    retrained silently from the selected one: the error names from: sft@last."""
    from sftlab.pipeline import _changed

    fake_stage(tmp_path / "pipe", "sft")
    folder, stages, configs = plan(write_pipeline(tmp_path, [stage("sft"), stage("dpo", "sft")]))
    by = {s.name: s for s in stages}
    _, rec = resolve_start(folder, by["dpo"], configs["sft"])
    old = {"config_hash": stage_config(folder, by["dpo"], by).hash()}  # init_from: PIPELINE/sft, its last
    assert "from: sft now means the checkpoint its select: rule picks (step 4). Write from: sft@last" in \
        str(_changed(folder, by["dpo"], by, old, rec))
    assert "finished earlier with another config" in str(_changed(folder, by["dpo"], by, {"config_hash": "x"}, rec))
