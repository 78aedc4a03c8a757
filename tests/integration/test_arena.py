"""`sftlab arena` end to end on a tiny model: matched budgets, a learning-rate sweep, every trial a run
directory scored by the same probes, the leaderboard; a failed trial does not stop the others; a rerun
skips finished trials and resumes a half-finished one."""

from __future__ import annotations

import json

import pytest

from conftest import arena_config
from sftlab.arena import load_arena, plan_trials
from sftlab.arena.runner import trial_state
from sftlab.cli import main
from sftlab.methods import METHODS
from sftlab.train.loop import Trainer


def test_plan_matches_budgets_caps_and_refuses(tmp_path, tiny_model_dir):
    arena, base = load_arena(arena_config(tmp_path, tiny_model_dir, methods=["lora", "prefix", "prompt", "ia3"],
                                          lrs={}))
    trials = plan_trials(arena, base)
    lr = METHODS.get("lora").default_lr  # the registration's rate (3e-3: the demo's sweep), times lr_factors
    assert {t.lr for t in trials if t.method == "lora"} == {float(f"{lr * f:.3g}") for f in (0.3, 1.0, 3.0)}
    for t in trials:
        if t.method == "ia3":  # at most one vector per projection, far below 4k: capped there and flagged
            assert not t.refused and t.capped and t.record()["capped"] and "capped" in t.note
            assert t.trainable < 4000 * 0.9
        else:
            assert not t.refused and not t.capped and abs(t.trainable - 4000) / 4000 <= 0.10, (t.name, t.trainable)
    assert len({t.hash for t in trials if not t.refused}) == len([t for t in trials if not t.refused])
    # below a method's smallest setting there is nothing to cap to: refused, naming the closest
    arena, base = load_arena(arena_config(tmp_path, tiny_model_dir, methods=["prefix"], budgets=["10"], lrs={}))
    assert all(t.refused and "closest" in t.note for t in plan_trials(arena, base))


def test_arena_runs_ranks_and_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = arena_config(tmp_path, tiny_model_dir)
    arena, base = load_arena(cfg)
    trials = {t.name: t for t in plan_trials(arena, base)}
    assert len(trials) == 4
    # a half-finished trial: stopped after its first checkpoint
    half = trials["lora-4k-lr0.01-s0"]

    def stop(trainer, step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(half.cfg, hooks={"after_step": stop}).run()
    assert trial_state(half) == "partial"
    # and one that fails: the others go on
    real_run = Trainer.run

    def flaky(self):
        if self.cfg.run.name.startswith("prompt"):
            raise RuntimeError("planted failure")
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", flaky)
    assert main(["arena", str(cfg)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "out" / "a"
    meta = json.loads((folder / "arena.json").read_text())
    status = {t["name"]: t["status"] for t in meta["trials"]}
    assert status == {"full-ref-lr0.001-s0": "done", "lora-4k-lr0.001-s0": "done", "lora-4k-lr0.01-s0": "done",
                      "prompt-4k-lr0.03-s0": "failed"}
    assert "planted failure" in next(t["error"] for t in meta["trials"] if t["status"] == "failed")
    assert "1 trial(s) failed" in out
    resumed = next(t for t in meta["trials"] if t["name"] == half.name)
    assert resumed.get("resumed") is True
    for name in ("full-ref-lr0.001-s0", "lora-4k-lr0.001-s0", half.name):
        lines = (folder / "trials" / name / "trajectory.jsonl").read_text().splitlines()
        steps = sorted({json.loads(x)["step"] for x in lines if "scores" in json.loads(x)})
        assert steps == [0, 2, 4], name  # the same probes at the same points for every trial
    board = json.loads((folder / "leaderboard.json").read_text())
    assert [r["method"] for r in board["rows"]] and {r["method"] for r in board["rows"]} == {"full", "lora"}
    lora = next(r for r in board["rows"] if r["method"] == "lora")
    kept = [t for t in board["trials"] if t["method"] == "lora" and t["kept"]]
    assert len(kept) == 1 and lora["lr"] == [kept[0]["lr"]]
    assert kept[0]["hypervolume"] == max(t["hypervolume"] for t in board["trials"] if t["method"] == "lora")
    for r in board["rows"]:
        assert 0 <= r["hypervolume"] <= 1 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
    assert "HV" in out and "reference point" in out

    # rerun: finished trials are skipped (their folders untouched); the failed one runs again
    monkeypatch.setattr(Trainer, "run", real_run)
    before = {n: (folder / "trials" / n / "trajectory.jsonl").stat().st_mtime_ns for n in status if n[0] != "p"}
    assert main(["arena", str(cfg)]) == 0
    meta = json.loads((folder / "arena.json").read_text())
    assert {t["name"]: t["status"] for t in meta["trials"]} == {n: "done" for n in status}
    assert before == {n: (folder / "trials" / n / "trajectory.jsonl").stat().st_mtime_ns for n in before}
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.html").is_file()


@pytest.mark.slow
def test_arena_on_local_ray(tmp_path, tiny_model_dir, monkeypatch):
    """Two trials as Ray tasks on a local Ray instance on CPU; the same folder layout and leaderboard."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        cfg = arena_config(tmp_path, tiny_model_dir, methods=["full", "lora"], lrs={"full": [1e-3], "lora": [1e-2]},
                           backend="ray")
        assert main(["arena", str(cfg)]) == 0
    finally:
        ray.shutdown()
    folder = tmp_path / "out" / "a"
    meta = json.loads((folder / "arena.json").read_text())
    assert [t["status"] for t in meta["trials"]] == ["done", "done"]
    board = json.loads((folder / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"full", "lora"}


def test_a_failing_trial_closes_its_writers_and_trackers(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A trial that dies mid-run (here: the disk fills at its second checkpoint) is recorded as failed, and the
    end event still runs: its TensorBoard writer and progress bar are closed, not left open in the arena's
    process for the next trial."""
    from sftlab.train import callbacks
    from sftlab.train import checkpoint as ckpt

    opened = []
    for cls in (callbacks.TensorBoardLogger, callbacks.Progress):
        real_init = cls.__init__

        def init(self, *a, _real=real_init, **kw):
            _real(self, *a, **kw)
            opened.append(self)

        monkeypatch.setattr(cls, "__init__", init)
    real_save = ckpt.save_weights

    def full_disk(model, peft, folder, *a, **kw):
        if folder.name.startswith(".tmp-step-000004"):
            raise OSError(28, "No space left on device")
        real_save(model, peft, folder, *a, **kw)

    monkeypatch.setattr(ckpt, "save_weights", full_disk)
    cfg = arena_config(tmp_path, tiny_model_dir, methods=["lora"], lrs={"lora": [1e-3]})
    assert main(["arena", str(cfg), "logging.tensorboard=true", "logging.progress=true"]) in (0, 1, 2)
    records = json.loads((tmp_path / "out" / "a" / "arena.json").read_text())
    rows = records["trials"] if isinstance(records, dict) and "trials" in records else records
    assert any(r.get("status") == "failed" and "No space left" in r.get("error", "") for r in
               (rows.values() if isinstance(rows, dict) else rows)), records
    tb = [o for o in opened if isinstance(o, callbacks.TensorBoardLogger)]
    bars = [o for o in opened if isinstance(o, callbacks.Progress)]
    assert tb and bars
    assert all(o.writer.all_writers is None for o in tb), "the TensorBoard writer of the failed trial is still open"
    assert all(o.bar.disable for o in bars), "the progress bar of the failed trial is still open"  # tqdm.close()
