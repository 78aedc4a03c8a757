"""sftlab.data.formats: files -> records, and one-line errors that name the place and the fix."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter

import pytest

from sftlab.config import DataSource
from sftlab.data.formats import Record, detect_format, load_records, read_source
from sftlab.errors import DataError


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def src(path, **kw):
    return DataSource(path=str(path), **kw)


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_each_format(tmp_path):
    rows = {
        "pc": {"prompt": "2+2=", "completion": "4"},
        "chat": CHAT,
        "alpaca": {"instruction": "Add", "input": "2 and 2", "output": "4"},
        "alpaca_no_input": {"instruction": "Say hi", "input": "", "output": "hi"},
        "text": {"text": "some plain text"},
    }
    for name, row in rows.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n" + json.dumps(row) + "\n\n" + json.dumps(row) + "\n", encoding="utf-8")  # blanks skipped
        recs = read_source(src(p))
        assert [r.source for r in recs] == [f"{p}:2", f"{p}:4"]
        r = recs[0]
        if name == "pc":
            assert (r.kind, r.prompt, r.completion) == ("prompt_completion", "2+2=", "4")
        elif name == "chat":
            assert r.kind == "chat" and r.messages == CHAT["messages"]
        elif name == "alpaca":
            assert (r.kind, r.prompt, r.completion) == ("prompt_completion", "Add\n\n2 and 2", "4")
        elif name == "alpaca_no_input":
            assert (r.prompt, r.completion) == ("Say hi", "hi")
        else:
            assert (r.kind, r.text) == ("text", "some plain text")


def test_jsonl_gz_and_bom(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(gzip.compress(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n'))
    assert [r.text for r in read_source(src(p))] == ["a", "b"]


def test_json_list_and_data_key(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "d"}]))
    recs = read_source(src(p))
    assert [(r.prompt, r.completion, r.source) for r in recs] == [("a", "b", f"{p}:item 1"), ("", "d", f"{p}:item 2")]
    q = tmp_path / "wrapped.json"
    q.write_text(json.dumps({"version": 1, "data": [{"text": "x"}]}))
    assert read_source(src(q))[0].text == "x"


def test_csv(tmp_path):
    p = tmp_path / "t.csv"
    big = "x" * 200_000  # beyond csv's default field size limit
    p.write_text(f'prompt, completion\n"a, with comma","multi\nline"\nq,{big}\n', encoding="utf-8")
    recs = read_source(src(p))
    assert [(r.prompt, r.completion[:5]) for r in recs] == [("a, with comma", "multi"), ("q", "xxxxx")]
    assert [r.source for r in recs] == [f"{p}:row 2", f"{p}:row 3"]
    assert len(recs[1].completion) == 200_000


def test_csv_chat_cell_holds_json(tmp_path):
    p = tmp_path / "chat.csv"
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    p.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert read_source(src(p))[0].messages == CHAT["messages"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), p)
    recs = read_source(src(p))
    assert [r.source for r in recs] == [f"{p}:row 0", f"{p}:row 1"]
    assert recs[0].kind == "chat" and recs[0].messages == CHAT["messages"]
    q = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", "d"]}), q)
    assert [r.completion for r in read_source(src(q))] == ["c", "d"]


def test_sharegpt_mapping(tmp_path):
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "function", "value": "t"},
            {"from": "gpt", "value": "a"}, {"from": "observation", "value": "o"}, {"role": "assistant", "content": "b"}]
    p = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    r = read_source(src(p))[0]
    assert r.kind == "chat"
    assert [(m["role"], m["content"]) for m in r.messages] == [
        ("system", "s"), ("user", "u"), ("tool", "t"), ("assistant", "a"), ("tool", "o"), ("assistant", "b")]


def test_column_mapping(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 3}])
    r = read_source(src(p, columns={"question": "prompt", "answer": "completion"}))[0]
    assert (r.kind, r.prompt, r.completion) == ("prompt_completion", "q", "a")
    # a mapped field wins over an existing one of the same name
    p2 = write_jsonl(tmp_path / "t.jsonl", [{"text": "old", "body": "new"}])
    assert read_source(src(p2, columns={"body": "text"}))[0].text == "new"


def test_conversational_prompt_completion(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    p = write_jsonl(tmp_path / "c.jsonl", [row])
    r = read_source(src(p))[0]
    assert r.kind == "chat"
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_enforced_format(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o", "text": "ignored"}])
    assert read_source(src(p, format="alpaca"))[0].completion == "o"
    assert read_source(src(p, format="text"))[0].text == "ignored"


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"conversations": [], "text": ""}) == "chat"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    assert detect_format({"text": ""}) == "text"
    with pytest.raises(ValueError, match=r"fields \[prompt, answer\]") as e:
        detect_format({"prompt": "", "answer": ""})
    assert not isinstance(e.value, DataError)


def test_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = read_source(src(tmp_path / "ds"))
    assert [(r.prompt, r.completion) for r in recs] == [("a", "b"), ("c", "d")]
    assert recs[1].source == f"{tmp_path / 'ds'}[train]:row 1"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert len(read_source(src(tmp_path / "dd", split="test"))) == 2
    with pytest.raises(DataError, match=r"no split 'train'; it has test"):
        read_source(src(tmp_path / "dd"))


# ---------------------------------------------------------------------------------------------- mixing


def test_mixing_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(3)])
    recs = load_records([src(a, weight=0.5), src(b, weight=2.0)], seed=1)
    texts = [r.text for r in recs]
    assert len(texts) == 5 + 6
    half = texts[:5]
    assert len(set(half)) == 5 and all(t.startswith("a") for t in half)
    assert half == sorted(half, key=lambda t: int(t[1:]))  # file order kept
    assert Counter(texts[5:]) == {"b0": 2, "b1": 2, "b2": 2}
    assert [r.text for r in load_records([src(a, weight=0.5), src(b, weight=2.0)], seed=1)] == texts
    other = {tuple(r.text for r in load_records([src(a, weight=0.5)], seed=s)) for s in range(5)}
    assert len(other) > 1  # the seed picks the subset
    frac = Counter(r.text for r in load_records([src(a, weight=1.5)], seed=0))
    assert sum(frac.values()) == 15 and sorted(frac.values()) == [1] * 5 + [2] * 5
    assert len(load_records([src(b, weight=0.01)], seed=0)) == 1  # a weight > 0 keeps at least one


def test_no_sources():
    with pytest.raises(DataError, match="no data sources"):
        load_records([], seed=0)


# ---------------------------------------------------------------------------------------------- errors

PC = '{"prompt": "p", "completion": "c"}'
PC_AND_ASSISTANT = '{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}'

# (file name, content, DataSource options, place after the path, words the message must hold)
BAD = [
    ("broken.jsonl", f'{PC}\n{{"prompt": "p",\n', {}, ":2", ["not valid JSON", "each line must be one JSON object"]),
    ("list.jsonl", f"{PC}\n\n[1, 2]\n", {}, ":3", ["expected a JSON object", "a list", "each line"]),
    ("missing.jsonl", '{"prompt": "p"}\n', {"format": "prompt_completion"}, ":1",
     ["missing field 'completion'", "columns"]),
    ("null.jsonl", f'{PC}\n{PC}\n{{"prompt": "p", "completion": null}}\n', {}, ":3",
     ["'completion' is null", "expected a string", "fix"]),
    ("number.jsonl", '{"prompt": "p", "completion": 4}\n', {}, ":1", ["'completion' is a number", "fix"]),
    ("nullprompt.jsonl", '{"prompt": null, "completion": "c"}\n', {}, ":1", ["'prompt' is null", "fix"]),
    ("empty_completion.jsonl", f'{PC}\n{{"prompt": "p", "completion": "  "}}\n', {}, ":2",
     ["empty completion", "fill it in"]),
    ("role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', {}, ":1",
     ["unknown role 'bot'", "allowed roles: system, user, assistant, tool"]),
    ("no_assistant.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {}, ":1",
     ["no assistant turn: nothing to train on", "add the assistant"]),
    ("empty_assistant.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     {}, ":1", ["empty content", "fill it in"]),
    ("bytes.jsonl", PC.encode() + b'\n{"text": "caf\xe9"}\n', {}, ":2", [f"byte 0xe9 at byte offset {len(PC) + 14}", "re-save", "UTF-8"]),
    ("bytes.csv", b"text\nok\nbad \xff\n", {}, ":3", ["not valid UTF-8", "re-save"]),
    ("mixed.jsonl", f'{PC}\n{{"text": "t"}}\n', {}, ":2",
     ["this row is text but earlier rows are prompt_completion", "keep one format per file"]),
    ("empty.jsonl", "\n\n", {}, "", ["no records", "add data"]),
    ("content.jsonl", '{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]}',
     {}, ":1", ["messages[0] content[0] is a string", "expected a part like"]),
    ("content_null.jsonl", '{"conversations": [{"from": "human", "value": null}]}', {}, ":1",
     ["conversations[0] content is null", "expected a string"]),
    ("no_content.jsonl", '{"messages": [{"role": "user"}]}', {}, ":1", ["has no 'content'", "add the message text"]),
    ("fields.jsonl", '{"question": "q", "answer": "a"}\n', {}, ":1",
     ["cannot tell the format from fields [question, answer]", "data.train[].columns"]),
    ("col.csv", "prompt,answer\np,a\n", {"format": "prompt_completion"}, ":row 2",
     ["missing field 'completion'", "data.train[].columns"]),
    ("col_auto.csv", "prompt,answer\np,a\n", {}, ":row 2", ["cannot tell the format", "columns"]),
    ("cells.csv", "prompt,completion\np,c\np,c,extra\n", {}, ":row 3", ["3 cells", "quote"]),
    ("item.json", f"[{PC}, 7]", {}, ":item 2", ["expected a JSON object", "make every item"]),
    ("syntax.json", f"[\n{PC},\n{{oops}}\n]", {}, ":3", ["not valid JSON", "fix the syntax"]),
    ("lines.json", f"{PC}\n{PC}\n", {}, ":2", ["not valid JSON", "rename it to .jsonl"]),
    ("half_conv.jsonl", '{"prompt": [{"role": "user", "content": "u"}], "completion": "c"}', {}, ":1",
     ["'completion' is a string", "two strings or two lists"]),
    ("conv_no_assistant.jsonl", '{"prompt": [], "completion": [{"role": "user", "content": "c"}]}', {}, ":1",
     ["no assistant message", "assistant's reply"]),
    ("not_list.jsonl", '{"messages": "hello"}', {}, ":1", ["'messages' is a string", "expected a list of messages"]),
    ("alpaca.jsonl", '{"instruction": "i", "output": ""}', {}, ":1", ["empty output", "fill it in"]),
    ("enforced.jsonl", f"{PC}\n", {"format": "chat"}, ":1", ["missing field 'messages'", "columns"]),
    ("role_null.jsonl", f'{{"messages": [{PC_AND_ASSISTANT}, {{"content": "x"}}]}}', {}, ":1",
     ["messages[2] has no 'role'", "add one"]),
    ("notes.txt", "hello\n", {}, "", ["unsupported file type", ".jsonl"]),
]


@pytest.mark.parametrize("name,content,opts,place,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, content, opts, place, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_source(src(path, **opts))
    msg = str(e.value)
    assert msg.startswith(f"{path}{place}:"), msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_parquet_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", None]}), p)
    with pytest.raises(DataError, match=rf"^{p}:row 1: 'completion' is null; expected a string"):
        read_source(src(p))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file.*re-export"):
        read_source(src(tmp_path / "junk.parquet"))


def test_missing_file(tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path / "sub" / "data"):
        with pytest.raises(DataError) as e:
            read_source(src(path))
        assert str(e.value) == f"{path}: file not found; check data.train[].path " \
                               "(relative paths start at the current directory)"
    with pytest.raises(DataError, match=r"^data/x\.csv: file not found"):
        read_source(src("data/x.csv"))


def test_bad_gzip(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(b"plain text")
    with pytest.raises(DataError, match=rf"^{p}: cannot read it .*gzip"):
        read_source(src(p))


def test_no_torch_import():
    code = "import sys, sftlab.data.formats; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_record_defaults():
    r = Record(kind="text", source="x:1", text="t")
    assert (r.prompt, r.completion, r.messages) == (None, None, None)
