"""Resume is exact: a run stopped mid-way and resumed ends with the weights of an uninterrupted run.

The run uses everything that carries hidden state: dropout (model attention and LoRA, so the torch RNG
must be restored), several shuffled epochs (the data position), gradient accumulation (the position
inside a step) and a decaying schedule (the scheduler state). Also: the run directory refuses a second
training without --resume, and a locked directory refuses a concurrent one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny_model, memorisable_chats, tiny_config, write_jsonl
from sftlab.errors import SftlabError
from sftlab.train.checkpoint import hash_files, read_trajectory
from sftlab.train.loop import Trainer

STEPS, EVERY, CRASH_AT = 12, 4, 6


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("dropout-model"), dropout=0.1)


def config(tmp_path, model_dir, name):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(12))  # 3 steps per epoch: 4 epochs
    return tiny_config(tmp_path, model_dir, data, method={"name": "lora", "r": 4, "dropout": 0.1},
                       run={"name": name, "seed": 3},
                       train={"steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "schedule": "cosine",
                              "warmup": 2, "threads": 1},
                       checkpoint={"every": EVERY})


def trainable(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crash_at(step):
    def hook(trainer, s, metrics):
        if s == step:
            raise Crash(f"simulated crash after step {s}")

    return hook


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dropout_model_dir):
    """(uninterrupted trainer, resumed trainer): B crashes after step 6 and resumes from step 4."""
    tmp = tmp_path_factory.mktemp("resume")
    a = Trainer(config(tmp, dropout_model_dir, "a"))
    a.run()
    cfg_b = config(tmp, dropout_model_dir, "b")
    with pytest.raises(Crash):
        Trainer(cfg_b, hooks={"after_step": crash_at(CRASH_AT)}).run()
    assert not (cfg_b.run_dir / ".lock").exists(), "a crash must release the lock"
    assert [e["step"] for e in read_trajectory(cfg_b.run_dir)] == [4]
    b = Trainer(cfg_b, resume=True)
    b.run()
    return a, b


def test_resumed_run_ends_with_uninterrupted_weights(runs):
    a, b = runs
    wa, wb = trainable(a), trainable(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[n] - wb[n]).abs().max().item() for n in wa)
    assert diff <= 1e-6, f"resumed weights differ by {diff:.2e}"
    assert b.pos["step"] == STEPS


def test_resumed_run_logs_each_step_once_with_the_same_losses(runs):
    a, b = runs
    rows_a, rows_b = metric_rows(a.run_dir), metric_rows(b.run_dir)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))  # steps 5-6 ran twice, logged once
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
        assert ra["epoch"] == rb["epoch"]


def test_trajectory_hashes_match_the_files(runs):
    a, b = runs
    for run_dir in (a.run_dir, b.run_dir):
        entries = read_trajectory(run_dir)
        assert [e["step"] for e in entries] == list(range(EVERY, STEPS + 1, EVERY))
        for e in entries:
            assert hash_files(run_dir / e["path"]) == e["sha256"]
        assert not list(run_dir.glob("checkpoints/.tmp-*")) and not list(run_dir.glob(".tmp-*"))
    # same weights, same adapter config -> the same checkpoint bytes
    assert [e["sha256"] for e in read_trajectory(a.run_dir)] == [e["sha256"] for e in read_trajectory(b.run_dir)]


def test_second_training_without_resume_is_refused(runs):
    a, _ = runs
    with pytest.raises(SftlabError) as e:
        Trainer(a.cfg).run()
    assert "--resume" in str(e.value) and str(a.run_dir) in str(e.value)


def test_locked_run_dir_is_refused(runs):
    _, b = runs
    lock = b.run_dir / ".lock"
    try:
        # a lock whose process is alive (this one) ...
        lock.write_text(json.dumps({"pid": os.getpid()}))
        with pytest.raises(SftlabError, match="another training"):
            Trainer(b.cfg, resume=True).run()
        # ... and one left by a process that is gone: the message says how to clear it
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        lock.write_text(json.dumps({"pid": dead.pid}))
        with pytest.raises(SftlabError) as e:
            Trainer(b.cfg, resume=True).run()
        msg = str(e.value)
        assert "stale lock" in msg and f"rm {lock}" in msg and "\n" not in msg
        assert lock.exists(), "a stale lock is reported, never silently taken"
    finally:
        lock.unlink(missing_ok=True)


def test_resume_before_any_resume_state_starts_over(runs, tmp_path, dropout_model_dir):
    a, _ = runs
    cfg = config(tmp_path, dropout_model_dir, "c")
    with pytest.raises(Crash):
        Trainer(cfg, hooks={"after_step": crash_at(EVERY - 2)}).run()
    c = Trainer(cfg, resume=True)
    c.run()
    wa, wc = trainable(a), trainable(c)
    assert max((wa[n] - wc[n]).abs().max().item() for n in wa) <= 1e-6
    assert [r["step"] for r in metric_rows(cfg.run_dir)] == list(range(1, STEPS + 1))
    assert (cfg.run_dir / "config.yaml").is_file() and (cfg.run_dir / "provenance.json").is_file()


def test_resume_with_a_changed_config_is_refused(runs):
    import dataclasses

    _, b = runs
    changed = dataclasses.replace(b.cfg, train=dataclasses.replace(b.cfg.train, lr=0.5))
    with pytest.raises(SftlabError) as e:
        Trainer(changed, resume=True).run()
    assert "train.lr" in str(e.value) and "config.yaml --resume" in str(e.value)
    more_steps = dataclasses.replace(b.cfg, train=dataclasses.replace(b.cfg.train, steps=STEPS + 1))
    Trainer(more_steps, resume=True).run()  # raising train.steps continues the same run
    assert read_trajectory(b.run_dir)[-1]["step"] == STEPS + 1
