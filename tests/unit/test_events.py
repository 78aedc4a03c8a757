"""The training loop's events (train/callbacks.Callback): their order, on_scored after each scoring pass, on_close
always last (failed or not); hooks are typed (a misspelt hook name is an error, not a hook that never runs)."""

from __future__ import annotations

import pytest

from conftest import memorisable_chats, tiny_config, write_jsonl
import sftlab.train.loop as loop
from sftlab.train.loop import Hooks, Trainer


class Recorder:
    def __init__(self):
        self.events = []

    def on_train_start(self, step): self.events.append(("start", step))
    def on_step_end(self, step, metrics): self.events.append(("step", step))
    def on_eval(self, step, metrics): self.events.append(("eval", step))
    def on_checkpoint(self, step, entry): self.events.append(("checkpoint", step))
    def on_scored(self, step, scores): self.events.append(("scored", step, sorted(scores)))
    def on_train_end(self, step, summary): self.events.append(("end", step))
    def on_close(self, failed): self.events.append(("close", failed))


def _run(tmp_path, model_dir, monkeypatch, hooks=None):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    cfg = tiny_config(tmp_path, model_dir, data, train={"steps": 4, "batch_size": 4, "threads": 1},
                      checkpoint={"every": 2}, probes=[{"name": "heldout_loss", "path": str(data), "limit": 4}])
    rec = Recorder()
    real = loop.build_callbacks
    monkeypatch.setattr(loop, "build_callbacks", lambda *a, **kw: [*real(*a, **kw), rec])
    try:
        Trainer(cfg, hooks=hooks).run()
    finally:
        return rec.events


def test_events_come_in_order_and_close_last(tmp_path, tiny_model_dir, monkeypatch):
    ev = _run(tmp_path, tiny_model_dir, monkeypatch)
    names = [e[0] for e in ev]
    assert names == ["start", "scored", "step", "step", "checkpoint", "scored", "step", "step", "checkpoint",
                     "scored", "end", "close"], ev
    assert [e[1] for e in ev if e[0] == "scored"] == [0, 2, 4]
    assert all(e[2] == ["heldout_loss"] for e in ev if e[0] == "scored")
    assert ev[-1] == ("close", False)


def test_a_failed_run_still_closes_without_ending(tmp_path, tiny_model_dir, monkeypatch):
    def crash(trainer, step, metrics):
        if step == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
        cfg = tiny_config(tmp_path, tiny_model_dir, data, train={"steps": 4, "batch_size": 4, "threads": 1})
        rec = Recorder()
        real = loop.build_callbacks
        monkeypatch.setattr(loop, "build_callbacks", lambda *a, **kw: [*real(*a, **kw), rec])
        Trainer(cfg, hooks={"after_step": crash}).run()
    assert [e[0] for e in rec.events] == ["start", "step", "step", "step", "close"]
    assert rec.events[-1] == ("close", True)


def test_hooks_are_typed():
    with pytest.raises(TypeError, match="unknown trainer hook.*after_stpe"):
        Hooks.of({"after_stpe": print})
    h = Hooks.of({"after_step": print})
    assert h.after_step is print and h.before_rename is None and Hooks.of(None) == Hooks()
