"""The GPU fast-path options, checked on CPU: bucketed batch lengths, compiled decoder layers (same
losses as eager, few graphs), fused AdamW (same update; a clear fallback where torch has no kernel),
FlexAttention document masks (same logits as padded sdpa; refused for training on CPU)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sftlab.data.collate import BatchPlan, bucket_length
from sftlab.data.tokenize import IGNORE, Example
from sftlab.errors import SftlabError
from sftlab.objectives import forward_hidden, sft_loss
from sftlab.train import speed
from sftlab.train.loop import Trainer

from conftest import memorisable_chats, tiny_config, write_jsonl

VOCAB = 128


def make_examples(lengths, seed=1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 3) + ids[n // 3:], f"ex:{i}"))
    return out


def tiny_llama(attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def test_bucket_length():
    assert [bucket_length(n, 16, 40) for n in (1, 16, 17, 33, 40, 41)] == [16, 16, 32, 40, 40, 41]
    assert bucket_length(13, 0, 40) == 13  # off


@pytest.mark.parametrize("packing", [True, False])
def test_bucketed_batches_have_few_lengths_and_the_same_loss(packing):
    """Padding up to a bucket changes the batch length, never the tokens, targets or loss."""
    lengths = [5, 9, 13, 3, 7, 11, 6, 4, 12, 8, 10, 2]
    ex = make_examples(lengths)
    model = tiny_llama()
    plain = BatchPlan(ex, batch_size=2, packing=packing, max_length=24, seed=0)
    bucketed = BatchPlan(ex, batch_size=2, packing=packing, max_length=24, seed=0, pad_to_multiple=8)
    seen = set()
    for rows in plain.epoch(0):
        a, b = plain.collate(rows, 0), bucketed.collate(rows, 0)
        L = a["input_ids"].shape[1]
        seen.add(b["input_ids"].shape[1])
        assert b["input_ids"].shape[1] == bucket_length(L, 8, 24) >= L
        assert a["n_tokens"] == b["n_tokens"]
        assert torch.equal(a["targets"], b["targets"][:, :L]) and (b["targets"][:, L:] == IGNORE).all()
        with torch.no_grad():
            ha, head = forward_hidden(model, a)
            hb, _ = forward_hidden(model, b)
            la, lb = sft_loss(ha, a["targets"], head)[0], sft_loss(hb, b["targets"], head)[0]
        assert torch.allclose(la, lb, atol=1e-5), (la, lb)
    assert seen <= {8, 16, 24}


def test_fused_adamw_same_update_and_cpu_fallback(monkeypatch):
    torch.manual_seed(0)
    w0, grads = torch.randn(8, 8), [torch.randn(8, 8) for _ in range(3)]

    def run(fused):
        p = torch.nn.Parameter(w0.clone())
        opt = speed.adamw([{"params": [p], "weight_decay": 0.01}], 1e-2, [0.9, 0.999], fused, p.device)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    ok, why = speed.fused_supported(torch.device("cpu"), [torch.zeros(1)])
    ref, opt = run(False)
    assert not opt.defaults.get("fused")
    if ok:  # torch >= 2.4 has fused CPU kernels
        got, opt = run(True)
        assert opt.defaults.get("fused") is True
        assert torch.allclose(got, ref, atol=1e-6)
    # A torch whose fused kernels are CUDA-only: a warning that names the option, then the foreach AdamW.
    import torch.utils._foreach_utils as fu

    monkeypatch.setattr(fu, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    with pytest.warns(UserWarning, match="train.fused_optimizer: .*not \\['cpu'\\]"):
        got, opt = run(True)
    assert not opt.defaults.get("fused")
    assert torch.allclose(got, ref)


def _trainer(tmp_path, tiny_model_dir, name, **train):
    data = write_jsonl(tmp_path / f"{name}.jsonl", memorisable_chats(24))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, method={"name": "full"}, run={"name": name},
                      data={"packing": True, "pad_to_multiple": 32, "max_length": 64},
                      train={"steps": 4, "batch_size": 2, "lr": 1e-3, **train})
    return cfg


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in lines if "loss" in r and not r.get("eval")]


def test_flex_attention_refused_for_training_on_cpu(tmp_path, tiny_model_dir):
    cfg = _trainer(tmp_path, tiny_model_dir, "flex", steps=1)
    cfg.model.attn_implementation = "flex_attention"
    with pytest.raises(SftlabError, match="flex_attention: torch .* no FlexAttention backward on cpu"):
        Trainer(cfg).run()


@pytest.mark.slow
def test_compiled_layers_match_eager(tmp_path, tiny_model_dir):
    """train.compile: the same per-step losses as eager (fp32, tolerance for kernel reordering), with
    the fused optimizer on, state_dict keys unchanged, and few graphs thanks to the buckets.
    Slow: inductor compiles the layer's forward and backward for CPU (about 90 s on one core)."""
    import torch._dynamo

    eager = Trainer(_trainer(tmp_path, tiny_model_dir, "eager")).run()
    torch._dynamo.reset()
    t0 = time.perf_counter()
    tr = Trainer(_trainer(tmp_path, tiny_model_dir, "compiled", compile=True, fused_optimizer=True))
    compiled = tr.run()
    took = time.perf_counter() - t0
    stats = speed.compile_stats()
    a, b = _losses(eager), _losses(compiled)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert a[0] != a[-1]  # it trained
    layers = speed.decoder_layers(tr.model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert not any("_orig_mod" in k for k in tr.model.state_dict())
    assert 1 <= stats["unique_graphs"] <= 6, stats  # train graph per bucket length (+ eval), not one per step
    print(f"compiled run: {took:.1f}s, {stats}")


@pytest.mark.slow
def test_flex_attention_packed_matches_padded_sdpa():
    """Packed rows + FlexAttention (the BlockMask transformers builds from restarting position ids) give
    each example the logits it gets alone in a padded sdpa batch. Forward only: CPU has no flex backward.
    Slow: FlexAttention compiles its CPU kernels (about a minute on one core)."""
    lengths = [5, 9, 7]
    ex = make_examples(lengths)
    padded = BatchPlan(ex, batch_size=3, packing=False, max_length=32, seed=0)
    packed = BatchPlan(ex, batch_size=1, packing=True, max_length=32, seed=0, pad_to_multiple=8)
    ref_model, flex_model = tiny_llama("sdpa"), tiny_llama("flex_attention")
    (prow,) = packed.epoch(0)
    pb = packed.collate(prow, 0)
    assert pb["input_ids"].shape == (1, 24)  # 21 tokens + a pad tail of 3
    with torch.no_grad():
        out = flex_model(input_ids=pb["input_ids"], position_ids=pb["position_ids"], use_cache=False).logits
        for order in range(len(lengths)):
            i = prow[0][order]
            start = sum(len(ex[j].input_ids) for j in prow[0][:order])
            n = len(ex[i].input_ids)
            alone = ref_model(input_ids=torch.tensor([ex[i].input_ids]), use_cache=False).logits
            assert torch.allclose(out[0, start:start + n], alone[0], atol=1e-4)


def test_flex_attention_refused_under_autocast():
    with pytest.raises(SftlabError, match="does not run under bf16 autocast"):
        speed.check_attention("flex_attention", torch.device("cuda"), "bf16")
    speed.check_attention("flex_attention", torch.device("cuda"), "fp32")  # pure bf16 / fp32 on a GPU: fine
    speed.check_attention("sdpa", torch.device("cpu"), "bf16")
