"""Probes: scores with known answers, the KL-to-base estimator against the exact KL, the base-output
cache, bootstrap intervals, text metrics, and every registered probe's options contract."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import build_tiny_model, memorisable_chats, write_jsonl
from sftlab.configtools import ConfigError
from sftlab.probes import PROBES, ProbeContext, ProbeError, Score, bootstrap_ci, build_probe
from sftlab.probes import metrics as M

torch = pytest.importorskip("torch")

TEXTS = [f"The {w} number {i} is a sentence about {w}s, tea and other things, written for testing probes."
         for i, w in enumerate(["cat", "dog", "bird", "fish", "tree", "house", "river", "stone"])]
REQUIRED = {"path": "unused.jsonl", "tasks": ["unused"],  # options that have no usable default
            "cheap": "yes"}  # lm_eval: `auto` would load the tasks to find their output types


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture
def ctx(tmp_path) -> ProbeContext:
    return ProbeContext(device="cpu", batch_size=4, cache_dir=tmp_path / "cache", base_id="tiny-base", n_boot=200)


def text_file(path: Path, texts=TEXTS) -> Path:
    return write_jsonl(path, [{"text": t} for t in texts])


# ------------------------------------------------------------------------------------------ registry


def test_import_is_torch_free():
    code = "import sys, sftlab.probes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", PROBES.names())
def test_probe_contract(name):
    """Every registered probe: options documented field by field, buildable from a dict, declares its kind."""
    spec = PROBES.get(name)
    for f in dataclasses.fields(spec.options):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    fields = {f.name for f in dataclasses.fields(spec.options)}
    probe = build_probe(name, {k: v for k, v in REQUIRED.items() if k in fields})
    assert probe.kind in ("task", "retention") and isinstance(probe.higher_is_better, bool)
    assert probe.cheap == spec.cheap and probe.name == name
    with pytest.raises(ConfigError, match="unknown key"):
        build_probe(name, {**REQUIRED, "no_such_option": 1})


def test_registry_misses_suggest():
    with pytest.raises(ConfigError, match="did you mean 'kl_to_base'"):
        build_probe("kl_to_bas")


def test_score_to_dict_is_json():
    s = Score("x", 0.5, "task", True, 10, 0.4, 0.6, {"a": [1, 2]})
    assert json.loads(json.dumps(s.to_dict()))["extra"] == {"a": [1, 2]}


# ------------------------------------------------------------------------------------------ statistics


def test_bootstrap_contains_mean_and_narrows():
    import random

    rng = random.Random(0)
    widths = []
    for n in (20, 200, 2000):
        values = [rng.gauss(1.0, 1.0) for _ in range(n)]
        lo, hi = bootstrap_ci(values, n_boot=500, seed=0)
        assert lo < sum(values) / n < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~1/sqrt(n)
    assert bootstrap_ci(values, n_boot=500, seed=0) == (lo, hi)  # seeded


def test_bootstrap_weighted_is_token_mean():
    means, tokens = [1.0, 3.0], [3, 1]  # token mean = (3 + 3) / 4 = 1.5, example mean 2.0
    lo, hi = bootstrap_ci(means, weights=tokens, n_boot=2000, seed=1)
    assert 1.0 <= lo <= 1.5 <= hi <= 3.0
    lo, hi = bootstrap_ci([2.0] * 5, weights=[1, 2, 3, 4, 5])
    assert lo == hi == 2.0


# ------------------------------------------------------------------------------------------ text metrics


def test_rouge_l_and_matches():
    assert M.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert M.rouge_l("The cat sat on a mat.", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("", "") == 1.0 and M.rouge_l("dog", "") == 0.0 and M.rouge_l("a b", "c d") == 0.0
    assert M.lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert M.exact_match(" Paris\n", "Paris") and not M.exact_match("paris", "Paris")
    assert M.normalised_match("  PARIS!! ", "paris") and M.normalised_match("New-York", "new york")
    assert not M.normalised_match("Paris, France", "Paris")


def test_macro_f1_known_case():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "x"]
    f1, per = M.macro_f1(gold, pred, ["a", "b", "c"])
    # a: tp1 fn1 -> 2/3; b: tp2 fp1 -> 4/5; c: fn1 -> 0; 'x' is outside the label set (no class)
    assert per == pytest.approx({"a": 2 / 3, "b": 0.8, "c": 0.0})
    assert f1 == pytest.approx((2 / 3 + 0.8) / 3)
    assert M.majority_baseline(gold) == ("a", 0.4)


def test_flesch_known_sentences():
    # 6 words, 1 sentence, 6 syllables: 206.835 - 1.015*6 - 84.6 = 116.145
    assert M.flesch_reading_ease("The cat sat on the mat.") == pytest.approx(116.145, abs=0.01)
    # 9 words, 11 syllables (o-ver, la-zy): 94.30, as textstat reports it
    assert M.flesch_reading_ease("The quick brown fox jumps over the lazy dog.") == pytest.approx(94.3, abs=0.5)
    hard = "Institutional accountability necessitates comprehensive organisational transparency."
    assert M.flesch_reading_ease(hard) < 0 < M.flesch_reading_ease("I see a dog. It is red. We run.")
    assert M.flesch_reading_ease("  ...  ") is None
    words = ["the", "table", "hoped", "wanted", "beautiful", "readability"]
    assert [M.syllables(w) for w in words] == [1, 2, 1, 2, 3, 5]


# ------------------------------------------------------------------------------------------ scorer


def test_scorer_dotted_paths():
    from sftlab.probes.quality import load_scorer

    assert load_scorer("sftlab.probes.metrics:rouge_l") is M.rouge_l
    assert load_scorer("sftlab.probes.metrics.rouge_l") is M.rouge_l
    assert load_scorer("builtins:len")("abc") == 3
    for bad, msg in [("no_such_pkg_xyz.mod:f", "cannot import module 'no_such_pkg_xyz.mod'"),
                     ("sftlab.probes.metrics:nope", "has no 'nope'"), ("justaname", "not a dotted path"),
                     ("sftlab.probes.metrics:M", "has no"), ("sftlab.probes.metrics:_WS", "not a function")]:
        with pytest.raises(ProbeError, match=msg) as e:
            load_scorer(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ProbeError, match="cannot import"):  # fails when the probe is built, before any model
        build_probe("quality", {"path": "x.jsonl", "metric": "scorer", "scorer": "no_such_pkg_xyz:f"})


def test_quality_probe_with_planted_generations(monkeypatch, tmp_path, tokenizer, ctx):
    import sftlab.probes.generate as G

    outs = {"a": "The cat sat on the mat.", "b": "The quick brown fox jumps over the lazy dog.", "c": ""}
    monkeypatch.setattr(G, "greedy_generate", lambda m, t, prompts, *a, **k: [outs[p[-1]] for p in prompts])
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in "abc"])
    probe = build_probe("quality", {"path": str(path), "template": "raw", "scorer": "builtins:len"})
    s = probe.score(None, tokenizer, ctx)
    assert s.value == pytest.approx((116.145 + 94.3) / 2, abs=0.01) and s.n == 2 and s.extra["no_words"] == 1
    assert s.extra["scorer_mean"] == pytest.approx((23 + 44 + 0) / 3)
    assert s.extra["words_mean"] == pytest.approx(5) and s.higher_is_better
    assert s.ci_low <= s.value <= s.ci_high and len(s.extra["samples"]) == 3


# ------------------------------------------------------------------------------------------ generation


def test_generate_metrics_with_planted_outputs(monkeypatch, tmp_path, tokenizer, ctx):
    import sftlab.probes.generate as G

    rows = [{"prompt": "capital of France?", "completion": "Paris"},
            {"messages": [{"role": "user", "content": "sky colour?"}, {"role": "assistant", "content": "blue"}]},
            {"prompt": "say it", "answer": "the cat sat on the mat"}]
    outs = ["Paris", "Blue.", "the cat sat on a mat"]
    seen = {}

    def fake(model, tok, prompts, *a, **k):
        seen["prompts"] = prompts
        return outs

    monkeypatch.setattr(G, "greedy_generate", fake)
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    s = build_probe("generate", {"path": str(path), "labels": ["Paris", "blue"]}).score(None, tokenizer, ctx)
    assert seen["prompts"][0].endswith("<|im_start|>assistant\n")  # chat template with a generation prompt
    assert s.value == pytest.approx(2 / 3) and s.extra["exact_match"] == pytest.approx(1 / 3)
    assert s.extra["rouge_l"] == pytest.approx((1 + 1 + 5 / 6) / 3)
    assert s.extra["macro_f1"] == pytest.approx(1.0)  # the third row is outside the label set, never predicted
    assert [x["output"] for x in s.extra["samples"]] == outs
    s = build_probe("generate", {"path": str(path), "metric": "macro_f1"}).score(None, tokenizer, ctx)
    # classes = distinct references: paris, blue right; 'the cat sat on the mat' missed -> (1 + 1 + 0) / 3
    assert s.value == pytest.approx(2 / 3)


def test_greedy_generation_is_deterministic(tiny, tokenizer, tmp_path, ctx):
    path = write_jsonl(tmp_path / "g.jsonl", memorisable_chats(5))
    probe = build_probe("generate", {"path": str(path), "max_new_tokens": 4, "samples": 5})
    a, b = probe.score(tiny, tokenizer, ctx), probe.score(tiny, tokenizer, ctx)
    assert a.to_dict() == b.to_dict() and len(a.extra["samples"]) == 5 and a.n == 5
    assert not probe.cheap and not tiny.training


# ------------------------------------------------------------------------------------------ likelihood


def test_heldout_equals_eval_loss(tiny, tokenizer, tmp_path, ctx):
    from sftlab.config import DataSection, DataSource
    from sftlab.data.collate import pad_batch
    from sftlab.data.formats import read_source
    from sftlab.data.tokenize import tokenize_all
    from sftlab.objectives import eval_loss

    path = write_jsonl(tmp_path / "eval.jsonl", memorisable_chats(10))
    examples, _ = tokenize_all(read_source(DataSource(path=str(path))), tokenizer, DataSection())
    want = eval_loss(tiny, [pad_batch(examples[i:i + 3], tokenizer.pad_token_id) for i in range(0, 10, 3)], "cpu")
    s = build_probe("heldout_loss", {"path": str(path)}).score(tiny, tokenizer, ctx)
    assert s.value == pytest.approx(want["eval_loss"], abs=1e-5) and s.extra["tokens"] == want["eval_tokens"]
    assert s.extra["ppl"] == pytest.approx(want["eval_ppl"], rel=1e-5)
    assert s.ci_low < s.value < s.ci_high and s.n == 10 and not s.higher_is_better and s.kind == "task"
    sub = build_probe("heldout_loss", {"path": str(path), "limit": 4, "kind": "retention"}).score(tiny, tokenizer, ctx)
    assert sub.n == 4 and sub.kind == "retention"


def test_perplexity_on_text(tiny, tokenizer, tmp_path, ctx):
    s = build_probe("perplexity", {"path": str(text_file(tmp_path / "t.jsonl"))}).score(tiny, tokenizer, ctx)
    assert s.value == pytest.approx(math.exp(s.extra["loss"])) and s.ci_low < s.value < s.ci_high
    assert s.kind == "retention" and s.n == len(TEXTS) and s.value > 1000  # a random model: ~vocabulary size


class CueLM(torch.nn.Module):
    """A stand-in LM with known answers: the first answer token of label f gets logit `strength` once one of
    label f's cue tokens has appeared in the input; every other logit is 0."""

    def __init__(self, cues: list[list[int]], answer_ids: list[int], vocab: int, strength: float = 10.0):
        super().__init__()
        self.cues = [torch.tensor(c) for c in cues]
        self.head = torch.nn.Linear(len(cues), vocab, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            for f, t in enumerate(answer_ids):
                self.head.weight[t, f] = strength

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, m):
        self.head = m

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        seen = torch.stack([torch.isin(input_ids, c) for c in self.cues], -1).float().cumsum(1).clamp(max=1)
        return SimpleNamespace(logits=self.head(seen))  # (B, L, V)


@pytest.fixture
def cue_model(tokenizer):
    labels = ["bird", "cat", "dog"]
    answer = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in labels]
    cue = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in labels]
    assert all(len(a) == 1 for a in answer + cue) and not {a[0] for a in answer} & {c[0] for c in cue}
    return labels, CueLM(cue, [a[0] for a in answer], len(tokenizer))


def test_classify_known_answers(cue_model, tokenizer, tmp_path, ctx):
    labels, model = cue_model
    rows = [("cat", "cat"), ("cat", "cat"), ("dog", "dog"), ("cat", "dog"), ("bird", "bird"), ("fish", "dog")]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"animal: {cue}", "label": gold} for cue, gold in rows])
    s = build_probe("classify", {"path": str(path), "labels": labels}).score(model, tokenizer, ctx)
    # predictions: cat cat dog cat bird, and 'fish' (no cue: all labels tie) -> the first label, bird
    assert s.value == pytest.approx(4 / 6) and s.n == 6 and s.higher_is_better
    assert s.extra["confusion"] == {"bird": {"bird": 1}, "cat": {"cat": 2}, "dog": {"bird": 1, "cat": 1, "dog": 1}}
    assert s.extra["per_class_f1"] == pytest.approx({"bird": 2 / 3, "cat": 0.8, "dog": 0.5})
    assert s.extra["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    assert s.extra["majority_label"] == "dog" and s.extra["majority_baseline"] == 0.5
    lo, hi = s.extra["macro_f1_ci"]
    assert lo <= s.extra["macro_f1"] <= hi and s.ci_low <= s.value <= s.ci_high
    # verbalizers: 'dog' is now scored as the answer text "cat", so every cat-cued row ties cat and dog
    s = build_probe("classify", {"path": str(path), "labels": ["cat", "dog"], "verbalizers": {"dog": "cat"},
                                 "limit": 3}).score(model, tokenizer, ctx)
    assert s.n == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "animal: cat", "label": "horse"}])
    with pytest.raises(Exception, match="bad.jsonl:1: label 'horse' is not in the label set"):
        build_probe("classify", {"path": str(bad), "labels": labels}).score(model, tokenizer, ctx)


def test_choice_known_answers(cue_model, tokenizer, tmp_path, ctx):
    _, model = cue_model
    rows = [{"question": "animal: cat", "choices": ["dog", "cat", "bird"], "answer": 1},
            {"question": "animal: dog", "choices": ["dog", "cat"], "answer": 0},
            {"question": "animal: bird", "choices": ["cat", "dog"], "answer": 1}]  # the model cannot pick 'bird'
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    s = build_probe("choice", {"path": str(path)}).score(model, tokenizer, ctx)
    assert s.value == pytest.approx(2 / 3) and s.extra["acc_norm"] == pytest.approx(2 / 3)
    assert s.extra["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(Exception, match=r"bad.jsonl:1: 'answer' must be the index \(0 to 1\)"):
        build_probe("choice", {"path": str(bad)}).score(model, tokenizer, ctx)


# ------------------------------------------------------------------------------------------ KL to the base


def kl_probe(path: Path, k: int = 32):
    return build_probe("kl_to_base", {"path": str(path), "k": k, "max_length": 48})


def test_kl_of_base_to_itself_is_zero(tiny, tokenizer, tmp_path, ctx):
    from peft import LoraConfig, get_peft_model

    probe = kl_probe(text_file(tmp_path / "t.jsonl"))
    s = probe.score(tiny, tokenizer, dataclasses.replace(ctx, base_model=tiny))
    assert abs(s.value) < 1e-6 and s.kind == "retention" and not s.higher_is_better and s.n == len(TEXTS)
    # a freshly wrapped LoRA model is the base (B = 0): zero too, through PEFT's wrapper
    lora = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert abs(probe.score(lora, tokenizer, ctx).value) < 1e-6


def test_kl_works_with_prompt_tuning(tiny, tokenizer, tmp_path, ctx):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    s = kl_probe(text_file(tmp_path / "t.jsonl")).score(model, tokenizer, dataclasses.replace(ctx, base_model=tiny))
    assert 0 < s.value < 10 and math.isfinite(s.ci_high)


def peaked_model(folder: Path, scale: float):
    """An untied tiny Llama whose output layer is scaled so next-token distributions are peaked, like a
    trained LM's. The default init gives near-uniform distributions over 49k tokens (the top 32 hold ~0.1%
    of the mass), which no top-k cache can summarise. At scale 30 the base leaves ~18% of its mass outside
    its top 32 (SmolLM2-135M on Wikipedia text: 11%); at scale 100, 0.005%."""
    if not (folder / "config.json").exists():
        build_tiny_model(folder, tie=False)
    model = load(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def perturbed(model, noise: float, seed: int = 1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return out


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("peaked"), tie=False)


@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_topk_kl_matches_full_vocabulary_kl(scale, peaked_dir, tokenizer, tmp_path, ctx):
    from sftlab.probes.kl import full_vocab_kl
    from sftlab.probes.likelihood import text_examples

    base = peaked_model(peaked_dir, scale)
    model = perturbed(base, 0.05)
    examples = text_examples(tokenizer, TEXTS, 48)
    exact = full_vocab_kl(base, model, examples, tokenizer.pad_token_id, 4, "cpu")
    full = sum(x for x, _ in exact) / sum(n for _, n in exact)
    assert 0.05 < full < 5  # a real divergence, not a rounding error
    ctx = dataclasses.replace(ctx, base_model=base)
    path = text_file(tmp_path / "t.jsonl")
    est = kl_probe(path).score(model, tokenizer, ctx)  # default: top-32 + rest + 32 sampled tail tokens
    assert est.extra["positions"] == sum(n for _, n in exact) and est.extra["tail_samples"] == 32
    assert est.value == pytest.approx(full, rel=0.01)
    # top-k + rest alone is a lower bound (data-processing inequality), within 1% only when the base
    # leaves little mass outside its top k; at scale 30 it reads ~20% low, which the tail samples correct
    bound = build_probe("kl_to_base", {"path": str(path), "k": 32, "tail_samples": 0, "max_length": 48})
    low = bound.score(model, tokenizer, ctx)
    assert low.value <= full * (1 + 1e-9)
    if est.extra["base_rest_mass"] < 0.01:
        assert low.value == pytest.approx(full, rel=0.01)
    else:
        assert low.value < 0.95 * full


def test_general_passages_are_fixed():
    from sftlab.probes.texts import general_passages

    from sftlab.errors import SftlabError

    try:
        a = general_passages(5)
    except SftlabError as e:  # the offline Wikipedia package is not installed
        pytest.skip(str(e))
    assert a == general_passages(5) and all(200 <= len(t) <= 1200 for t in a) and len(set(a)) == 5


def test_kl_cache_reused_and_invalidated(tiny, tokenizer, tmp_path, ctx):
    calls = []

    def load_base():
        calls.append(1)
        return tiny

    ctx = dataclasses.replace(ctx, load_base=load_base)
    probe = kl_probe(text_file(tmp_path / "a.jsonl"))
    first = probe.score(tiny, tokenizer, ctx)
    cache = Path(first.extra["cache_file"])
    assert first.extra["cache"] == "computed" and len(calls) == 1 and cache.parent == ctx.cache_dir
    mtime = cache.stat().st_mtime_ns
    again = probe.score(tiny, tokenizer, ctx)
    assert again.extra["cache"] == "reused" and len(calls) == 1 and cache.stat().st_mtime_ns == mtime
    assert again.value == first.value
    # other probe texts -> another key, recomputed
    other = kl_probe(text_file(tmp_path / "b.jsonl", TEXTS[:-1] + ["A different closing passage."]))
    assert other.score(tiny, tokenizer, ctx).extra["cache"] == "computed" and len(calls) == 2
    # another k -> recomputed
    assert kl_probe(tmp_path / "a.jsonl", k=8).score(tiny, tokenizer, ctx).extra["cache"] == "computed"
    # another base identity -> recomputed
    s = probe.score(tiny, tokenizer, dataclasses.replace(ctx, base_id="another-base"))
    assert s.extra["cache"] == "computed" and len(calls) == 4
    # no identity given: the base's weights are fingerprinted, so changing them invalidates the cache
    anon = dataclasses.replace(ctx, base_id="", load_base=None, base_model=tiny)
    assert probe.score(tiny, tokenizer, anon).extra["cache"] == "computed"
    assert probe.score(tiny, tokenizer, anon).extra["cache"] == "reused"
    changed = perturbed(tiny, 1e-3)
    s = probe.score(tiny, tokenizer, dataclasses.replace(anon, base_model=changed))
    assert s.extra["cache"] == "computed" and s.value > 0
    # no cache and no base: a clear error
    with pytest.raises(ProbeError, match="no base model was given"):
        probe.score(tiny, tokenizer, dataclasses.replace(ctx, base_id="third", load_base=None))


# ------------------------------------------------------------------------------------------ shared prompts


@pytest.mark.parametrize("wrap", ["none", "lora", "prompt", "prefix"])
def test_shared_prompt_scoring_equals_plain(wrap, tiny, tokenizer):
    """Label/choice scoring runs the tokens all prompts start with once, each prompt once, and reuses their
    key/value caches: same log-probs as scoring every (prompt, answer) sequence on its own, for a plain model,
    a LoRA model (B != 0), prompt tuning and prefix tuning (virtual tokens in the cache, positions after
    them)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from sftlab.probes.likelihood import _all_rows_prefix, _shared_prefix

    from sftlab.probes.likelihood import answer_examples, example_logprobs, group_logprobs

    model = copy.deepcopy(tiny)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    elif wrap == "prompt":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    elif wrap == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        for p in model.prompt_encoder.parameters():
            torch.nn.init.normal_(p, std=0.5)  # a prefix that changes the answers
    labels = ["bird", "cat", "dog", "a much longer answer than the others"]
    prompts = [[{"role": "user", "content": t}] for t in TEXTS[:5]]
    flat = [p for p in prompts for _ in labels]
    ex = answer_examples(tokenizer, flat, labels * len(prompts), "auto", 512, ["t"] * len(flat))
    plain = example_logprobs(model, ex, 2, 3, "cpu")
    grouped = group_logprobs(model, [ex[i:i + len(labels)] for i in range(0, len(ex), len(labels))], 2, 3, "cpu")
    flat_grouped = [r for row in grouped for r in row]
    groups = [ex[i:i + len(labels)] for i in range(0, len(ex), len(labels))]
    assert _all_rows_prefix(groups, [_shared_prefix(g) for g in groups]) > 0  # shared across rows too
    assert [r[1:] for r in flat_grouped] == [r[1:] for r in plain]  # counts and argmax hits
    assert [r[0] for r in flat_grouped] == pytest.approx([r[0] for r in plain], abs=1e-4)
    assert len({r[0] for r in plain}) > 4  # the answers really score differently


def test_bf16_scoring_has_its_own_base_cache(tiny, tokenizer, tmp_path, ctx):
    """Probes under bf16 autocast (scoring.precision): the base against itself is still exactly 0, the cached
    base outputs are kept apart from the fp32 ones, and the numbers stay close to fp32's."""
    from sftlab.scoring import score_model

    probe = kl_probe(text_file(tmp_path / "t.jsonl"))
    held = build_probe("heldout_loss", {"path": str(write_jsonl(tmp_path / "c.jsonl", memorisable_chats(8)))})
    fp32 = dataclasses.replace(ctx, base_model=tiny)
    bf16 = dataclasses.replace(fp32, precision="bf16")
    a = score_model(tiny, tokenizer, [probe, held], fp32)
    b = score_model(tiny, tokenizer, [probe, held], bf16)
    assert a["kl_to_base"]["value"] == 0 and b["kl_to_base"]["value"] == 0
    assert a["kl_to_base"]["extra"]["cache_file"] != b["kl_to_base"]["extra"]["cache_file"]
    assert b["heldout_loss"]["value"] == pytest.approx(a["heldout_loss"]["value"], rel=0.02)
    assert b["heldout_loss"]["value"] != a["heldout_loss"]["value"]  # bf16 really ran
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("wrap", ["none", "lora", "oft", "prefix"])
def test_scoring_with_cast_weights_gives_the_same_scores(wrap, tiny, tokenizer, tmp_path, ctx, monkeypatch):
    """score_model under bf16 swaps each Linear's weight for its bf16 copy (made once, not per forward pass):
    the scores equal those of plain autocast, and every weight is the fp32 original again afterwards."""
    from peft import LoraConfig, OFTConfig, PrefixTuningConfig, get_peft_model

    import sftlab.scoring as scoring_mod
    from sftlab.objectives import cast_linear_weights

    model = copy.deepcopy(tiny)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    elif wrap == "oft":
        model = get_peft_model(model, OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"],
                                                init_weights=False))
    elif wrap == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    chats = write_jsonl(tmp_path / "c.jsonl", memorisable_chats(8))
    probes = [build_probe("classify", {"path": str(chats)}), build_probe("heldout_loss", {"path": str(chats)}),
              kl_probe(text_file(tmp_path / "t.jsonl"))]
    bf16 = dataclasses.replace(ctx, base_model=tiny, precision="bf16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = scoring_mod.score_model(model, tokenizer, probes, bf16)
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    slow = lambda m, d: cast_linear_weights(m, None)  # noqa: E731
    monkeypatch.setattr(scoring_mod, "cast_linear_weights", slow)
    plain = scoring_mod.score_model(model, tokenizer, probes, bf16)
    for name in plain:
        assert fast[name]["value"] == pytest.approx(plain[name]["value"], rel=1e-6, abs=1e-9), name
    # a frozen weight changed in place (its kept cast is stale) is seen at once
    frozen = next(m.weight for m in model.modules() if type(m) is torch.nn.Linear and m.weight.shape[0] > 8)
    frozen.requires_grad_(False)
    monkeypatch.setattr(scoring_mod, "cast_linear_weights", cast_linear_weights)
    scoring_mod.score_model(model, tokenizer, probes, bf16)  # keeps the cast
    with torch.no_grad():
        frozen.mul_(3.0)
    fast = scoring_mod.score_model(model, tokenizer, probes, bf16)
    monkeypatch.setattr(scoring_mod, "cast_linear_weights", slow)
    plain = scoring_mod.score_model(model, tokenizer, probes, bf16)
    assert fast["heldout_loss"]["value"] == pytest.approx(plain["heldout_loss"]["value"], rel=1e-6)
