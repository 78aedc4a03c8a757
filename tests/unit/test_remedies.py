"""remedies/: each forgetting remedy, on a tiny model, moves retention the way it claims (or, for DFT, has its
documented effect); same seed, data and step count with and without it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, memorisable_chats, tiny_config, write_jsonl
from sftlab.config import config_from_dict
from sftlab.configtools import ConfigError
from sftlab.rundir_format import read_trajectory
from sftlab.train.loop import Trainer

GENERAL = "\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i} where people meet."
                      for i in range(8))


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A tiny model whose next-token distributions are far from uniform (larger initial weights), so KL to it
    moves measurably when it is fine-tuned."""
    return build_tiny_model(tmp_path_factory.mktemp("peaked"), init=0.15)


def _cfg(tmp_path, model_dir, method="lora", remedies=(), steps=12, lr=None, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    chats = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(16))
    general = tmp_path / "general.txt"
    general.write_text(GENERAL)
    m = {"name": "lora", "r": 4} if method == "lora" else {"name": method}
    lr = lr or (1e-2 if method == "lora" else 3e-3)
    return tiny_config(tmp_path, model_dir, chats, method=m,
                       train={"steps": steps, "batch_size": 4, "lr": lr, "threads": 1, "schedule": "constant"},
                       checkpoint={"every": steps},
                       probes=[{"name": "heldout_loss", "path": str(chats)},
                               {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0}],
                       remedies=list(remedies), **sections)


def _final(run_dir, step=None):
    """(task loss, KL to base) of the last scored checkpoint (or `step`)."""
    entries = [e for e in read_trajectory(run_dir) if e.get("scores")]
    e = entries[-1] if step is None else next(x for x in entries if x["step"] == step)
    return e["scores"]["heldout_loss"]["value"], e["scores"]["kl_to_base"]["value"]


def _train(cfg):
    Trainer(cfg).run()
    return cfg.run_dir


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("remedy", [{"name": "kl", "weight": 1.0}, {"name": "l2sp", "weight": 1.0}],
                         ids=["kl", "l2sp"])
def test_a_penalty_keeps_more_of_the_base(tmp_path, peaked_model_dir, method, remedy):
    plain = _train(_cfg(tmp_path / "plain", peaked_model_dir, method))
    pen = _train(_cfg(tmp_path / "pen", peaked_model_dir, method, [remedy]))
    task0, _ = _final(plain, 0)
    task_p, kl_p = _final(plain)
    task_r, kl_r = _final(pen)
    print(f"{method}+{remedy['name']}: KL {kl_p:.3e} -> {kl_r:.3e}, task {task_p:.3f} -> {task_r:.3f} "
          f"(base {task0:.3f})")
    assert kl_r < kl_p  # retention better at the same step count
    assert task_r < task0  # and the task is still learned
    rows = [json.loads(x) for x in (pen / "metrics.jsonl").read_text().splitlines()]
    assert all(r[f"{remedy['name']}/seconds"] > 0 for r in rows if "loss" in r)  # the cost is recorded per step
    prov = json.loads((pen / "provenance.json").read_text())
    assert remedy["name"] in json.dumps(prov)


def test_remedies_validate_like_probes(tmp_path, peaked_model_dir):
    base = _cfg(tmp_path, peaked_model_dir).to_dict()
    with pytest.raises(ConfigError, match=r"remedies\[0\].name: unknown remedy 'l2s'; did you mean 'l2sp'"):
        config_from_dict({**base, "remedies": [{"name": "l2s"}]})
    with pytest.raises(ConfigError, match=r"remedies\[0\].wieght: unknown key; did you mean 'weight'"):
        config_from_dict({**base, "remedies": [{"name": "kl", "wieght": 1}]})
    with pytest.raises(ConfigError, match=r"remedies\[0\].weight: must be > 0"):
        config_from_dict({**base, "remedies": [{"name": "kl", "weight": 0}]})
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict({**base, "remedies": ["kl", "kl"]})
    cfg = config_from_dict({**base, "remedies": ["l2sp"]})
    assert cfg.remedies[0].options.weight == 0.01 and cfg.hash() != config_from_dict(base).hash()
