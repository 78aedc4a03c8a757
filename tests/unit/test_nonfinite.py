"""Non-finite steps: a NaN/inf loss or gradient is skipped (not applied) and counted; after
train.max_bad_steps in a row the run stops cleanly with its last good checkpoint. Skipping keeps data
order and RNG a function of the step, so a resumed run still equals an uninterrupted one. Under DDP one
rank's NaN makes every rank skip.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import build_tiny_model, memorisable_chats, tiny_config, write_jsonl
from sftlab.configtools import ConfigError
from sftlab.errors import SftlabError
from sftlab.train.checkpoint import hash_files, read_trajectory
from sftlab.train.loop import Trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("nan-model"), dropout=0.1)


def config(tmp_path, model_dir, name, steps=8, **train):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(12))
    return tiny_config(tmp_path, model_dir, data, method={"name": "lora", "r": 4, "dropout": 0.1},
                       run={"name": name, "seed": 5},
                       train={"steps": steps, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "threads": 1, **train},
                       checkpoint={"every": 2})


def nan_loss_at(steps: set[int]):
    """after_setup hook: the objective returns a NaN loss on these (1-based) steps."""

    def hook(trainer):
        inner = trainer.objective

        def objective(*args, **kw):
            loss, m = inner(*args, **kw)
            if trainer.pos["step"] + 1 in steps:  # pos["step"] counts finished steps
                loss = loss * float("nan")
                m = {**m, "loss_sum": float("nan")}
            return loss, m

        trainer.objective = objective

    return hook


def inf_grad_at(steps: set[int]):
    """after_backward hook: one gradient entry becomes inf on these steps (the loss stays finite)."""

    def hook(trainer):
        if trainer.pos["step"] + 1 in steps:
            p = next(p for p in trainer.model.parameters() if p.requires_grad)
            p.grad.view(-1)[0] = float("inf")

    return hook


def weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def snapshot_after_each_step(store: dict):
    def hook(trainer, step, metrics):
        store[step] = weights(trainer)

    return hook


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]


def test_nan_loss_step_is_skipped_counted_and_not_applied(tmp_path, model_dir, capsys):
    cfg = config(tmp_path, model_dir, "nan")
    after = {}
    t = Trainer(cfg, hooks={"after_setup": nan_loss_at({3}), "after_step": snapshot_after_each_step(after)})
    t.run()
    r = rows(cfg.run_dir)
    assert [x["step"] for x in r] == list(range(1, 9))
    assert [x["skipped"] for x in r] == [False, False, True] + [False] * 5
    assert [x["skipped_steps"] for x in r] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert math.isnan(r[2]["loss"]) and all(math.isfinite(x["loss"]) for i, x in enumerate(r) if i != 2)
    for n in after[2]:  # step 3 changed nothing ...
        assert bool((after[3][n] == after[2][n]).all()), n
    assert any(not bool((after[4][n] == after[3][n]).all()) for n in after[3])  # ... step 4 trained again
    assert "1 of 8 steps had a non-finite loss or gradient and were skipped" in capsys.readouterr().out
    assert [e["step"] for e in read_trajectory(cfg.run_dir)] == [2, 4, 6, 8]


def test_inf_gradient_is_skipped_too(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, "inf", steps=4)
    t = Trainer(cfg, hooks={"after_backward": inf_grad_at({2})})
    t.run()
    r = rows(cfg.run_dir)
    assert [x["skipped"] for x in r] == [False, True, False, False]
    assert math.isfinite(r[1]["loss"]) and not math.isfinite(r[1]["grad_norm"])
    assert all(bool(w.isfinite().all()) for w in weights(t).values())


def test_too_many_bad_steps_in_a_row_stop_cleanly_with_the_last_good_checkpoint(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, "stop", steps=12, max_bad_steps=3)
    with pytest.raises(SftlabError) as e:
        Trainer(cfg, hooks={"after_setup": nan_loss_at({3, 5, 6, 7, 8, 9})}).run()
    msg = str(e.value)
    assert "\n" not in msg
    assert "stopped at step 7: 3 steps in a row (steps 5-7)" in msg
    assert "the weights are those of step 4, the last applied step, and the last checkpoint is " \
           "checkpoints/step-000006" in msg
    assert "train.max_bad_steps" in msg and "train.lr" in msg
    run = cfg.run_dir
    assert not (run / ".lock").exists()
    entries = read_trajectory(run)
    # step 6 fell inside the bad run: its checkpoint holds the unchanged step-4 weights, complete; step 7 is
    # not checkpointed
    assert [x["step"] for x in entries] == [2, 4, 6]
    for x in entries:
        assert hash_files(run / x["path"]) == x["sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert [x["skipped_steps"] for x in rows(run)][-1] == 4
    pos = json.loads((run / "resume" / "position.json").read_text())
    assert (pos["step"], pos["skipped"], pos["bad_in_row"]) == (6, 3, 2)  # counters resume with the run


def test_skipping_keeps_resume_exact(tmp_path, model_dir):
    bad = {3, 7}
    a = Trainer(config(tmp_path, model_dir, "a", steps=10), hooks={"after_setup": nan_loss_at(bad)})
    a.run()

    class Crash(RuntimeError):
        pass

    def crash(trainer, step, metrics):
        if step == 7:
            raise Crash()

    cfg_b = config(tmp_path, model_dir, "b", steps=10)
    with pytest.raises(Crash):
        Trainer(cfg_b, hooks={"after_setup": nan_loss_at(bad), "after_step": crash}).run()
    b = Trainer(cfg_b, resume=True, hooks={"after_setup": nan_loss_at(bad)})
    b.run()
    wa, wb = weights(a), weights(b)
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) <= 1e-6
    assert [x["skipped_steps"] for x in rows(cfg_b.run_dir)] == [x["skipped_steps"] for x in rows(a.run_dir)]
    assert rows(cfg_b.run_dir)[-1]["skipped_steps"] == 2


def test_max_bad_steps_must_be_positive(tmp_path, model_dir):
    with pytest.raises(ConfigError, match=r"^train\.max_bad_steps: must be >= 1"):
        config(tmp_path, model_dir, "x", max_bad_steps=0)


# ---- DDP: every rank takes the same decision --------------------------------------------------------

def _verdict_worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from sftlab.train.loop import Dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        t = Trainer.__new__(Trainer)
        t.dist = Dist(rank, 2)
        # rank 0 sees a NaN loss, rank 1 a finite one; then a finite loss everywhere but an inf gradient norm
        # on rank 1 only (e.g. its own clipping saw inf before the reduce)
        first = t._global_loss_and_verdict(float("nan") if rank == 0 else 1.0, 0.5)
        second = t._global_loss_and_verdict(1.0, float("inf") if rank == 1 else 0.5)
        third = t._global_loss_and_verdict(1.0, 0.5)
        out.put((rank, first[1], second[1], third))
    finally:
        dist.destroy_process_group()


def test_under_ddp_all_ranks_agree_to_skip():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_verdict_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=600)
    assert [r[1:3] for r in results] == [(True, True), (True, True)]
    assert [r[3] for r in results] == [(2.0, False), (2.0, False)]  # the loss is summed over ranks
