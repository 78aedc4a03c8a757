"""Gemma-3 as a base model: a tiny random Gemma3ForCausalLM built in code (2 layers, one sliding-window and one
full-attention layer, tied and scaled embeddings, q/k norms, four norms a layer) with a tokenizer that has no chat
template and adds a BOS, as Gemma-3-270M's does (sftlab.fetch).

Covered: the budget formulas against the built model (tiny and Gemma-3-270M's real shape, on the meta device);
every registered method applies and trains on chat data in the plain format (loss falls); the KL probe's
position blocks give the unblocked value; the plain format's labels and its agreement between training,
label scoring and generation prompts; resolving `gemma3-270m` before it is fetched. The real model's run is
the slow test at the end, which skips until `sftlab setup --model gemma3-270m` has run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR, write_jsonl
from sftlab.config import DataSection, config_from_dict
from sftlab.data.formats import Record
from sftlab.data.tokenize import IGNORE, PLAIN_CUE, render_plain, tokenize_record
from sftlab.methods import METHODS
from sftlab.methods.budget import count_trainable, measure_trainable, solve_budget

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# Gemma-3-270M's config.json (as converted from the GGUF), the fields that shape the parameters.
GEMMA3_270M = {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
               "tie_word_embeddings": True, "attention_bias": False, "sliding_window": 512,
               "max_position_embeddings": 32768, "query_pre_attn_scalar": 256}
GEMMA3_270M_TOTAL = 268_098_176  # the converted model's parameter count (embeddings tied)
HIDDEN = 64


def gemma_like_tokenizer():
    """SmolLM2's tokenizer made to behave like Gemma-3-270M's: no chat template, a BOS in front of every text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.chat_template = None
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def tiny_gemma_config(vocab: int, sliding_window: int = 8) -> dict:
    return {"model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": sliding_window,
            "query_pre_attn_scalar": 16, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "max_position_embeddings": 1024}


def build_tiny_gemma(folder: Path, seed: int = 0, embed_std: float = 0.01, logit_scale: float = 1.5,
                     config=None, norm_std: float = 0.0) -> Path:
    """A 2-layer Gemma-3 whose output a small adapter can steer (as test_methods.build_learnable_model: small tied
    embeddings, the final norm raised so random logits have std `logit_scale`; Gemma's norms scale by 1 + w, and
    its embeddings are multiplied by sqrt(hidden) on the way in). `config(vocab)` gives another layout;
    `norm_std` > 0 draws every norm weight at random first (Gemma's 1 + w convention exercised)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = gemma_like_tokenizer()
    cfg = dict((config or tiny_gemma_config)(len(tok)))
    cfg.pop("model_type", None)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(initializer_range=0.1, **cfg))
    with torch.no_grad():
        if norm_std:
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, norm_std)
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
        model.model.norm.weight.fill_(logit_scale / (math.sqrt(HIDDEN) * embed_std) - 1.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="module")
def tok():
    return gemma_like_tokenizer()


def desk_chats(n: int = 24) -> list[dict]:
    """The demo task's shape: an instruction, a text, a one-letter answer."""
    codes = "ABGHMPST"
    return [{"messages": [{"role": "user", "content": f"Which desk code does this go to?\n\nArticle number {i}."},
                          {"role": "assistant", "content": codes[i % len(codes)]}]} for i in range(n)]


# ---- the budget formulas follow Gemma-3's layout -------------------------------------------------------------

SETTINGS = [("full", {}), ("full", {"freeze": ["embed_tokens", "norm"]}), ("lora", {"r": 2}),
            ("lora", {"r": 3, "target_modules": ["q_proj", "down_proj"], "use_dora": True, "layers": [1]}),
            ("oft", {"block_size": 8}), ("boft", {"block_size": 8}), ("ia3", {}),
            ("prefix", {"num_virtual_tokens": 3}), ("prefix", {"num_virtual_tokens": 2, "projection": True,
                                                               "encoder_hidden_size": 16}),
            ("prompt", {"num_virtual_tokens": 5})]


@pytest.mark.parametrize("method,options", SETTINGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SETTINGS)])
def test_budget_counts_match_the_built_tiny_gemma(method, options):
    cfg = tiny_gemma_config(1000)
    assert count_trainable(cfg, method, options) == measure_trainable(cfg, method, options)


@pytest.mark.parametrize("method,options", [("full", {}), ("lora", {"r": 1}), ("oft", {"block_size": 4}),
                                            ("prefix", {"num_virtual_tokens": 5}), ("prompt", {"num_virtual_tokens": 7}),
                                            ("ia3", {})])
def test_budget_counts_match_gemma3_270m(method, options):
    assert count_trainable(GEMMA3_270M, method, options) == measure_trainable(GEMMA3_270M, method, options)


def test_gemma3_270m_full_count_and_a_50k_budget():
    assert count_trainable(GEMMA3_270M, "full") == GEMMA3_270M_TOTAL
    for method in ("lora", "oft", "prefix", "prompt"):
        sol = solve_budget(GEMMA3_270M, method, "50k")
        assert sol.within_tolerance, sol
        assert sol.trainable == measure_trainable(GEMMA3_270M, sol.method, sol.options)


# ---- the plain format: a base model without a chat template ----------------------------------------------------

def test_plain_format_labels_are_the_answer_and_eos(tok):
    msgs = desk_chats(1)[0]["messages"]
    ex = tokenize_record(tok, Record("chat", "x", messages=msgs), False, DataSection())
    text = tok.decode(ex.input_ids)
    assert text == f"{tok.bos_token}{msgs[0]['content']}\n{PLAIN_CUE} {msgs[1]['content']}{tok.eos_token}"
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(trained[:-1]) == " A" and len(trained) == 2 and trained[-1] == tok.eos_token_id
    # raw still refuses chat records (it renders prompt + completion only, verbatim)
    from sftlab.errors import ModelError

    with pytest.raises(ModelError, match="data.template=auto"):
        tokenize_record(tok, Record("chat", "x", messages=msgs), False, DataSection(template="raw"))


def test_plain_multi_turn_trains_every_answer(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "2"}]
    assert render_plain(msgs) == "Be brief.\n\nOne?\nAnswer: 1\n\nTwo?\nAnswer: 2"
    ex = tokenize_record(tok, Record("chat", "x", messages=msgs), False, DataSection())
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(trained) == f" 1 2{tok.eos_token}"
    last = tokenize_record(tok, Record("chat", "x", messages=msgs), False, DataSection(assistant_turns="last"))
    assert tok.decode([i for i, lab in zip(last.input_ids, last.labels) if lab != IGNORE]) == f" 2{tok.eos_token}"


def test_probes_render_what_training_trains(tok):
    """Label scoring scores the training text's answer tokens; generation continues the training text's prompt."""
    from sftlab.probes.likelihood import answer_examples
    from sftlab.probes.texts import render_prompt

    msgs = desk_chats(1)[0]["messages"]
    train = tokenize_record(tok, Record("chat", "x", messages=msgs), False, DataSection())
    (scored,) = answer_examples(tok, [msgs[:1]], [msgs[1]["content"]], "auto", 512, ["x"])
    assert scored.input_ids == train.input_ids and scored.labels == train.labels
    prompt = render_prompt(tok, msgs[:1], "auto")
    assert prompt.endswith(f"\n{PLAIN_CUE}")
    assert tok.decode(train.input_ids).startswith(tok.bos_token + prompt)


# ---- every method applies to Gemma-3 and trains ----------------------------------------------------------------

# The tiny model's start loss is ~ln(49k) + 1 = 11.9: a fall of a fifth in 30 steps shows the method trains.
OPTIONS = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 12}, "prompt": {"num_virtual_tokens": 16}}
LRS = {"full": 3e-3, "ia3": 1e-1, "prefix": 1e-1, "prompt": 3e-1}


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_trains_on_tiny_gemma(method, tmp_path, gemma_dir):
    from sftlab.train.loop import Trainer

    data = write_jsonl(tmp_path / "d.jsonl", desk_chats(24))
    cfg = config_from_dict({
        "run": {"name": method, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(gemma_dir)},
        "method": {"name": method, **OPTIONS.get(method, {})},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}], "max_length": 64},
        "train": {"steps": 30, "lr": LRS.get(method, 1e-2), "batch_size": 8, "schedule": "cosine", "threads": 1},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "tensorboard": False}})
    run_dir = Trainer(cfg).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and not r.get("eval")]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], f"{method}: {losses[0]:.3f} -> {losses[-5:]}"


def test_prefix_init_beyond_the_sliding_window(tmp_path):
    """Prefix tuning's text init takes every virtual token's keys and values, also on a sliding-window layer
    whose window is shorter than the prefix."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftlab.config import parse_method

    folder = tmp_path / "g"
    import transformers

    tok = gemma_like_tokenizer()
    cfg = dict(tiny_gemma_config(len(tok), sliding_window=4))
    cfg.pop("model_type")
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    method = parse_method({"name": "prefix", "num_virtual_tokens": 10})
    model = METHODS.get("prefix").apply(model, method.options)
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    assert weight.shape[0] == 10 and bool((weight.abs().sum(-1) > 0).all())


# ---- the KL probe's position blocks ----------------------------------------------------------------------------

def test_kl_blocks_equal_the_unblocked_value(gemma_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    from sftlab.probes.kl import base_topk, kl_from_topk, logit_chunk
    from sftlab.probes.likelihood import text_examples

    assert logit_chunk(49152) == 512 and logit_chunk(262144) == 128 and logit_chunk(10 ** 9) == 1
    base = AutoModelForCausalLM.from_pretrained(str(gemma_dir)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(gemma_dir)).eval()
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = ["The river flows to the sea past the old mill.", "Numbers: one two three four five six seven."]
    ex = text_examples(tok, texts, 32)
    pad = tok.pad_token_id
    ref = base_topk(base, ex, pad, 2, "cpu", k=8, tail=4, seed=1)
    ref3 = base_topk(base, ex, pad, 2, "cpu", k=8, tail=0, chunk=3)
    # the same numbers up to the float rounding of a matmul of another shape
    assert torch.equal(ref["ids"], ref3["ids"]) and torch.allclose(ref["logp"], ref3["logp"], atol=1e-5)
    assert torch.allclose(ref["rest"], ref3["rest"], rtol=1e-4, atol=1e-6)
    whole = kl_from_topk(model, ex, ref, pad, 2, "cpu")
    for chunk in (1, 5):
        parts = kl_from_topk(model, ex, ref, pad, 2, "cpu", chunk=chunk)
        assert [n for _, n in parts] == [n for _, n in whole]
        assert [s for s, _ in parts] == pytest.approx([s for s, _ in whole], rel=1e-4, abs=1e-7)
    assert all(s > 0 for s, _ in whole)


# ---- fetching -----------------------------------------------------------------------------------------------

def test_gemma_before_it_is_fetched_says_how(tmp_path, monkeypatch):
    from sftlab.errors import ModelError
    from sftlab.models import resolve_model

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=r"sftlab setup --model gemma3-270m.*Gemma Terms of Use"):
        resolve_model("gemma3-270m")


def test_setup_does_not_fetch_unless_asked():
    from sftlab.cli import build_parser

    args = build_parser().parse_args(["setup"])
    assert args.model is None
    assert build_parser().parse_args(["setup", "--model", "gemma3-270m"]).model == ["gemma3-270m"]


# ---- the real model (slow; only once fetched) ------------------------------------------------------------------

def fetched_gemma() -> str:
    from sftlab.fetch import FETCHABLE, converted_dir

    done = converted_dir(FETCHABLE["gemma3-270m"])
    if done is None:
        pytest.skip("Gemma-3-270M is fetched on demand and is not here: `sftlab setup --model gemma3-270m` "
                    "(or `make gemma`; ~245 MB, Gemma terms apply) enables this test")
    return str(done)


@pytest.mark.slow
def test_real_gemma_trains_and_scores(tmp_path):
    """LoRA on the demo task, 4 steps, a checkpoint at 2 and 4, scored by classify and kl_to_base."""
    fetched_gemma()
    from sftlab.assets import LABELS, ensure_demo_data
    from sftlab.train.loop import train

    data = ensure_demo_data()
    cfg = config_from_dict({
        "run": {"name": "gemma", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": "gemma3-270m"},
        "method": {"name": "lora", "r": 1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [{"path": str(data.train)}], "max_length": 192},
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "precision": "bf16"},
        "checkpoint": {"every": 2}, "scoring": {"batch_size": 8},
        "logging": {"progress": False, "tensorboard": False},
        "probes": [{"name": "classify", "path": str(data.eval), "limit": 8, "labels": LABELS},
                   {"name": "kl_to_base", "n": 2, "max_length": 32}]})
    run_dir = train(cfg)
    lines = [json.loads(x) for x in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    scored = [e for e in lines if "classify" in e.get("scores", {})]
    assert [e["step"] for e in scored] == [0, 2, 4]
    assert scored[0]["scores"]["kl_to_base"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= e["scores"]["classify"]["value"] <= 1 for e in scored)
