"""checkpoint.keep: frontier (train/prune.py): dominated checkpoints lose their weights, frontier points, the
selected one and the latest never do, and a SIGKILL in the middle of a deletion leaves a consistent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.rewinding import run_points
from sftlab.rundir_format import read_trajectory
from sftlab.train.checkpoint import hash_files
from sftlab.train.prune import prune

SRC = Path(__file__).resolve().parents[2] / "src"

# step: (task loss, KL to base), both lower is better. Step 4 is dominated by step 6; the rest is the frontier.
POINTS = {0: (10.0, 0.0), 2: (8.0, 0.1), 4: (7.0, 0.5), 6: (6.0, 0.3), 8: (5.5, 0.6)}


def _score(name, kind, v):
    return {"name": name, "value": v, "kind": kind, "higher_is_better": False, "n": 8, "ci_low": v - 0.01,
            "ci_high": v + 0.01}


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    lines = []
    for step, (task, kl) in POINTS.items():
        if step:
            folder = run / "checkpoints" / f"step-{step:06d}"
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(os.urandom(4096))
            (folder / "config.json").write_text("{}")
            lines.append({"step": step, "path": f"checkpoints/{folder.name}", "sha256": hash_files(folder)})
        lines.append({"step": step, "scores": {"heldout_loss": _score("heldout_loss", "task", task),
                                               "kl_to_base": _score("kl_to_base", "retention", kl)}})
    (run / "trajectory.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def assert_consistent(run: Path) -> None:
    """Every entry that names a folder has it, complete (its sha256); every frontier point still has one."""
    entries = read_trajectory(run)
    for e in entries:
        if e.get("path"):
            assert hash_files(run / e["path"]) == e["sha256"], e
    kept = {e["step"] for e in entries if e.get("path")}
    assert {2, 6, 8} <= kept


def test_only_the_dominated_checkpoint_goes_and_its_scores_stay(tmp_path):
    run = make_run(tmp_path)
    assert prune(run) == [4]
    assert not (run / "checkpoints" / "step-000004").exists()
    assert_consistent(run)
    e4 = next(e for e in read_trajectory(run) if e["step"] == 4)
    assert e4["pruned"] and e4["path"] is None and e4["scores"]["heldout_loss"]["value"] == 7.0
    assert [p.step for p in run_points(run)[0]] == [0, 2, 4, 6, 8]  # still a point on the plane
    assert prune(run) == []  # idempotent
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000006", "step-000008"]


def test_the_selected_checkpoint_stays_even_when_dominated(tmp_path):
    run = make_run(tmp_path)
    # no stated rule picks a dominated point on these scores, so a rule that picks step 4 stands in for one
    from sftlab.train import prune as mod

    real = mod.select
    mod.select = lambda points, **kw: type("C", (), {"point": next(p for p in points if p.step == 4)})()
    try:
        assert prune(run) == []
    finally:
        mod.select = real


def test_a_disk_budget_deletes_only_while_over_it(tmp_path):
    run = make_run(tmp_path)
    assert prune(run, budget_mb=1000) == []  # under the budget: the dominated one may stay
    assert prune(run, budget_mb=0.001) == [4]  # over it: dominated ones go, frontier points never
    assert_consistent(run)


@pytest.mark.parametrize("point", ["prune_line", "prune_delete"])
def test_a_sigkill_in_the_middle_of_a_deletion_leaves_a_consistent_run(tmp_path, point):
    run = make_run(tmp_path)
    code = f"import sys; sys.path.insert(0, {str(SRC)!r}); from sftlab.train.prune import prune; prune({str(run)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SFTLAB_FAULT": f"{point}@4"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and "sftlab-fault" in proc.stderr, proc.stderr
    assert_consistent(run)  # the entry no longer names the half-deleted folder; the frontier is whole
    leftovers = {p.name for p in (run / "checkpoints").iterdir()}
    assert leftovers == {"step-000002", "step-000006", "step-000008",
                         ".pruned-step-000004" if point == "prune_delete" else "step-000004"}
    assert prune(run) == []  # the next pass removes what the kill left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000006", "step-000008"]
    assert_consistent(run)


def test_a_training_run_with_keep_frontier_keeps_every_frontier_point(tmp_path, tiny_model_dir):
    from conftest import memorisable_chats, tiny_config, write_jsonl
    from sftlab.configtools import ConfigError
    from sftlab.trajectory import pareto_front
    from sftlab.train.loop import Trainer

    chats = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(16))
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill." for i in range(4)))
    probes = [{"name": "heldout_loss", "path": str(chats)},
              {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0}]
    # a rate so high the path overshoots: later checkpoints forget more and learn less
    cfg = tiny_config(tmp_path, tiny_model_dir, chats, method={"name": "full"},
                      train={"steps": 12, "batch_size": 4, "lr": 0.3, "threads": 1, "schedule": "constant"},
                      checkpoint={"every": 2, "keep": "frontier"}, probes=probes)
    Trainer(cfg).run()
    entries = read_trajectory(cfg.run_dir)
    front = {p.step for p in pareto_front(run_points(cfg.run_dir)[0])}
    for e in entries:
        if e["step"] in front and e["step"]:
            assert e.get("path") and hash_files(cfg.run_dir / e["path"]) == e["sha256"]
        if e.get("pruned"):
            assert not (cfg.run_dir / e["pruned_path"]).exists() and e["step"] not in front
    assert entries[-1].get("path")  # the latest stays
    print("pruned:", [e["step"] for e in entries if e.get("pruned")], "frontier:", sorted(front))
    with pytest.raises(ConfigError, match="checkpoint.keep: frontier needs probes"):
        tiny_config(tmp_path, tiny_model_dir, chats, checkpoint={"keep": "frontier"})
