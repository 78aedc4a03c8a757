"""sftlab.data.preferences.read_preferences: preference pairs (standard and TRL conversational) for DPO."""

from __future__ import annotations

import json

import pytest

from sftlab.config import DataSource
from sftlab.data.formats import load_records
from sftlab.data.preferences import read_preferences
from sftlab.errors import DataError

U = {"role": "user", "content": "2+2?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}


def read(tmp_path, rows, **kw):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return read_preferences(DataSource(path=str(path), **kw))


def test_standard_pairs_ignore_extra_fields(tmp_path):
    recs = read(tmp_path, [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "meta": {"post_id": "t3_x"}}])
    assert [(r.kind, r.prompt, r.chosen, r.rejected) for r in recs] == [("text", "2+2=", "4", "5")]
    assert recs[0].source.endswith("prefs.jsonl:1")


def test_conversational_explicit_and_implicit_prompt(tmp_path):
    sys_msg = {"role": "system", "content": "be exact"}
    recs = read(tmp_path, [{"prompt": [U], "chosen": [A4], "rejected": [A5]},
                           {"chosen": [sys_msg, U, A4], "rejected": [sys_msg, U, A5]}])
    assert (recs[0].kind, recs[0].prompt, recs[0].chosen, recs[0].rejected) == ("chat", [U], [A4], [A5])
    assert (recs[1].prompt, recs[1].chosen, recs[1].rejected) == ([sys_msg, U], [A4], [A5])


def test_sharegpt_roles_and_column_mapping(tmp_path):
    row = {"question": [{"from": "human", "value": "2+2?"}], "good": [{"from": "gpt", "value": "4"}],
           "bad": [{"from": "gpt", "value": "5"}]}
    recs = read(tmp_path, [row], columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert (recs[0].prompt, recs[0].chosen, recs[0].rejected) == ([U], [A4], [A5])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, r"prefs.jsonl:1: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"the same text"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"empty chosen"),
    ({"prompt": "q", "chosen": [A4], "rejected": "5"}, r"'chosen' is a list .* but 'rejected' is a string"),
    ({"prompt": "q", "chosen": [A4], "rejected": [A5]}, r"'prompt' is a string .* make the prompt a list"),
    ({"prompt": [U], "chosen": [U], "rejected": [A5]}, r"'chosen' must end with a non-empty assistant message"),
    ({"prompt": [U], "chosen": [A4], "rejected": [A4]}, r"the same messages"),
    ({"prompt": [U], "chosen": [{"role": "robot", "content": "4"}], "rejected": [A5]}, r"unknown role 'robot'"),
])
def test_errors_name_the_line_and_the_fix(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        read(tmp_path, [row])


def test_empty_source(tmp_path):
    with pytest.raises(DataError, match="no preference pairs"):
        read(tmp_path, [])


def test_sft_refuses_preference_files_with_a_hint(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs.jsonl:1: this is a preference pair .* not SFT"):
        load_records([DataSource(path=str(path))], seed=0)
