"""DPO: the loss variants against TRL's DPOTrainer on identical log-probs, the log-probs against a full-logits
computation, accumulation per pair, and the cached reference against the live one."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sftlab.objectives import PREFERENCE_LOSSES, dpo_loss, forward_hidden, sequence_logps

# ---------------------------------------------------------------------------------------------- TRL reference


def _trl_loss(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_c, ref_r, loss_type: str, beta: float,
              label_smoothing: float):
    """TRL's DPOTrainer._compute_loss (test-only reference) on given per-token log-probs: a stub model returns
    them as TRL's fused head would, and precomputed reference log-probs come in the batch."""
    from trl.trainer.dpo_trainer import DPOTrainer

    two_b, L = completion_mask.shape

    class StubModel:
        training = True

        def __call__(self, **kw):
            z = torch.zeros(two_b, L - 1)
            return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    ident = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    stub = SimpleNamespace(model=StubModel(), accelerator=ident, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, args=None)
    inputs = {"input_ids": torch.zeros(two_b, L, dtype=torch.long), "attention_mask": torch.ones(two_b, L),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def _random_pairs(P: int = 6, L: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, L, dtype=torch.long)
    for i in range(2 * P):  # prompt of 2..4 tokens, answers of different lengths
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, L + 1, (1,), generator=g))
        mask[i, start:end] = 1
    shifted = mask[:, 1:]
    per_token = -torch.rand(2 * P, L - 1, generator=g) * 3 * shifted  # 0 off the answers, as TRL's head gives
    ref = -torch.rand(2 * P, generator=g) * 3 * shifted.sum(1)
    return per_token, mask, ref[:P], ref[P:]


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                                ("ipo", 1.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0),
                                                ("robust", 0.1, 0.1), ("robust", 0.3, 0.3)])
def test_loss_matches_trl(loss_type, beta, eps):
    per_token, mask, ref_c, ref_r = _random_pairs(seed=int(beta * 10) + len(loss_type))
    P = ref_c.numel()
    want, trl_metrics = _trl_loss(per_token, mask, ref_c, ref_r, loss_type, beta, eps)
    logps = per_token.sum(1)
    n = mask.sum(1)
    got, m = dpo_loss(logps[:P], logps[P:], ref_c, ref_r, n[:P], n[P:], beta, loss_type, eps)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (float(got), float(want))
    assert m["correct"] / P == pytest.approx(trl_metrics["rewards/accuracies"])
    assert m["margin_sum"] / P == pytest.approx(trl_metrics["rewards/margins"], rel=1e-5, abs=1e-7)
    assert m["logps_chosen_sum"] / P == pytest.approx(trl_metrics["logps/chosen"], rel=1e-6)
    assert m["logps_rejected_sum"] / P == pytest.approx(trl_metrics["logps/rejected"], rel=1e-6)
    assert m["rewards_chosen_sum"] / P == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-5, abs=1e-7)


def test_every_variant_is_tested_against_trl_or_by_its_optimum():
    assert set(PREFERENCE_LOSSES.names()) == {"sigmoid", "ipo", "hinge", "robust"}


def test_conservative_dpo_optimum_is_one_minus_eps():
    """cDPO (sigmoid with label smoothing; TRL 1.16 no longer has it) trains the preference probability
    towards 1 - eps: its gradient vanishes exactly there, and eps = 0 is plain DPO."""
    eps, beta = 0.2, 0.5
    z = torch.logit(torch.tensor(1 - eps, dtype=torch.float64))  # beta * delta at the optimum
    delta = (z / beta).clone().requires_grad_(True)
    zero = torch.zeros((), dtype=torch.float64)
    loss, _ = dpo_loss(delta.reshape(1), zero.reshape(1), zero.reshape(1), zero.reshape(1), torch.ones(1),
                       torch.ones(1), beta, "sigmoid", eps)
    loss.backward()
    assert abs(float(delta.grad)) < 1e-12
    per_token, mask, ref_c, ref_r = _random_pairs(seed=3)
    lp, n, P = per_token.sum(1), mask.sum(1), ref_c.numel()
    a, _ = dpo_loss(lp[:P], lp[P:], ref_c, ref_r, n[:P], n[P:], 0.1, "sigmoid", 0.0)
    b, _ = _trl_loss(per_token, mask, ref_c, ref_r, "sigmoid", 0.1, 0.0)
    assert torch.allclose(a, b)


def test_accumulation_is_per_pair():
    """Two micro-batches normalised by the step's pair count give the gradient of one batch of all pairs."""
    per_token, mask, ref_c, ref_r = _random_pairs(P=6, seed=5)
    lp = per_token.sum(1).clone().requires_grad_(True)
    n = mask.sum(1)
    P = 6
    one, _ = dpo_loss(lp[:P], lp[P:], ref_c, ref_r, n[:P], n[P:])
    g_one = torch.autograd.grad(one, lp)[0]
    halves = sum(dpo_loss(lp[s:s + 3], lp[P + s:P + s + 3], ref_c[s:s + 3], ref_r[s:s + 3], n[s:s + 3],
                          n[P + s:P + s + 3], normaliser=P)[0] for s in (0, 3))
    g_two = torch.autograd.grad(halves, lp)[0]
    assert torch.allclose(one, halves) and torch.allclose(g_one, g_two)


# ---------------------------------------------------------------------------------------------- log-probs


def _pairs(tokenizer, n: int = 6):
    from sftlab.data.preferences import Preference
    from sftlab.train.dpo import tokenize_pairs

    prefs = [Preference("text", f"t:{i}", f"Question {i}: what colour is the sky?",
                        " blue" + " and clear" * (i % 3), " green" + " or red" * (i % 2)) for i in range(n)]
    d = SimpleNamespace(template="raw", train_on_prompt=False, assistant_turns="all", max_length=64,
                        overlong="drop")
    pairs, stats = tokenize_pairs(prefs, tokenizer, d)
    assert stats.examples == n and not stats.dropped
    return pairs


def test_sequence_logps_equal_full_logits(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from sftlab.train.dpo import pair_batch

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    batch = pair_batch(_pairs(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden, head = forward_hidden(model, batch)
        got, counts = sequence_logps(hidden, batch["targets"], head, chunk=7)  # chunks split rows
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = batch["targets"]
    tok = torch.log_softmax(logits.float(), -1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = (tok * (t != -100)).sum(-1)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(counts, (t != -100).sum(-1)) and int(counts.min()) > 0


def test_cached_reference_equals_live_reference(tiny_model_dir, tokenizer):
    """The cached table (starting model scored before the adapter exists) equals the live reference (adapter
    switched off) of a LoRA whose update is far from zero, and the policy differs from both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftlab.train.dpo import compute_reference, live_reference, pair_batch, pair_logps

    pairs = _pairs(tokenizer, 8)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    table = compute_reference(model, pairs, tokenizer.pad_token_id, 3, torch.device("cpu"), "fp32")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()
    batch = pair_batch(pairs, tokenizer.pad_token_id)
    live_c, live_r = live_reference(peft_model, batch)
    assert peft_model.training  # restored
    assert torch.allclose(table[:, 0], live_c, atol=1e-4) and torch.allclose(table[:, 1], live_r, atol=1e-4)
    with torch.no_grad():
        pol_c, _, _, _ = pair_logps(peft_model, batch)
    assert (pol_c - live_c).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("extra,needle", [
    ({"objective": {"name": "dpo"}, "data": {"packing": True}}, "data.packing"),
    ({"objective": {"name": "dpo", "reference": "disable_adapter"}, "method": {"name": "full"}}, "disable_adapter"),
    ({"objective": {"name": "dpo", "loss": "ipo", "label_smoothing": 0.1}}, "label_smoothing"),
    ({"objective": {"name": "dpo", "loss": "robust", "label_smoothing": 0.5}}, "[0, 0.5)"),
    ({"objective": {"name": "dpo", "loss": "kto"}}, "objective.loss"),
])
def test_dpo_config_errors_say_what_to_do(extra, needle):
    from sftlab.config import config_from_dict
    from sftlab.configtools import ConfigError

    d = {"data": {"train": [{"path": "pairs.jsonl"}], **extra.pop("data", {})}, **extra}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert needle in str(e.value)


def test_pipeline_stage_must_start_from_an_earlier_stage(tmp_path):
    import yaml

    from sftlab.configtools import ConfigError
    from sftlab.pipeline import read_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "dpo", "from": "sft", "config": {}},
                                               {"name": "sft", "config": {}}]}))
    with pytest.raises(ConfigError, match="earlier stage"):
        read_pipeline(path)
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "config": {}}], "stage": []}))
    with pytest.raises(ConfigError, match="unknown key"):
        read_pipeline(path)
