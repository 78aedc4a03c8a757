"""Functional tokens (model.new_tokens): rows that must not train stay bitwise, step 0 keeps KL 0 to the base,
the new rows survive save, reload (sftlab and plain PEFT) and merged export, on tied and untied models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, tiny_config, write_jsonl

TOKENS = [{"text": "<tool_call>", "init": "description_noise", "description": "call a tool"},
          {"text": "</tool_call>", "init": "mean"}]
CALL = "<tool_call>{\"name\": \"calc\"}</tool_call>"
# every adapter method but plain LoRA (tested on its own below), as each is configured on the tiny model
METHODS = {"dora": {"name": "lora", "r": 4, "use_dora": True}, "oft": {"name": "oft", "block_size": 16},
           "boft": {"name": "boft", "block_size": 8}, "ia3": {"name": "ia3"},
           "prefix": {"name": "prefix", "num_virtual_tokens": 4}, "prompt": {"name": "prompt", "num_virtual_tokens": 4}}
ADAPTERS = ["lora", "oft", "boft", "ia3", "prefix", "prompt"]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-tied" if request.param else "tiny-untied"),
                            tie=request.param)


def _data(tmp_path):
    rows = [{"prompt": f"question {i}: use the tool", "completion": CALL} for i in range(8)]
    rows += [{"prompt": f"question {i}: say hi", "completion": "hi"} for i in range(8)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _train(tmp_path, model_dir, method=None, model_extra=None, **sections):
    from sftlab.train.loop import train

    cfg = tiny_config(tmp_path, model_dir, _data(tmp_path), method=method,
                      model={"new_tokens": TOKENS, **(model_extra or {})}, **sections)
    return train(cfg)


def _base_weights(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return (m.get_input_embeddings().weight.detach().clone(),
            m.get_output_embeddings().weight.detach().clone(), m)


def _logits(model, tok, text):
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits[0]  # (L, V)


def test_tokenizer_and_init(model_dir):
    from sftlab.config import config_from_dict
    from sftlab.models import ModelRef, load_model, load_tokenizer
    from sftlab.tokens import add_tokens, init_new_rows

    cfg = config_from_dict({"model": {"path": str(model_dir), "new_tokens": TOKENS}})
    ref = ModelRef(str(model_dir), str(model_dir), "", "local")
    tok = load_tokenizer(ref)
    n0 = len(tok)
    ids = add_tokens(tok, cfg.model.new_tokens)
    assert ids == [n0, n0 + 1]
    assert tok(f"x{CALL}y", add_special_tokens=False)["input_ids"].count(n0) == 1  # never split
    assert "<tool_call>" in tok.decode(tok(CALL)["input_ids"], skip_special_tokens=True)  # not special: kept
    model = load_model(ref)
    e0 = model.get_input_embeddings().weight.detach().clone()
    plan = init_new_rows(model, tok, cfg.model, seed=0)
    e = model.get_input_embeddings().weight
    assert plan.rows % 64 == 0 and e.shape[0] == plan.rows and plan.rows >= n0 + 2
    assert torch.equal(e[:n0], e0)  # old rows untouched
    assert torch.allclose(e[n0 + 1], e0.mean(0))  # mean init
    desc = [i for i in tok("call a tool", add_special_tokens=False)["input_ids"]]
    diff = e[n0] - e0[desc].mean(0)  # description + small noise
    assert 0 < diff.abs().max() < 0.05 * e0.std()
    assert torch.count_nonzero(e[n0 + 2:]) == 0  # padding rows
    again = load_model(ref)
    init_new_rows(again, tok, cfg.model, seed=0)
    assert torch.equal(again.get_input_embeddings().weight, e)  # deterministic: a reload rebuilds it


def test_lora_trains_only_new_rows_and_roundtrips(tmp_path, model_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import Run, export

    run_dir = _train(tmp_path, model_dir, method={"name": "lora", "r": 4},
                     train={"steps": 6, "lr": 1e-2, "weight_decay": 0.1})
    run = Run(run_dir)
    emb0, head0, _ = _base_weights(model_dir)
    n0 = emb0.shape[0]
    ckpt = run_dir / run.checkpoints()[-1]["path"]
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rows = {k: s for k, s in shapes.items() if "trainable_tokens" in k}
    assert rows and all(s == (2, emb0.shape[1]) for s in rows.values())  # the new rows only
    assert not any(s[0] >= n0 for s in shapes.values())  # never a whole matrix
    assert len(rows) == (1 if model_dir.name.startswith("tiny-tied") else 2)

    model, tok = run.load()
    assert len(tok) == n0 + 2
    merged, _ = run.load(merge=True)
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert torch.equal(emb[:n0], emb0) and torch.equal(head[:n0], head0)  # bitwise, with weight decay on
    start = run.load_initial().get_input_embeddings().weight
    assert not torch.equal(emb[n0:n0 + 2], start[n0:n0 + 2])  # the new rows trained

    text = f"question 3: use the tool {CALL}"
    ref_logits = _logits(model, tok, text)
    out = tmp_path / "merged"
    export(str(run_dir), None, str(out), merge=True)
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    plain_tok = AutoTokenizer.from_pretrained(str(out))
    assert plain_tok.convert_tokens_to_ids("<tool_call>") == n0
    assert torch.allclose(_logits(plain, plain_tok, text), ref_logits, atol=1e-5)

    adapter = tmp_path / "adapter"
    export(str(run_dir), None, str(adapter), merge=False)
    atok = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base.resize_token_embeddings(len(atok), pad_to_multiple_of=64)  # plain transformers: new rows random
    peft_model = PeftModel.from_pretrained(base, str(adapter))  # ... and the adapter's rows replace them
    got = _logits(peft_model, atok, text)
    assert torch.allclose(got[:, :len(atok)], ref_logits[:, :len(atok)], atol=1e-5)


def test_generates_new_tokens_after_plain_reload(tmp_path, model_dir):
    """Trained hard on one call, base + adapter + tokenizer (plain PEFT) generate the new tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import export

    run_dir = _train(tmp_path, model_dir, method={"name": "lora", "r": 8, "alpha": 16},
                     train={"steps": 40, "lr": 3e-2, "batch_size": 8}, data={"template": "raw"})
    out = tmp_path / "adapter"
    export(str(run_dir), None, str(out), merge=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = tok("question 5: use the tool", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:])
    assert text.startswith("<tool_call>"), text  # the first new token, generated
    # and the closing one where it belongs (teacher-forced: a 2-layer model's free-running text wanders)
    prefix = tok("question 5: use the tool" + CALL.removesuffix("</tool_call>"), return_tensors="pt",
                 add_special_tokens=False)
    with torch.no_grad():
        nxt = int(model(**prefix).logits[0, -1].argmax())
    assert nxt == tok.convert_tokens_to_ids("</tool_call>")


@pytest.mark.parametrize("rows", ["new", "all"])
def test_full_new_rows_option(tmp_path, model_dir, rows):
    from sftlab.runs import Run

    run_dir = _train(tmp_path, model_dir, method={"name": "full"}, model_extra={"new_token_rows": rows},
                     train={"steps": 3, "lr": 1e-3, "weight_decay": 0.1})
    emb0, head0, base = _base_weights(model_dir)
    n0 = emb0.shape[0]
    model, _ = Run(run_dir).load()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] % 64 == 0
    frozen = torch.equal(emb[:n0], emb0) and torch.equal(head[:n0], head0)
    assert frozen == (rows == "new")  # 'new': old rows bitwise; 'all': they train as usual
    start = Run(run_dir).load_initial()
    assert not torch.equal(emb[n0:n0 + 2], start.get_input_embeddings().weight[n0:n0 + 2])
    q0 = dict(base.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"], q0)


def test_input_only_token_keeps_its_output_row(tmp_path):
    """Untied model, a token only in inputs: its output row stays at the init (LoRA, OFT and full 'new')."""
    from sftlab.runs import Run
    from sftlab.train.loop import train

    model_dir = build_tiny_model(tmp_path / "untied", tie=False)
    toks = [{"text": "<tool_call>"}, {"text": "</tool_call>"}, {"text": "<image>", "output": False}]
    rows = [{"prompt": f"<image> question {i}", "completion": CALL} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for method, extra in (({"name": "lora", "r": 4}, {}), (METHODS["oft"], {}),
                          ({"name": "full"}, {"new_token_rows": "new"})):
        cfg = tiny_config(tmp_path / method["name"], model_dir, data, method=method,
                          model={"new_tokens": toks, **extra}, train={"steps": 3, "lr": 1e-2, "weight_decay": 0.1})
        run = Run(train(cfg))
        model, tok = run.load(merge=True) if run.method.peft else run.load()
        i = tok.convert_tokens_to_ids("<image>")
        start = run.load_initial()
        head, head0 = model.get_output_embeddings().weight, start.get_output_embeddings().weight
        emb, emb0 = model.get_input_embeddings().weight, start.get_input_embeddings().weight
        assert torch.equal(head[i], head0[i]), method  # output row frozen
        assert not torch.equal(emb[i], emb0[i]), method  # input row trained
        j = tok.convert_tokens_to_ids("<tool_call>")
        assert not torch.equal(head[j], head0[j]), method


@pytest.mark.parametrize("method", ["lora", "dora", "oft", "boft", "ia3"])  # those that start at the base
def test_kl_zero_at_step_zero(tmp_path, model_dir, method, monkeypatch):
    """On text without the new tokens the step-0 model has KL exactly 0 to the base (kl over the base vocab)."""
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))  # step-0 scores are shared per base: score them
    text = tmp_path / "general.txt"
    text.write_text("The river runs to the sea.\n\nA small town sits on the hill above the old bridge.\n")
    from sftlab.config import config_from_dict
    from sftlab.train.loop import train

    d = tiny_config(tmp_path, model_dir, _data(tmp_path), model={"new_tokens": TOKENS},
                    method=METHODS.get(method, {"name": "lora", "r": 4}), train={"steps": 4, "lr": 3e-2}).to_dict()
    d["probes"] = [{"name": "kl_to_base", "path": str(text), "k": 8, "tail_samples": 4}]
    d["scoring"] = {"during_training": True}
    run_dir = train(config_from_dict(d))
    lines = [json.loads(x) for x in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    kl = {x["step"]: x["scores"]["kl_to_base"] for x in lines if "kl_to_base" in x.get("scores", {})}
    assert kl[0]["value"] == 0.0
    assert 0 < kl[0]["extra"]["new_token_mass"] < 0.1  # the mass the new and padding rows take, reported
    assert kl[0]["extra"]["kl_full_vocab"] > 0
    assert kl[4]["value"] > 0  # it does move when the model trains


def test_config_checks(tmp_path):
    from sftlab.config import config_from_dict
    from sftlab.configtools import ConfigError

    ok = {"model": {"new_tokens": [{"text": "<a>"}]}}
    config_from_dict(ok)
    for name in ADAPTERS:  # every adapter method takes new tokens ...
        config_from_dict({**ok, "method": {"name": name}})
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict({"model": {"new_tokens": [{"text": "<a>"}, {"text": "<a>"}]}})
    with pytest.raises(ConfigError, match="needs a description"):
        config_from_dict({"model": {"new_tokens": [{"text": "<a>", "init": "description"}]}})
    with pytest.raises(ConfigError, match="full fine-tuning"):
        config_from_dict({"model": {"new_tokens": [{"text": "<a>"}], "new_token_rows": "new"}})


def test_config_refuses_a_method_without_token_rows(monkeypatch):
    """... and a method registered without saying it can train embedding rows is refused at config time."""
    import dataclasses

    from sftlab.config import config_from_dict
    from sftlab.configtools import ConfigError
    from sftlab.methods import METHODS as REGISTRY

    monkeypatch.setitem(REGISTRY._items, "norows", dataclasses.replace(REGISTRY.get("oft"), name="norows",
                                                                       token_rows=False))
    with pytest.raises(ConfigError, match="method 'norows'"):
        config_from_dict({"model": {"new_tokens": [{"text": "<a>"}]}, "method": {"name": "norows"}})


def test_existing_token_refused(tmp_path, model_dir):
    from sftlab.errors import ModelError
    from sftlab.train.loop import Trainer

    cfg = tiny_config(tmp_path, model_dir, _data(tmp_path), model={"new_tokens": [{"text": "<|im_end|>"}]})
    with pytest.raises(ModelError, match="already a token"):
        Trainer(cfg).setup()


def test_tool_call_judge():
    from sftlab.probes.toolcall import ToolCallOptions, judge, parse_call

    o = ToolCallOptions(path="x.jsonl")
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>'
    assert parse_call(good, o.open_tag, o.close_tag)["name"] == "calculator"
    for bad in ('<tool_call>{"name": "calculator"}</tool_call>',  # no arguments
                '<tool_call>{"name": "calculator", "arguments": {}</tool_call>',  # not JSON
                good + good, "2 + 3 = 5", '<tool_call>{"name": "x", "arguments": {}}'):
        assert parse_call(bad, o.open_tag, o.close_tag) is None, bad
    refs = [good, good.replace("2 + 3", "4 * 5"), good.replace("calculator", "get_time"), "Paris.", "Blue."]
    outs = [good, good, good.replace("calculator", "nope"), "<tool_call>{}</tool_call>", "Blue."]
    r = judge(outs, refs, o)
    assert r["well_formed"] == [1.0, 1.0, 0.0]  # 'nope' is no known tool
    assert r["right_tool"] == [1.0, 1.0, 0.0] and r["exact_call"] == [1.0, 0.0, 0.0]
    assert r["any_call"] == [1.0, 1.0, 1.0] and r["false_calls"] == [1.0, 0.0]


def test_tool_call_probe_on_a_model(tmp_path, model_dir):
    """The probe generates with the run's tokenizer and keeps the (added) tags it generates."""
    from sftlab.probes import ProbeContext, build_probe
    from sftlab.runs import Run

    run_dir = _train(tmp_path, model_dir, method={"name": "lora", "r": 8, "alpha": 16},
                     train={"steps": 40, "lr": 3e-2, "batch_size": 8}, data={"template": "raw"})
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "question 9: use the tool", "completion": CALL},
                                             {"prompt": "question 9: say hi", "completion": "hi"}])
    probe = build_probe("tool_calls", {"path": str(ev), "template": "raw", "max_new_tokens": 12})
    model, tok = Run(run_dir).load()
    s = probe.score(model, tok, ProbeContext(n_boot=50))
    out = s.extra["samples"][0]["output"]
    assert out.startswith("<tool_call>"), out  # decoded with the tag kept
    assert s.extra["rates"]["any_call"]["value"] == 1.0 and s.n == 1


def test_interpolation_export_and_analysis_carry_new_rows(tmp_path, model_dir):
    """Rewinding moves the new rows along the path too (alpha 0: their init, 1: trained); analyze runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.analysis.run import AnalyzeOptions, analyze_run
    from sftlab.interpolate import export_at, model_at
    from sftlab.runs import Run

    run_dir = _train(tmp_path, model_dir, method={"name": "lora", "r": 4}, train={"steps": 3, "lr": 1e-2})
    run = Run(run_dir)
    n0 = _base_weights(model_dir)[0].shape[0]
    start = run.load_initial().get_input_embeddings().weight[n0:n0 + 2].clone()
    trained = run.load(merge=True)[0].get_input_embeddings().weight[n0:n0 + 2].clone()
    at0 = model_at(run, None, 0.0)[0].get_input_embeddings().weight[n0:n0 + 2]
    assert torch.equal(at0, start)
    half, tok = model_at(run, None, 0.5)
    assert torch.allclose(half.get_input_embeddings().weight[n0:n0 + 2], (start + trained) / 2, atol=1e-6)
    assert len(tok) == n0 + 2
    out = export_at(run, None, 0.5, tmp_path / "half")
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("</tool_call>") == n0 + 1
    assert torch.allclose(plain.get_input_embeddings().weight[n0:n0 + 2], (start + trained) / 2, atol=1e-6)
    summary = analyze_run(run_dir, AnalyzeOptions(n_texts=2, progress=False))
    assert summary


def test_special_flag():
    """special: true -> dropped by decode(skip_special_tokens=True), also after save/reload; never split."""
    from transformers import AutoTokenizer

    from conftest import TOKENIZER_DIR
    from sftlab.config import config_from_dict
    from sftlab.tokens import add_tokens

    cfg = config_from_dict({"model": {"new_tokens": [{"text": "<think>", "special": True}, {"text": "<x>"}]}})
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    a, b = add_tokens(tok, cfg.model.new_tokens)
    ids = tok("p<think>q<x>r", add_special_tokens=False)["input_ids"]
    assert a in ids and b in ids
    assert tok.decode(ids, skip_special_tokens=True) == "pq<x>r"
    assert tok.decode(ids) == "p<think>q<x>r"


# ---- every other adapter method: the rows live in ADAPTER/tokens, a PEFT TrainableTokens adapter ----------------

def _plain_reload(adapter, model_dir):
    """The README's reload recipe, plain transformers + PEFT: resize, merge ADAPTER/tokens (when there), adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)  # new rows random here ...
    if (adapter / "tokens").is_dir():  # ... the trained ones replace them (LoRA/DoRA: inside the adapter)
        base = PeftModel.from_pretrained(base, str(adapter / "tokens")).merge_and_unload()
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tok


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_only_new_rows_and_roundtrips(tmp_path, model_dir, method):
    """Old rows bitwise (weight decay on); the new rows only are saved; sftlab's load, the plain PEFT recipe and
    the merged export give the same logits and generate the new tokens (prefix/prompt: merge is refused)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.errors import SftlabError
    from sftlab.runs import Run, export

    spec = METHODS[method]
    run_dir = _train(tmp_path, model_dir, method=spec, data={"template": "raw"},
                     train={"steps": 30, "lr": 3e-2, "batch_size": 8, "weight_decay": 0.1})
    run = Run(run_dir)
    emb0, head0, _ = _base_weights(model_dir)
    n0, hidden = emb0.shape
    tied = model_dir.name.startswith("tiny-tied")

    # saved: the new rows only, never a whole matrix; LoRA variants inside the adapter, the others beside it
    ckpt = run_dir / run.checkpoints()[-1]["path"]
    files = {f: ckpt / f for f in ("adapter_model.safetensors", "tokens/adapter_model.safetensors")}
    shapes = {}
    for f, path in files.items():
        if path.is_file():
            with safe_open(str(path), framework="pt") as st:
                shapes.update({f"{f}:{k}": tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    rows = {k: v for k, v in shapes.items() if "trainable_tokens" in k}
    assert rows and all(v == (2, hidden) for v in rows.values()), shapes
    assert not any(v[0] >= n0 for v in shapes.values())
    assert all(k.startswith("tokens/") for k in rows) == (spec["name"] != "lora")
    if spec["name"] != "lora":
        cfg = json.loads((ckpt / "tokens" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == [n0, n0 + 1]

    # untouched rows stay bitwise, the new ones trained (LoRA's rows show once merged; the others' already are)
    can_merge = run.method.merge is not None
    weights = run.load(merge=can_merge)[0] if can_merge else run.load()[0].get_base_model()
    emb, head = weights.get_input_embeddings().weight, weights.get_output_embeddings().weight
    assert torch.equal(emb[:n0], emb0) and torch.equal(head[:n0], head0)
    start = run.load_initial()
    assert not torch.equal(emb[n0:n0 + 2], start.get_input_embeddings().weight[n0:n0 + 2])
    assert tied == (head is emb)

    text = f"question 3: use the tool {CALL}"
    model, tok = run.load()
    ref = _logits(model, tok, text)
    adapter = tmp_path / "adapter"
    export(str(run_dir), None, str(adapter), merge=False)
    plain, ptok = _plain_reload(adapter, model_dir)
    assert torch.allclose(_logits(plain, ptok, text)[:, :len(ptok)], ref[:, :len(ptok)], atol=1e-5)

    merged_dir = tmp_path / "merged"
    if run.method.merge is None:  # virtual tokens cannot merge: refused in one line, as before
        with pytest.raises(SftlabError, match="no weights to merge"):
            export(str(run_dir), None, str(merged_dir), merge=True)
    else:
        export(str(run_dir), None, str(merged_dir), merge=True)
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
        mtok = AutoTokenizer.from_pretrained(str(merged_dir))
        assert torch.allclose(_logits(merged, mtok, text), ref, atol=1e-4)
        assert torch.equal(merged.get_input_embeddings().weight[:n0], emb0)

    # the plain reload generates the first new token, and the closing one where it belongs (teacher-forced)
    ids = ptok("question 5: use the tool", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = plain.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=ptok.eos_token_id)
    assert ptok.decode(gen[0, ids["input_ids"].shape[1]:]).startswith("<tool_call>")
    prefix = ptok("question 5: use the tool" + CALL.removesuffix("</tool_call>"), return_tensors="pt",
                  add_special_tokens=False)
    with torch.no_grad():
        assert int(plain(**prefix).logits[0, -1].argmax()) == ptok.convert_tokens_to_ids("</tool_call>")


@pytest.mark.parametrize("method", ["oft", "ia3"])  # a rotation and an additive method
def test_rewinding_moves_the_rows_of_a_token_adapter(tmp_path, model_dir, method):
    """Alpha 0: the init rows, 1: the trained ones, in between linear; OFT's adapter export at 0.5 carries them."""
    from sftlab.interpolate import export_at, model_at
    from sftlab.runs import Run

    run_dir = _train(tmp_path, model_dir, method=METHODS[method], train={"steps": 3, "lr": 1e-2})
    run = Run(run_dir)
    n0 = _base_weights(model_dir)[0].shape[0]
    new = slice(n0, n0 + 2)
    start = run.load_initial().get_input_embeddings().weight[new].clone()
    trained = run.load(merge=True)[0].get_input_embeddings().weight[new].clone()
    assert not torch.equal(start, trained)
    assert torch.equal(model_at(run, None, 0.0)[0].get_input_embeddings().weight[new], start)
    assert torch.allclose(model_at(run, None, 0.5)[0].get_input_embeddings().weight[new], (start + trained) / 2,
                          atol=1e-6)
    if run.method.merge.holds_adapter:  # an adapter at alpha 0.5 (scaled generators) plus its rows at 0.5
        out = export_at(run, None, 0.5, tmp_path / "half", merge=False)
        plain, _ = _plain_reload(out, model_dir)
        got = plain.get_base_model().get_input_embeddings().weight
        assert torch.allclose(got[new], (start + trained) / 2, atol=1e-6)
        assert torch.equal(got[:n0], _base_weights(model_dir)[0])
        from sftlab.analysis.run import AnalyzeOptions, analyze_run

        assert analyze_run(run_dir, AnalyzeOptions(n_texts=2, progress=False))


def test_resume_with_a_token_adapter(tmp_path):
    """A non-LoRA run with new tokens (untied: input and output rows) resumes to the uninterrupted weights and
    the same checkpoint bytes; the checkpoint hash covers ADAPTER/tokens."""
    from sftlab.train.checkpoint import hash_files, read_trajectory
    from sftlab.train.loop import Trainer

    model_dir = build_tiny_model(tmp_path / "untied", tie=False)

    def cfg(name):
        return tiny_config(tmp_path, model_dir, _data(tmp_path), method=METHODS["oft"], run={"name": name},
                           model={"new_tokens": TOKENS}, checkpoint={"every": 2},
                           train={"steps": 6, "lr": 1e-2, "weight_decay": 0.1, "schedule": "cosine"})

    class Crash(RuntimeError):
        pass

    def crash(trainer, step, metrics):
        if step == 3:
            raise Crash()

    a = Trainer(cfg("a"))
    a.run()
    with pytest.raises(Crash):
        Trainer(cfg("b"), hooks={"after_step": crash}).run()
    b = Trainer(cfg("b"), resume=True)
    b.run()
    wa = {n: p for n, p in a.model.named_parameters() if p.requires_grad}
    wb = {n: p for n, p in b.model.named_parameters() if p.requires_grad}
    assert wa.keys() == wb.keys() and any("trainable_tokens_delta" in n for n in wa)
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) <= 1e-6
    ea, eb = read_trajectory(a.run_dir), read_trajectory(b.run_dir)
    assert [e["sha256"] for e in ea] == [e["sha256"] for e in eb]
    ckpt = a.run_dir / ea[-1]["path"]
    assert hash_files(ckpt) == ea[-1]["sha256"]
    rows = ckpt / "tokens" / "adapter_model.safetensors"
    rows.write_bytes(rows.read_bytes()[:-4] + b"\0\0\0\0")  # a changed row changes the hash
    assert hash_files(ckpt) != ea[-1]["sha256"]


@pytest.mark.parametrize("method", ["prompt", "oft"])
def test_rows_at_init_for_the_dpo_reference(model_dir, method):
    """DPO's live reference (disable_adapter) sees the new rows at their init for every method; PEFT's own
    disable_adapter leaves them on for prompt learning, tokens.rows_at_init turns them off."""
    from transformers import AutoModelForCausalLM

    from sftlab.config import config_from_dict
    from sftlab.methods import METHODS as REGISTRY
    from sftlab.models import ModelRef, load_tokenizer
    from sftlab.tokens import add_tokens, init_new_rows, method_kwargs, rows_at_init

    cfg = config_from_dict({"model": {"path": str(model_dir), "new_tokens": TOKENS}, "method": METHODS[method]})
    tok = load_tokenizer(ModelRef(str(model_dir), str(model_dir), "", "local"))
    ids = add_tokens(tok, cfg.model.new_tokens)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    plan = init_new_rows(model, tok, cfg.model, seed=0)
    init = model.get_input_embeddings().weight[ids].detach().clone()
    spec = REGISTRY.get(cfg.method.name)
    peft_model = spec.apply(model, cfg.method.options, **method_kwargs(plan))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(1.0)  # as if trained
    x = torch.tensor([ids])
    emb = peft_model.get_base_model().get_input_embeddings()
    assert torch.allclose(emb(x)[0], init + 1.0)
    with peft_model.disable_adapter(), rows_at_init(peft_model):
        assert torch.equal(emb(x)[0], init)
        if method == "prompt":  # prompt tuning embeds through the same (wrapped) module
            assert peft_model.word_embeddings is emb
    assert torch.allclose(emb(x)[0], init + 1.0)  # and back on after the block


def test_dpo_live_reference_keeps_new_rows_at_init(tmp_path, tiny_model_dir):
    """Prompt tuning + new tokens: DPO's live reference (disable_adapter) equals the cached one (the starting
    model, rows at their init) at every step; before tokens.rows_at_init it used the trained rows."""
    rows = [{"prompt": f"question {i}: use the tool", "chosen": CALL, "rejected": "no"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    from sftlab.train.loop import train

    losses = {}
    for ref in ("disable_adapter", "cached"):
        cfg = tiny_config(tmp_path / ref, tiny_model_dir, data, method=METHODS["prompt"],
                          model={"new_tokens": TOKENS}, objective={"name": "dpo", "reference": ref},
                          train={"steps": 3, "lr": 1e-2})
        lines = (train(cfg) / "metrics.jsonl").read_text().splitlines()
        losses[ref] = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert len(losses["cached"]) == 3
    assert losses["disable_adapter"] == pytest.approx(losses["cached"], abs=1e-6)
