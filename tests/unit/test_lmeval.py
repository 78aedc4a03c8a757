"""lm_eval probe: lm-evaluation-harness tasks on the in-memory model, offline.

Every task here is a YAML written into tmp that reads a local JSONL (`dataset_path: json`), so nothing
touches the hub. The multiple-choice rows carry two choice lists: `choices` (what sftlab's `choice`
probe scores) and `choices_eos` (the same text plus the end-of-sequence token, which sftlab's raw
template scores after every answer and lm-eval does not): with those, both tools score exactly the same
tokens and must agree on every log-likelihood, not only on accuracy.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from sftlab.configtools import ConfigError
from sftlab.probes import ProbeContext, ProbeError, build_probe

torch = pytest.importorskip("torch")

WORDS = ["red", "blue", "green", "black"]
THINGS = ["cat", "dog", "car", "tree", "cup", "hat"]
N_ROWS = 40


def need_lm_eval():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'sftlab[lmeval]')")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


@pytest.fixture
def ctx(tmp_path) -> ProbeContext:
    return ProbeContext(device="cpu", batch_size=8, cache_dir=tmp_path / "cache", n_boot=200, seed=3)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, tokenizer) -> Path:
    eos = tokenizer.eos_token
    rows = [{"question": f"Item {i} is a {THINGS[i % 6]}. Which colour is item {i}? Answer:",
             "choices": [f" {w}" for w in WORDS], "choices_eos": [f" {w}{eos}" for w in WORDS],
             "answer": (i * 7) % 4, "colour": WORDS[(i * 7) % 4]} for i in range(N_ROWS)]
    return write_jsonl(tmp_path_factory.mktemp("lmeval") / "mc.jsonl", rows)


def task_yaml(folder: Path, name: str, rows: Path, body: str) -> Path:
    """A task over the local JSONL; its dataset cache stays in tmp too."""
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
                    f"  cache_dir: {folder / 'hf_datasets'}\ntest_split: test\n{body}", encoding="utf-8")
    return path


def mc_body(field: str, metrics=("acc",)) -> str:
    listed = "".join(f"  - metric: {m}\n" for m in metrics)
    return (f'output_type: multiple_choice\ndoc_to_text: "{{{{question}}}}"\ndoc_to_choice: "{{{{{field}}}}}"\n'
            f'doc_to_target: answer\ntarget_delimiter: ""\nmetric_list:\n{listed}')


def mc_task(tmp_path, rows_file, name="toy_mc", field="choices_eos", metrics=("acc",)) -> str:
    return str(task_yaml(tmp_path, name, rows_file, mc_body(field, metrics)))


# ------------------------------------------------------------------------------------------ without lm_eval


def test_missing_package_says_how_to_install(monkeypatch, tmp_path, rows_file, tiny, tokenizer, ctx):
    for mod in ("lm_eval", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import lm_eval` now raises ImportError
    probe = build_probe("lm_eval", {"tasks": [mc_task(tmp_path, rows_file)], "cheap": "yes"})
    assert probe.cheap  # an explicit setting needs no lm_eval
    with pytest.raises(ProbeError, match=r"pip install 'sftlab\[lmeval\]'"):
        probe.score(tiny, tokenizer, ctx)
    with pytest.raises(ProbeError, match=r"pip install 'sftlab\[lmeval\]'"):
        build_probe("lm_eval", {"tasks": ["hellaswag"]}).cheap  # auto has to load the tasks


def test_options_validate():
    with pytest.raises(ConfigError, match="tasks"):
        build_probe("lm_eval", {})
    with pytest.raises(ConfigError, match="duplicates"):
        build_probe("lm_eval", {"tasks": ["a", "a"]})
    with pytest.raises(ConfigError, match="num_fewshot"):
        build_probe("lm_eval", {"tasks": ["a"], "num_fewshot": -2})
    assert build_probe("lm_eval", {"tasks": ["a"], "cheap": "no"}).kind == "retention"  # the default kind


# ------------------------------------------------------------------------------------------ with lm_eval


def test_agrees_with_choice_probe(tmp_path, rows_file, tiny, tokenizer, ctx):
    """Same rows, same tokens: every choice's log-likelihood, the accuracy and its interval agree."""
    need_lm_eval()
    from sftlab.probes.likelihood import answer_examples, group_logprobs, pad_id
    from sftlab.probes.texts import prompt_messages, read_rows

    probe = build_probe("lm_eval", {"tasks": [mc_task(tmp_path, rows_file)]})
    assert probe.cheap  # auto: multiple_choice is likelihood scoring
    res = probe.evaluate(tiny, tokenizer, ctx)
    lm_ll = {d["doc_id"]: [r[0] for r in d["filtered_resps"]] for d in res["samples"]["toy_mc"]}
    rows = read_rows(str(rows_file), "rows")
    msgs = [prompt_messages(r, p) for p, r in rows for _ in WORDS]
    examples = answer_examples(tokenizer, msgs, [c for _, r in rows for c in r["choices"]], "raw", 512,
                               ["row"] * len(msgs))
    groups = [examples[i * len(WORDS):(i + 1) * len(WORDS)] for i in range(len(rows))]
    ours = group_logprobs(tiny, groups, pad_id(tokenizer), 8, "cpu")
    assert sorted(lm_ll) == list(range(N_ROWS))
    for i, row in enumerate(ours):
        assert [r[0] for r in row] == pytest.approx(lm_ll[i], abs=2e-4), f"row {i}"

    s = probe.score(tiny, tokenizer, ctx)
    c = build_probe("choice", {"path": str(rows_file), "template": "raw"}).score(tiny, tokenizer, ctx)
    assert s.n == c.n == N_ROWS and s.value == c.value
    assert (s.ci_low, s.ci_high) == (c.ci_low, c.ci_high)  # bootstrap_ci over the same per-row values, same seed
    assert s.ci_low < s.value < s.ci_high and s.kind == "retention" and s.higher_is_better
    assert s.extra["tasks"]["toy_mc"]["n"] == N_ROWS and s.extra["metric"] == "acc"


def test_plain_choices_differ_only_by_eos(tmp_path, rows_file, tiny, tokenizer, ctx):
    """Without the EOS, lm-eval's log-likelihood is sftlab's minus log p(EOS | question + choice)."""
    need_lm_eval()
    from sftlab.probes.likelihood import example_logprobs, pad_id
    from sftlab.data.tokenize import Example

    res = build_probe("lm_eval", {"tasks": [mc_task(tmp_path, rows_file, "plain", "choices")],
                                  "limit": 6}).evaluate(tiny, tokenizer, ctx)
    docs = res["samples"]["plain"]
    assert len(docs) == 6
    for d in docs:
        ctx_text, choice = d["arguments"][0]
        ids = tokenizer(ctx_text + choice)["input_ids"]
        n_ctx = len(tokenizer(ctx_text)["input_ids"])
        with_eos = Example(ids + [tokenizer.eos_token_id], [-100] * n_ctx + ids[n_ctx:] + [tokenizer.eos_token_id],
                           "eos")
        without = Example(ids, [-100] * n_ctx + ids[n_ctx:], "plain")
        (a, _, _), (b, _, _) = example_logprobs(tiny, [with_eos, without], pad_id(tokenizer), 2, "cpu")
        assert b == pytest.approx(d["filtered_resps"][0][0], abs=2e-4) and a < b


def test_limit_is_a_seeded_subset_and_rng_is_untouched(tmp_path, rows_file, tiny, tokenizer, ctx):
    need_lm_eval()
    import numpy as np

    from sftlab.scoring import score_model

    probe = build_probe("lm_eval", {"tasks": [mc_task(tmp_path, rows_file)], "limit": 12, "score_name": "lm"})
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    first = score_model(tiny, tokenizer, [probe], ctx)["lm"]
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(1)))  # as if never scored
    again = score_model(tiny, tokenizer, [probe], ctx)["lm"]
    assert {k: first[k] for k in ("value", "n", "ci_low", "ci_high")} == \
        {k: again[k] for k in ("value", "n", "ci_low", "ci_high")}
    c = build_probe("choice", {"path": str(rows_file), "template": "raw", "limit": 12}).score(tiny, tokenizer, ctx)
    assert first["n"] == c.n == 12 and first["value"] == c.value  # sftlab's subset: the same 12 rows
    other = build_probe("lm_eval", {"tasks": [mc_task(tmp_path, rows_file)], "limit": 12})
    docs = other.evaluate(tiny, tokenizer, ProbeContext(device="cpu", batch_size=8, seed=4))["samples"]["toy_mc"]
    assert sorted(d["doc_id"] for d in docs) != sorted(range(12))  # seeded, not lm-eval's first N


def test_several_tasks_peft_and_corpus_metric(tmp_path, rows_file, tiny, tokenizer, ctx):
    """Two tasks -> their mean with per-task detail; a LoRA-wrapped model at init scores as its base;
    a corpus-level metric (MCC) gets a bootstrap interval from re-aggregated resamples."""
    need_lm_eval()
    import copy

    from peft import LoraConfig, get_peft_model

    a = mc_task(tmp_path, rows_file, "task_a", "choices_eos")
    b = mc_task(tmp_path, rows_file, "task_b", "choices", ("acc", "mcc"))
    two = build_probe("lm_eval", {"tasks": [a, b], "limit": 20})
    s = two.score(tiny, tokenizer, ctx)
    per = s.extra["tasks"]
    assert set(per) == {"task_a", "task_b"} and s.n == 40
    assert s.value == pytest.approx((per["task_a"]["value"] + per["task_b"]["value"]) / 2)
    assert s.ci_low <= s.value <= s.ci_high

    peft = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert two.score(peft, tokenizer, ctx).value == s.value  # LoRA B = 0 at init: the same model

    m = build_probe("lm_eval", {"tasks": [b], "metric": "mcc"}).score(tiny, tokenizer, ctx)
    assert m.extra["tasks"]["task_b"]["n_boot"] == 100 and -1 <= m.ci_low <= m.value <= m.ci_high <= 1
    with pytest.raises(ProbeError, match="no metric 'bleu'"):
        build_probe("lm_eval", {"tasks": [b], "metric": "bleu"}).score(tiny, tokenizer, ctx)


def test_generation_task_is_not_cheap(tmp_path, rows_file, tiny, tokenizer, ctx):
    need_lm_eval()
    body = ('output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{colour}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
            'metric_list:\n  - metric: exact_match\n')
    probe = build_probe("lm_eval", {"tasks": [str(task_yaml(tmp_path, "toy_gen", rows_file, body))], "limit": 4})
    assert probe.cheap is False
    s = probe.score(tiny, tokenizer, ctx)
    assert s.n == 4 and 0.0 <= s.ci_low <= s.value <= s.ci_high <= 1.0
    assert s.extra["tasks"]["toy_gen"]["output_type"] == "generate_until"
