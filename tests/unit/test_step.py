"""train/step.py: SFT and DPO run through one accumulation function; extra loss terms plug into it."""

from __future__ import annotations

import pytest
import torch

from conftest import memorisable_chats, tiny_config, write_jsonl
from sftlab.train import step as step_fn
from sftlab.train.dpo import DpoTerm
from sftlab.train.loop import Trainer


def _config(tmp_path, model_dir, dpo: bool, steps: int = 1):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if dpo:
        colours = ["red", "blue", "green", "black", "white", "pink"]
        data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"colour of item {i}?", "chosen": colours[i % 6],
                                                       "rejected": colours[(i + 1) % 6]} for i in range(8)])
        extra = {"objective": {"name": "dpo", "beta": 0.1, "reference": "disable_adapter"}}
    else:
        data, extra = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8)), {}
    return tiny_config(tmp_path, model_dir, data, run={"name": "r", "output_dir": str(tmp_path / "runs"), "seed": 0},
                       train={"steps": steps, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "threads": 1,
                              "max_grad_norm": 0, "precision": "fp32"}, **extra)


class L2Penalty:
    """lam/2 * sum of squared trainable weights, split evenly over the step's micro-batches."""

    name = "l2"

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, trainer, batch, n_micro):
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        sq = sum((p.float() ** 2).sum() for p in params)
        return self.lam / 2 * sq / n_micro, {"value": float(sq.detach())}


def _first_step_grads(cfg, extras=()):
    grads = {}

    def grab(tr):
        grads.update({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad})
        grads["_weights"] = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}

    tr = Trainer(cfg, hooks={"before_optimizer_step": grab, "after_setup": lambda t: t.extra_terms.extend(extras)})
    tr.run()
    return grads


@pytest.mark.parametrize("dpo", [False, True], ids=["sft", "dpo"])
def test_both_objectives_run_through_the_one_accumulation(tmp_path, tiny_model_dir, monkeypatch, dpo):
    seen = []
    real = step_fn.accumulate

    def spy(trainer, micro, term, extras=()):
        seen.append(type(term))
        return real(trainer, micro, term, extras)

    monkeypatch.setattr(step_fn, "accumulate", spy)
    Trainer(_config(tmp_path, tiny_model_dir, dpo, steps=2)).run()
    assert seen == [DpoTerm if dpo else step_fn.SftTerm] * 2


@pytest.mark.parametrize("dpo", [False, True], ids=["sft", "dpo"])
def test_an_extra_term_adds_its_gradient(tmp_path, tiny_model_dir, dpo):
    """With lam/2 ||w||^2 plugged in, every trainable gradient is the plain one plus lam * w (the penalty's
    exact gradient), for the SFT and the DPO objective alike."""
    lam = 0.5
    plain = _first_step_grads(_config(tmp_path / "a", tiny_model_dir, dpo))
    penalised = _first_step_grads(_config(tmp_path / "b", tiny_model_dir, dpo), [L2Penalty(lam)])
    weights = plain.pop("_weights")
    penalised.pop("_weights")
    assert plain.keys() == penalised.keys() and plain
    moved = 0
    for n, g in plain.items():
        want = g + lam * weights[n]
        torch.testing.assert_close(penalised[n], want, rtol=1e-5, atol=1e-6)
        moved += int(weights[n].abs().max() > 0)
    assert moved > 0  # some penalised weights are non-zero, so the check has teeth


def test_extra_term_metrics_are_logged(tmp_path, tiny_model_dir):
    import json

    cfg = _config(tmp_path, tiny_model_dir, False, steps=2)
    Trainer(cfg, hooks={"after_setup": lambda t: t.extra_terms.append(L2Penalty(0.1))}).run()
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["l2/value"] > 0 for r in rows)
