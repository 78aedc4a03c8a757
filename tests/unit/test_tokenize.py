"""sftlab.data.tokenize: completion-only labels with the real SmolLM2 tokenizer, length handling, and
`sftlab data inspect`.

SmolLM2's pad token is its end-of-turn token `<|im_end|>`: the end of each answer must stay a label, and
padding must be masked by length, never by token id.
"""

from __future__ import annotations

import pytest

from sftlab.config import DataSection, config_from_dict
from sftlab.data.collate import pack_rows, pad_batch
from sftlab.data.formats import Record
from sftlab.data.tokenize import IGNORE, Example, tokenize_all, tokenize_record
from sftlab.errors import DataError, ModelError

from conftest import TOKENIZER_DIR, write_jsonl

EOT = "<|im_end|>"
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao, see you"}]


def chat(messages, source="t.jsonl:1"):
    return Record("chat", source, messages=messages)


def pc(prompt, completion, source="t.jsonl:1"):
    return Record("prompt_completion", source, prompt=prompt, completion=completion)


def trained_runs(tok, ex: Example) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == i  # labels are the token ids themselves (unshifted)
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def fresh_tokenizer(chat_template=...):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if chat_template is not ...:
        tok.chat_template = chat_template
    return tok


def test_smollm2_pad_is_end_of_turn(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token == EOT
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- chat


def test_chat_trains_only_answer_and_end_of_turn(tokenizer):
    msgs = [SYSTEM, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ex = tokenize_record(tokenizer, chat(msgs), True, DataSection())
    assert trained_runs(tokenizer, ex) == ["It is 4." + EOT]
    text = tokenizer.decode(ex.input_ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nIt is 4." + EOT + "\n")
    # the newline after <|im_end|> is the last token and is not trained; <|im_end|> before it is
    assert tokenizer.decode(ex.input_ids[-1:]) == "\n" and ex.labels[-1] == IGNORE
    assert ex.input_ids[-2] == tokenizer.eos_token_id and ex.labels[-2] == tokenizer.eos_token_id
    # nothing of the system, user or `<|im_start|>assistant\n` header is trained
    first = next(t for t, lab in enumerate(ex.labels) if lab != IGNORE)
    assert tokenizer.decode(ex.input_ids[:first], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert ex.n_trained == len(tokenizer("It is 4.")["input_ids"]) + 1


def test_multi_turn_all_vs_last(tokenizer):
    ex_all = tokenize_record(tokenizer, chat(MULTI), True, DataSection(assistant_turns="all"))
    ex_last = tokenize_record(tokenizer, chat(MULTI), True, DataSection(assistant_turns="last"))
    assert ex_all.input_ids == ex_last.input_ids
    assert trained_runs(tokenizer, ex_all) == ["Hello!" + EOT, "Ciao, see you" + EOT]
    assert trained_runs(tokenizer, ex_last) == ["Ciao, see you" + EOT]


def test_answer_token_merged_with_header_newline_is_trained(tokenizer):
    """'<|im_start|>assistant\n' + '\n\nfoo': the header's newline and the answer's first one form one token."""
    msgs = [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "\n\nfoo"}]
    ex = tokenize_record(tokenizer, chat(msgs), True, DataSection())
    # the merged token carries answer text, so it is trained (it also holds the header's newline)
    assert trained_runs(tokenizer, ex) == ["\n\n\nfoo" + EOT]


def test_chat_opening_with_assistant_turn(tokenizer):
    msgs = [{"role": "assistant", "content": "How can I help?"}] + MULTI[1:]
    with pytest.raises(DataError, match=r"t\.jsonl:1: the conversation starts with an assistant message"):
        tokenize_record(tokenizer, chat(msgs), True, DataSection(assistant_turns="all"))
    ex = tokenize_record(tokenizer, chat(msgs), True, DataSection(assistant_turns="last"))
    assert trained_runs(tokenizer, ex) == ["Ciao, see you" + EOT]


def test_train_on_prompt_trains_everything(tokenizer):
    ex = tokenize_record(tokenizer, chat(MULTI), True, DataSection(train_on_prompt=True))
    assert ex.labels == ex.input_ids


def test_prompt_completion_through_chat_template(tokenizer):
    ex = tokenize_record(tokenizer, pc("What is 2+2?", "4"), True, DataSection(template="chat"))
    assert trained_runs(tokenizer, ex) == ["4" + EOT]
    assert "<|im_start|>user\nWhat is 2+2?" in tokenizer.decode(ex.input_ids)


# ---------------------------------------------------------------------------------------------- raw


def test_raw_prompt_completion_appends_and_trains_eos(tokenizer):
    ex = tokenize_record(tokenizer, pc("Q: 2+2?\nA:", " 4"), False, DataSection(template="raw"))
    assert ex.input_ids == tokenizer("Q: 2+2?\nA: 4")["input_ids"] + [tokenizer.eos_token_id]
    assert trained_runs(tokenizer, ex) == [" 4" + EOT]


def test_raw_answer_token_merged_with_prompt_space_is_trained(tokenizer):
    """'Answer: ' + 'Paris' tokenizes as [..., ':', ' Paris']: the merged token must be trained.

    Counting the prompt's own tokens (which end in ' ') used to mask ' Paris', leaving only EOS trained.
    """
    ex = tokenize_record(tokenizer, pc("Capital of France? Answer: ", "Paris"), False, DataSection(template="raw"))
    assert trained_runs(tokenizer, ex) == [" Paris" + EOT]


def test_text_record_trains_everything(tokenizer):
    ex = tokenize_record(tokenizer, Record("text", "t.jsonl:1", text="plain text here"), False, DataSection())
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- padding


def test_end_of_turn_stays_a_label_and_padding_is_masked_by_length(tokenizer):
    cfg = DataSection(template="raw")
    short = tokenize_record(tokenizer, pc("Q: hi\nA:", " yo"), False, cfg)
    long = tokenize_record(tokenizer, pc("Q: tell me more please\nA:", " sure, here it is"), False, cfg)
    eot = tokenizer.eos_token_id
    assert short.input_ids[-1] == short.labels[-1] == eot == tokenizer.pad_token_id
    n = len(short.input_ids)
    for batch in (pad_batch([short, long], tokenizer.pad_token_id),
                  pack_rows([[short], [long]], tokenizer.pad_token_id)):
        ids, tgt = batch["input_ids"][0], batch["targets"][0]
        assert ids.shape[0] > n
        assert (ids[n:] == eot).all()  # padding has the very id of the trained end-of-turn token...
        assert (tgt[n - 1:] == IGNORE).all()  # ...yet only real positions carry targets
        assert int(tgt[n - 2]) == eot  # the real <|im_end|> is the target of the token before it
        assert tgt[: n - 1].tolist() == short.labels[1:]
    assert pad_batch([short, long], eot)["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)


def test_all_masked_example_raises_naming_source():
    # a broken template that renders the assistant header but drops the answer: nothing would be trained
    tok = fresh_tokenizer("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
                          "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"data/x\.jsonl:7: every label is masked"):
        tokenize_all([chat(msgs, "data/x.jsonl:7")], tok, DataSection(template="chat"))
    # a conversation without an assistant turn
    with pytest.raises(DataError, match=r"data/x\.jsonl:8: every label is masked"):
        tokenize_all([chat(msgs[:1], "data/x.jsonl:8")], fresh_tokenizer(), DataSection(template="chat"))


def test_chat_template_required(tokenizer):
    tok = fresh_tokenizer(None)
    with pytest.raises(ModelError, match="data.template"):
        tokenize_all([chat(MULTI)], tok, DataSection(template="chat"))
    # raw cannot render chat data; auto without a template renders it in the plain format (test_gemma.py)
    with pytest.raises(ModelError, match="chat template"):
        tokenize_all([chat(MULTI)], tok, DataSection(template="raw"))
    ex, _ = tokenize_all([chat(MULTI)], tok, DataSection(template="auto"))
    assert "\nAnswer: " in tok.decode(ex[0].input_ids)
    ex, _ = tokenize_all([pc("a", "b")], tok, DataSection(template="auto"))
    assert ex[0].input_ids[-1] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------- length


def raw_cfg(**kw):
    return DataSection(template="raw", max_length=kw.pop("max_length", 16), **kw)


def test_overlong_prompt_is_left_truncated_answer_intact(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(40)) + "\nA:"
    full = tokenize_record(tokenizer, pc(long_prompt, " the answer"), False, raw_cfg())
    assert len(full.input_ids) > 16
    out, stats = tokenize_all([pc(long_prompt, " the answer")], tokenizer, raw_cfg())
    (ex,) = out
    assert len(ex.input_ids) == 16
    assert ex.input_ids == full.input_ids[-16:] and ex.labels == full.labels[-16:]
    assert trained_runs(tokenizer, ex) == [" the answer" + EOT]
    assert ex.labels[0] == IGNORE  # some prompt is left before the answer
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, [])
    assert stats.tokens == 16 and stats.trained_tokens == ex.n_trained


def test_answer_longer_than_max_length_is_dropped_and_counted(tokenizer):
    long_answer = " " + " ".join(f"w{i}" for i in range(30))
    recs = [pc("Q:", long_answer, "d.jsonl:1"), pc("Q:", " ok", "d.jsonl:2")]
    out, stats = tokenize_all(recs, tokenizer, raw_cfg())
    assert [e.source for e in out] == ["d.jsonl:2"]
    assert stats.dropped == ["d.jsonl:1"] and stats.examples == 1 and "1 dropped" in stats.summary()


def test_answer_needs_one_token_of_context(tokenizer):
    """Cutting the whole prompt would leave the answer's first token at position 0, where it is never a target."""
    ex = tokenize_record(tokenizer, pc("a b c", " x y"), False, raw_cfg())
    answer_start = next(t for t, lab in enumerate(ex.labels) if lab != IGNORE)
    fits = len(ex.input_ids) - answer_start + 1  # the answer plus one prompt token
    assert tokenize_all([pc("a b c", " x y")], tokenizer, raw_cfg(max_length=max(fits, 8)))[0]
    if fits - 1 >= 8:
        out, stats = tokenize_all([pc("a b c", " x y")], tokenizer, raw_cfg(max_length=fits - 1))
        assert out == [] and len(stats.dropped) == 1


def test_overlong_error_names_source_and_key(tokenizer):
    long_answer = " " + " ".join(f"w{i}" for i in range(30))
    with pytest.raises(DataError, match=r"d\.jsonl:3: .*data\.max_length=16"):
        tokenize_all([pc("Q:", long_answer, "d.jsonl:3")], tokenizer, raw_cfg(overlong="error"))


# ---------------------------------------------------------------------------------------------- inspect


def test_data_inspect_marks_trained_spans_and_counts(tmp_path, tokenizer, monkeypatch):
    from sftlab.data.inspect import inspect, render_marked

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))  # the model-folder hash memo goes here
    model_dir = tmp_path / "model"  # a tiny model folder: config + tokenizer are all `inspect` loads
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "vocab_size": %d}' % len(tokenizer))
    tokenizer.save_pretrained(str(model_dir))
    rows = [{"messages": [{"role": "user", "content": f"colour of item {i}?"},
                          {"role": "assistant", "content": ["red", "blue"][i % 2]}]} for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": " ".join(["long"] * 120)}]})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    # (conftest.tiny_config cannot override the `data` section: its `data` parameter is the data file)
    cfg = config_from_dict({
        "run": {"name": "run", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_length": 96, "packing": True, "eval_fraction": 0.3},
    })
    text = inspect(cfg, n=2, colour=False)

    assert text.count("--- example") == 2
    assert text.count("]]\n") >= 2 and "<|im_start|>assistant\n[[" in text
    assert ("[[red<|im_end|>]]\n" in text) or ("[[blue<|im_end|>]]\n" in text)
    assert "\x1b[" not in text
    train_line = next(line for line in text.splitlines() if line.startswith("train:"))
    assert "examples" in train_line and "trained tokens" in train_line and "% trained" in train_line
    assert "left-truncated" in train_line and "dropped as over-long" in train_line
    assert any(line.startswith("eval:") for line in text.splitlines())
    assert "1 dropped" in text and "train.jsonl:7" in text  # the 120-word answer cannot fit 96 tokens
    assert "packing:" in text and "row capacity" in text

    coloured = inspect(cfg, n=1, colour=True)
    assert "\x1b[1;32m" in coloured and "[[" not in coloured

    ex = Example([10, 11, 12, 13], [11, IGNORE, 12, 13], "s")  # labels[0] is never a target: not marked
    assert render_marked(tokenizer, ex) == tokenizer.decode([10, 11]) + "[[" + tokenizer.decode([12, 13]) + "]]"
