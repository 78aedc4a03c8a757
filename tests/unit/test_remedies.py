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


def _cfg(tmp_path, model_dir, method="lora", remedies=(), steps=12, lr=None, every=None, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    chats = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(16))
    general = tmp_path / "general.txt"
    general.write_text(GENERAL)
    m = {"name": "lora", "r": 4} if method == "lora" else {"name": method}
    lr = lr or (1e-2 if method == "lora" else 3e-3)
    return tiny_config(tmp_path, model_dir, chats, method=m,
                       train={"steps": steps, "batch_size": 4, "lr": lr, "threads": 1, "schedule": "constant"},
                       checkpoint={"every": every or steps, **sections.pop("checkpoint", {})},
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


def test_dft_scales_each_tokens_gradient_by_its_probability():
    """DFT's loss is sum_t sg(p_t) CE_t / N: its value, and its gradient on the logits is p_t times plain CE's."""
    import torch.nn.functional as F

    from sftlab.objectives import sft_loss
    from sftlab.remedies.dft import dft_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100  # untrained positions
    loss, m = dft_loss(hidden, targets, head, chunk=3)
    sel = targets != -100
    ce = F.cross_entropy(head(hidden[sel]), targets[sel], reduction="none")
    torch.testing.assert_close(loss, ((-ce).exp() * ce).sum() / sel.sum())
    plain, pm = sft_loss(hidden, targets, head)
    assert m["loss_sum"] == pytest.approx(pm["loss_sum"], rel=1e-6)  # the logged loss stays the plain one
    # per token: d(DFT)/d(logits) = p_t * d(CE_t)/d(logits)
    logits = head(hidden[sel].detach()).detach().requires_grad_(True)
    ce_t = F.cross_entropy(logits, targets[sel], reduction="none")
    g_plain = torch.autograd.grad(ce_t.sum(), logits, retain_graph=True)[0]
    g_dft = torch.autograd.grad(((-ce_t).exp().detach() * ce_t).sum(), logits)[0]
    torch.testing.assert_close(g_dft, (-ce_t).exp().detach()[:, None] * g_plain)
    # and through the module's loss, the hidden-state gradient is that of the p-weighted CE
    g_mod = torch.autograd.grad(loss, hidden)[0]
    g_ref = torch.autograd.grad((((-ce).exp().detach() * ce).sum() / sel.sum()), hidden)[0]
    torch.testing.assert_close(g_mod, g_ref)


def test_dft_trains_and_moves_less_from_the_base(peaked_model_dir, tmp_path):
    plain = _train(_cfg(tmp_path / "plain", peaked_model_dir, "full"))
    dft = _train(_cfg(tmp_path / "dft", peaked_model_dir, "full", ["dft"]))
    task0, _ = _final(plain, 0)
    (task_p, kl_p), (task_d, kl_d) = _final(plain), _final(dft)
    print(f"full+dft: KL {kl_p:.3e} -> {kl_d:.3e}, task {task_p:.3f} -> {task_d:.3f} (base {task0:.3f})")
    assert task_d < task0
    assert "dft" in json.loads((dft / "provenance.json").read_text())["remedies"]


def test_replay_mixes_a_share_of_tokens_and_keeps_more(peaked_model_dir, tmp_path):
    plain = _train(_cfg(tmp_path / "plain", peaked_model_dir, "full"))
    rep = _train(_cfg(tmp_path / "rep", peaked_model_dir, "full", [{"name": "replay", "share": 0.5, "n": 32,
                                                                      "max_length": 32}]))
    (task_p, kl_p), (task_r, kl_r) = _final(plain), _final(rep)
    print(f"full+replay: KL {kl_p:.3e} -> {kl_r:.3e}, task {task_p:.3f} -> {task_r:.3f}")
    rec = json.loads((rep / "provenance.json").read_text())["remedies"]["replay"]
    assert rec["actual_share"] >= 0.5 and rec["replay_trained_tokens"] >= rec["task_trained_tokens"]
    assert rec["source"].startswith("wikipedia leads 0..")  # no probe reads Wikipedia here
    assert kl_r < kl_p


def test_replay_refuses_text_the_retention_probe_reads(peaked_model_dir, tmp_path):
    from sftlab.errors import DataError

    cfg = _cfg(tmp_path, peaked_model_dir, remedies=[{"name": "replay", "path": str(tmp_path / "general.txt")}])
    with pytest.raises(DataError, match="overlaps a retention probe's text"):
        Trainer(cfg).run()
    # the Wikipedia pool skips the leads a Wikipedia-reading probe uses
    from sftlab.remedies.replay import replay_texts
    from sftlab.probes.texts import general_passages

    d = cfg.to_dict()
    d["probes"][1] = {"name": "kl_to_base", "n": 5}
    cfg2 = config_from_dict({**d, "remedies": [{"name": "replay", "n": 3}]})
    texts, source = replay_texts(cfg2, cfg2.remedies[0].options)
    assert texts == general_passages(8)[5:] and source == "wikipedia leads 5..7"


def test_ema_is_its_own_trajectory_and_keeps_more(peaked_model_dir, tmp_path):
    from sftlab.rewinding import run_points

    cfg = _cfg(tmp_path, peaked_model_dir, "lora", [{"name": "ema", "decay": 0.8}], every=4)
    run = _train(cfg)
    ema = run / "ema"
    steps = [e["step"] for e in read_trajectory(ema) if e.get("scores")]
    assert steps == [0, 4, 8, 12] and (ema / "checkpoints" / "step-000012").is_dir()
    points, _, _ = run_points(ema)  # the average reads as a run of its own
    assert len(points) == 4
    (task_p, kl_p), (task_e, kl_e) = _final(run), _final(ema)
    task0, _ = _final(run, 0)
    print(f"lora+ema: KL {kl_p:.3e} -> {kl_e:.3e}, task {task_p:.3f} -> {task_e:.3f} (base {task0:.3f})")
    assert kl_e < kl_p and task_e < task0


def test_wise_interpolates_the_final_weights_towards_the_base(peaked_model_dir, tmp_path):
    run = _train(_cfg(tmp_path, peaked_model_dir, "lora", [{"name": "wise", "alphas": [0.5]}]))
    w = json.loads((run / "wise.json").read_text())
    by = {p["alpha"]: p["scores"] for p in w["points"]}
    assert set(by) == {0.5, 1.0} and w["step"] == 12
    kl = {a: s["kl_to_base"]["value"] for a, s in by.items()}
    task = {a: s["heldout_loss"]["value"] for a, s in by.items()}
    task0, _ = _final(run, 0)
    print(f"lora+wise: KL {kl[1.0]:.3e} -> {kl[0.5]:.3e} at alpha 0.5, task {task[1.0]:.3f} -> {task[0.5]:.3f}")
    assert kl[0.5] < kl[1.0] and task[0.5] < task0
    assert task[1.0] == pytest.approx(_final(run)[0], rel=1e-5)  # alpha 1 is the final checkpoint
