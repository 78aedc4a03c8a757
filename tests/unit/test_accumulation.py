"""The optimizer step: gradient accumulation equals one big batch, learning-rate schedules, clipping.

All through the real Trainer on the tiny model, so the loss normalisation (by the step's trained
tokens), the micro-batch plan and the scheduler are tested as they run.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import memorisable_chats, tiny_config, write_jsonl
from sftlab.train.loop import Trainer, lr_lambda

# Four examples of different lengths and different numbers of trained tokens, so a per-micro-batch
# mean (instead of a mean over the whole step's trained tokens) would weight them differently.
UNEVEN = [
    {"prompt": "hi", "completion": "yes"},
    {"prompt": "please describe the weather in the mountains today", "completion": "cold and windy with snow"},
    {"prompt": "count", "completion": "one two three four five six seven eight nine ten"},
    {"prompt": "what is the colour of the sky on a clear summer afternoon above the sea in june", "completion": "blue"},
]


def train_run(tmp_path, model_dir, data, name, method=None, grads: list | None = None, **train):
    """Train; return (trainer, metric rows, final trainable weights); `grads` collects each step's gradients."""
    cfg = tiny_config(tmp_path, model_dir, data, method=method or {"name": "lora", "r": 4},
                      run={"name": name}, train={"threads": 1, **train})

    def keep_grads(tr):
        grads.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad})

    trainer = Trainer(cfg, hooks={"before_optimizer_step": keep_grads} if grads is not None else None)
    run_dir = trainer.run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, [r for r in rows if not r.get("eval")], weights


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}], ids=["lora", "full"])
def test_grad_accum_equals_one_big_batch(tmp_path, tiny_model_dir, method):
    data = write_jsonl(tmp_path / "uneven.jsonl", UNEVEN)
    # Adam's first update is lr * g / (|g| + eps): nearly sign(g), so weights alone would hide a wrong
    # gradient scale. Hence the gradients themselves are compared, and two steps are taken (the second
    # update depends on the ratio of the two steps' gradients). Adam also turns a float-rounding error
    # of 3e-10 in a gradient of 5e-9 (it happens: sums of float32 terms in a different order) into an
    # update error of lr * 0.012; with lr 1e-5 that stays well below the 1e-6 bound on the weights.
    lr = 1e-5
    common = dict(steps=2, lr=lr, max_grad_norm=0.0)
    g_big, g_acc = [], []
    big, big_rows, w_big = train_run(tmp_path, tiny_model_dir, data, "big", method, g_big, batch_size=4,
                                     grad_accum=1, **common)
    acc, acc_rows, w_acc = train_run(tmp_path, tiny_model_dir, data, "accum", method, g_acc, batch_size=1,
                                     grad_accum=4, **common)
    lengths = {len(e.input_ids) for e in big.data.train}
    trained = {e.n_trained for e in big.data.train}
    assert len(lengths) == 4 and len(trained) >= 3, "the test needs examples of different lengths"
    assert len(big_rows) == len(acc_rows) == 2
    for a, b in zip(big_rows, acc_rows):
        assert a["trained_tokens"] == b["trained_tokens"] == sum(e.n_trained for e in big.data.train)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for step, (gb, ga) in enumerate(zip(g_big, g_acc), 1):
        scale = max(g.abs().max().item() for g in gb.values())
        gdiff = max((gb[n] - ga[n]).abs().max().item() for n in gb)
        assert gdiff <= 1e-5 * scale, f"step {step}: gradients differ by {gdiff:.2e} (largest {scale:.2e})"
    diff = max((w_big[n] - w_acc[n]).abs().max().item() for n in w_big)
    w0 = _initial(big)
    moved = max((w_big[n] - w0[n]).abs().max().item() for n in w0)
    assert moved > lr, "the steps should have changed the weights"
    assert diff <= 1e-6, f"grad_accum=4 x batch 1 differs from batch 4 by {diff:.2e}"


def _initial(trainer) -> dict:
    """The trainable weights before training: same seed, same method, fresh setup."""
    fresh = Trainer(trainer.cfg)
    fresh.setup()
    return {n: p.detach().clone() for n, p in fresh.model.named_parameters() if p.requires_grad}


# ---- learning-rate schedules ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule,warmup,total", [("constant", 0, 6), ("linear", 0, 6), ("linear", 2, 8),
                                                   ("cosine", 0, 6), ("cosine", 3, 9)])
def test_lr_lambda_values(schedule, warmup, total):
    f = lr_lambda(schedule, warmup, total)
    values = [f(s) for s in range(total)]
    for s, v in enumerate(values):
        if s < warmup:
            expected = (s + 1) / (warmup + 1)  # ramps up, never a wasted zero-rate step
        elif schedule == "constant":
            expected = 1.0
        elif schedule == "linear":
            expected = 1 - (s - warmup) / (total - warmup)
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert v == pytest.approx(expected, abs=1e-12), (s, values)
    assert values[warmup] == 1.0  # the peak right after warmup
    assert all(0 < v <= 1 for v in values)  # the last step still learns
    assert values[warmup:] == sorted(values[warmup:], reverse=True)
    if warmup:
        assert values[:warmup + 1] == sorted(values[:warmup + 1])


def test_logged_lr_is_the_rate_each_step_used(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    _, rows, _ = train_run(tmp_path, tiny_model_dir, data, "sched", steps=8, batch_size=2, lr=1e-2,
                           schedule="linear", warmup=0.25)  # a fraction of steps: 2 warmup steps
    f = lr_lambda("linear", 2, 8)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * f(s) for s in range(8)], rel=1e-9)
    assert rows[0]["lr"] == pytest.approx(1e-2 / 3)


# ---- clipping --------------------------------------------------------------------------------------

def test_gradient_clipping_is_applied(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(4))
    common = dict(steps=1, batch_size=4, lr=1e-2)
    free, free_rows, w_free = train_run(tmp_path, tiny_model_dir, data, "free", max_grad_norm=0.0, **common)
    _, clip_rows, w_clip = train_run(tmp_path, tiny_model_dir, data, "clip", max_grad_norm=1e-12, **common)
    w0 = _initial(free)
    # The logged norm is the one before clipping: the same in both runs.
    assert free_rows[0]["grad_norm"] == pytest.approx(clip_rows[0]["grad_norm"], rel=1e-6)
    assert free_rows[0]["grad_norm"] > 1e-3
    # Adam's first step is lr * g / (|g| + 1e-8): about lr per weight unclipped; with the gradient clipped
    # to norm 1e-12 every |g| << 1e-8, so the weights barely move.
    step_free = max((w_free[n] - w0[n]).abs().max().item() for n in w0)
    step_clip = max((w_clip[n] - w0[n]).abs().max().item() for n in w0)
    assert step_free == pytest.approx(1e-2, rel=1e-2)
    assert step_clip < 1e-2 * 1e-3
