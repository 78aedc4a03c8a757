"""sftlab.data.votes / dumps: community votes -> preference pairs, on generated dumps shaped like the real ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.data.dumps import html_to_text
from sftlab.data.votes import PairRules, build_pairs
from sftlab.errors import DataError, SftlabError

T0 = 1_400_000_000  # created_utc of the first submission


# ---------------------------------------------------------------------------------------------- real shapes


def submission(sid: str, score: int = 50, created: int = T0, title: str = "How do I boil an egg?",
               selftext: str = "I want it soft &amp; runny.", author: str = "op_user", **kw) -> dict:
    """A Pushshift submission (RS_*) line, with the fields real dumps carry."""
    row = {"archived": False, "author": author, "author_flair_text": None, "created_utc": created,
           "distinguished": None, "domain": "self.AskCooking", "edited": False, "gilded": 0, "id": sid,
           "is_self": True, "name": f"t3_{sid}", "num_comments": 3, "over_18": False,
           "permalink": f"/r/AskCooking/comments/{sid}/x/", "removed_by_category": None, "retrieved_on": int(created) + 90000,
           "score": score, "selftext": selftext, "stickied": False, "subreddit": "AskCooking",
           "subreddit_id": "t5_2qh1i", "title": title, "ups": score, "url": f"https://www.reddit.com/r/AskCooking/{sid}"}
    row.update(kw)
    return row


def comment(cid: str, link: str, body: str, score: int, created: int, parent: str | None = None,
            author: str | None = None, **kw) -> dict:
    """A Pushshift comment (RC_*) line: parent_id t3_ = direct reply to the submission, t1_ = reply to a comment."""
    row = {"archived": False, "author": author or f"user_{cid}", "author_flair_text": None, "body": body,
           "controversiality": 0, "created_utc": created, "distinguished": None, "edited": False, "gilded": 0,
           "id": cid, "link_id": f"t3_{link}", "parent_id": parent or f"t3_{link}", "retrieved_on": int(created) + 90000,
           "score": score, "stickied": False, "subreddit": "AskCooking", "subreddit_id": "t5_2qh1i", "ups": score}
    row.update(kw)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def body(n: int) -> str:
    return f"Answer number {n}: boil the water first, then lower the egg in gently."


def run(tmp_path, rows_rc, rows_rs=(), name="pairs.jsonl", **rules):
    """Comments file first (in real use the RC file is often listed, or sorts, before RS)."""
    files = [write_jsonl(tmp_path / "RC_2015-01.jsonl", list(rows_rc))]
    if rows_rs:
        files.append(write_jsonl(tmp_path / "RS_2015-01.jsonl", list(rows_rs)))
    out = tmp_path / name
    report = build_pairs(files, out, PairRules(**rules))
    return [json.loads(line) for line in out.read_text().splitlines()], report


def ids(pairs) -> list[tuple[str, str]]:
    return [(p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in pairs]


# ---------------------------------------------------------------------------------------------- reddit


def test_reddit_pair_prompt_and_provenance(tmp_path):
    rc = [comment("c1", "a1", "Put it in water for a while.", 3, T0 + 100),
          comment("c2", "a1", "Boil water, add the egg &amp; wait six minutes.", 40, T0 + 200)]
    pairs, report = run(tmp_path, rc, [submission("a1")])
    assert len(pairs) == 1 and report.pairs == 1 and report.candidates == 1
    p = pairs[0]
    assert p["prompt"] == "How do I boil an egg?\n\nI want it soft & runny."  # entities unescaped
    assert p["chosen"] == "Boil water, add the egg & wait six minutes."
    assert p["rejected"] == "Put it in water for a while."
    assert p["meta"] == {"source": "reddit", "post_id": "t3_a1", "post_score": 50, "chosen_id": "t1_c2",
                         "rejected_id": "t1_c1", "chosen_score": 40, "rejected_score": 3,
                         "score_ratio": round(40 / 3, 4), "chosen_created": T0 + 200.0,
                         "rejected_created": T0 + 100.0}


def test_awkward_shapes(tmp_path):
    """Nested replies, a comment whose submission is missing, comments before their submission in the same
    file, string created_utc, no 'name', score only as ups/downs, a comment re-fetched with a new score."""
    rows = [
        comment("c1", "a1", body(1), 4, T0 + 100),
        comment("c2", "a1", body(2), 10, T0 + 200),
        comment("c3", "a1", body(3), 90, T0 + 300, parent="t1_c2"),  # nested: never paired, even with 90
        comment("x1", "gone", body(4), 50, T0 + 100),  # its submission is not in any input
        comment("x2", "gone", body(5), 5, T0 + 50),
        submission("a1"),  # after its comments in file order
        submission("b1", title="Why is bread dense?", created=str(T0)),  # created_utc as a string
        {k: v for k, v in comment("d1", "b1", body(6), 0, T0 + 100).items() if k not in ("score", "name")}
        | {"ups": 9, "downs": 6},  # old months: no score, ups - downs
        comment("d2", "b1", body(7), 20, str(T0 + 200)),
        # c1 fetched again later with its final score: now 30 (> c2), written first -> not_later
        comment("c1", "a1", body(1), 30, T0 + 100, retrieved_on=T0 + 999_999, edited=T0 + 5000),
        # ... and an older fetch read after it must not win back
        comment("c1", "a1", body(1), 4, T0 + 100, retrieved_on=T0 + 1),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out.jsonl"
    report = build_pairs([path], out, PairRules(min_score=1))
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert ids(pairs) == [("t1_d2", "t1_d1")]  # d1's score is 9 - 6 = 3; ratio 20/3
    assert pairs[0]["meta"]["rejected_score"] == 3 and pairs[0]["meta"]["chosen_created"] == T0 + 200.0
    assert report.reply_removed["nested"] == 1
    assert report.reply_removed["missing_post"] == 2
    assert report.replaced == 2  # c1 read three times, stored once
    assert report.pair_removed["not_later"] == 1  # c1 (30, earlier) vs c2 (10): the re-fetched score counts


def test_later_rule_and_allow_earlier(tmp_path):
    rc = [comment("c1", "a1", body(1), 40, T0 + 100),  # first and highest: its score may be its head start
          comment("c2", "a1", body(2), 5, T0 + 200)]
    pairs, report = run(tmp_path, rc, [submission("a1")])
    assert pairs == [] and report.pair_removed["not_later"] == 1
    pairs, _ = run(tmp_path, rc, [submission("a1")], name="b.jsonl", require_later=False)
    assert ids(pairs) == [("t1_c1", "t1_c2")]


def test_same_second_is_not_a_head_start(tmp_path):
    rc = [comment("c1", "a1", body(1), 40, T0 + 100), comment("c2", "a1", body(2), 5, T0 + 100)]
    pairs, _ = run(tmp_path, rc, [submission("a1")])
    assert ids(pairs) == [("t1_c1", "t1_c2")]


def test_min_scores_ratio_and_ties(tmp_path):
    rs = [submission("a1"), submission("low", score=9, title="A low post")]
    rc = [comment("c1", "a1", body(1), 1, T0 + 10),  # below min_score 2
          comment("c2", "a1", body(2), 10, T0 + 20),
          comment("c3", "a1", body(3), 10, T0 + 30),  # tie with c2
          comment("c4", "a1", body(4), 19, T0 + 40),  # 19/10 < 2
          comment("c5", "a1", body(5), 20, T0 + 50),  # 20/10 = 2: kept (twice), 20/19 < 2
          comment("l1", "low", body(6), 2, T0 + 10), comment("l2", "low", body(7), 50, T0 + 20)]
    pairs, report = run(tmp_path, rc, rs)
    assert sorted(ids(pairs)) == [("t1_c5", "t1_c2"), ("t1_c5", "t1_c3")]
    assert report.reply_removed["min_score"] == 1
    assert report.post_removed["min_post_score"] == 1 and report.reply_removed["post_dropped"] == 2
    assert report.candidates == 6  # 4 eligible replies to a1
    assert (report.pair_removed["tie"], report.pair_removed["min_ratio"]) == (1, 3)
    loose, _ = run(tmp_path, rc, rs, name="b.jsonl", min_post_score=None, min_score=None, min_ratio=1.0)
    assert ("t1_l2", "t1_l1") in ids(loose) and ("t1_c4", "t1_c2") in ids(loose) and ("t1_c2", "t1_c1") in ids(loose)


def test_length_ratio(tmp_path):
    rc = [comment("c1", "a1", "Yes.", 3, T0 + 10), comment("c2", "a1", "x" * 40, 30, T0 + 20),
          comment("c3", "a1", "y" * 10, 90, T0 + 30)]
    pairs, report = run(tmp_path, rc, [submission("a1")])
    # c2 (40 chars) vs c1 (4) and c3 (10) vs c2 (40) exceed 3x; c3 (10) vs c1 (4) does not
    assert ids(pairs) == [("t1_c3", "t1_c1")] and report.pair_removed["length_ratio"] == 2
    pairs, _ = run(tmp_path, rc, [submission("a1")], name="b.jsonl", max_length_ratio=None)
    assert len(pairs) == 3


def test_cap_keeps_the_largest_ratios(tmp_path):
    rc = [comment(f"c{i}", "a1", body(i), s, T0 + i) for i, s in enumerate([2, 3, 4, 5, 100])]
    pairs, report = run(tmp_path, rc, [submission("a1")], max_pairs_per_post=2, min_ratio=1.0)
    assert ids(pairs) == [("t1_c4", "t1_c0"), ("t1_c4", "t1_c1")]  # ratios 50, 33.3: best first
    assert report.pair_removed["cap"] == 8 and report.candidates == 10


def test_deleted_removed_bots_and_op(tmp_path):
    rs = [submission("a1"), submission("rm", selftext="[removed]", title="Removed post"),
          submission("mod", title="Removed by mods", removed_by_category="moderator")]
    rc = [comment("c1", "a1", body(1), 3, T0 + 10),
          comment("c2", "a1", "[deleted]", 50, T0 + 20, author="[deleted]"),
          comment("c3", "a1", "[removed]", 50, T0 + 21),
          comment("c4", "a1", body(4), 50, T0 + 22, author="AutoModerator"),
          comment("c5", "a1", body(5), 50, T0 + 23, author="haiku-bot"),
          comment("c6", "a1", body(6), 50, T0 + 24, author="friendly_helper"),  # in the --bots list
          comment("c7", "a1", "Here is a summary. *I am a bot, and this action was performed automatically.*", 50,
                  T0 + 25, author="summarizer"),
          comment("c8", "a1", body(8), 50, T0 + 26, distinguished="moderator", author="a_mod"),
          comment("c9", "a1", body(9), 50, T0 + 27, author="op_user"),  # the post's author
          comment("c10", "a1", body(10), 50, T0 + 28, author="[deleted]"),  # account gone, text kept
          comment("r1", "rm", body(11), 3, T0 + 10), comment("r2", "rm", body(12), 30, T0 + 20),
          comment("m1", "mod", body(13), 3, T0 + 10)]
    pairs, report = run(tmp_path, rc, rs, bots=("friendly_helper",))
    assert ids(pairs) == [("t1_c10", "t1_c1")]
    assert report.reply_removed["deleted"] == 2 and report.reply_removed["bot"] == 5
    assert report.reply_removed["op_reply"] == 1
    assert report.post_removed["deleted"] == 2 and report.reply_removed["post_dropped"] == 3
    pairs, report = run(tmp_path, rc, rs, name="b.jsonl", bots=("friendly_helper",), drop_deleted_authors=True,
                        drop_op_replies=False)
    assert ids(pairs) == [("t1_c9", "t1_c1")] and report.reply_removed["deleted_author"] == 1


def test_deleted_authors_are_not_the_op(tmp_path):
    rc = [comment("c1", "a1", body(1), 3, T0 + 10, author="[deleted]"),
          comment("c2", "a1", body(2), 30, T0 + 20, author="[deleted]")]
    pairs, report = run(tmp_path, rc, [submission("a1", author="[deleted]")])
    assert len(pairs) == 1 and report.reply_removed["op_reply"] == 0


def test_dedup_replies_and_pairs(tmp_path):
    rs = [submission("a1"), submission("a2", created=T0 + 5)]  # a cross-post: same title and text
    rc = [comment("c1", "a1", "Six minutes.", 3, T0 + 10), comment("c2", "a1", "Use  a  timer!", 30, T0 + 20),
          comment("c3", "a1", "use a timer!", 40, T0 + 30),  # the same text up to case and spacing
          comment("d1", "a2", "Six minutes.", 3, T0 + 10), comment("d2", "a2", "Use a timer!", 30, T0 + 20)]
    pairs, report = run(tmp_path, rc, rs)
    assert ids(pairs) == [("t1_c2", "t1_c1")]
    assert report.reply_removed["duplicate"] == 1 and report.pair_removed["duplicate"] == 1
    pairs, _ = run(tmp_path, rc, rs, name="b.jsonl", dedup=False)
    assert sorted(ids(pairs)) == [("t1_c2", "t1_c1"), ("t1_c3", "t1_c1"), ("t1_d2", "t1_d1")]  # c3/c2 < 2


def test_malformed_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "RC.jsonl"
    good = [comment("c1", "a1", body(1), 3, T0 + 10), comment("c2", "a1", body(2), 30, T0 + 20)]
    text = "".join(json.dumps(r) + "\n" for r in good) + json.dumps(submission("a1")) + "\n"
    path.write_text(text + '{"id": "c9", "body": "trunc', encoding="utf-8")  # a dump cut off mid-line
    out = tmp_path / "o.jsonl"
    report = build_pairs([path], out)
    assert report.pairs == 1 and report.malformed == 1 and report.first_malformed.startswith(f"{path}:4:")


def test_zst_with_pushshift_window(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps(r) + "\n" for r in [submission("a1"), comment("c1", "a1", body(1), 3, T0 + 10),
                                                   comment("c2", "a1", body(2), 30, T0 + 20)]).encode()
    # Pushshift: zstd --long=31, streamed (no content size), so the frame asks for a 2 GiB window
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31)
    path = tmp_path / "RC_2015-01.zst"
    with open(path, "wb") as fh, zstandard.ZstdCompressor(compression_params=params).stream_writer(fh) as w:
        w.write(raw)
    with pytest.raises(zstandard.ZstdError):  # the library's default limit refuses such files
        zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    report = build_pairs([path], tmp_path / "o.jsonl")
    assert report.pairs == 1


def test_zst_without_zstandard_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "RC.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    with pytest.raises(DataError, match=r"sftlab\[votes\]"):
        build_pairs([path], tmp_path / "o.jsonl", fmt="reddit")


# ---------------------------------------------------------------------------------------------- stackexchange


POSTS_XML = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" AcceptedAnswerId="3" CreationDate="2010-07-28T19:04:21.300" Score="25" ViewCount="900" Body="&lt;p&gt;How do I reverse a list &amp;amp; keep the original?&lt;/p&gt;&#xA;&#xA;&lt;pre&gt;&lt;code&gt;x = [1, 2]&#xA;    y = x&#xA;&lt;/code&gt;&lt;/pre&gt;&#xA;" OwnerUserId="8" LastActivityDate="2010-08-01T10:00:00.000" Title="Reverse a list" Tags="&lt;python&gt;&lt;list&gt;" AnswerCount="4" CommentCount="1" ContentLicense="CC BY-SA 2.5" />
  <row Id="2" PostTypeId="2" ParentId="1" CreationDate="2010-07-28T19:10:00.000" Score="3" Body="&lt;p&gt;Use a loop.&lt;/p&gt;" OwnerUserId="9" LastActivityDate="2010-07-28T19:10:00.000" CommentCount="0" ContentLicense="CC BY-SA 2.5" />
  <row Id="3" PostTypeId="2" ParentId="1" CreationDate="2010-07-28T20:00:00.000" Score="40" Body="&lt;p&gt;Use &lt;code&gt;reversed(x)&lt;/code&gt;:&lt;/p&gt;&#xA;&#xA;&lt;ul&gt;&#xA;&lt;li&gt;lazy&lt;/li&gt;&#xA;&lt;li&gt;no copy&lt;/li&gt;&#xA;&lt;/ul&gt;&#xA;" OwnerDisplayName="gone user" LastActivityDate="2010-07-28T20:00:00.000" CommentCount="2" ContentLicense="CC BY-SA 2.5" />
  <row Id="4" PostTypeId="2" ParentId="1" CreationDate="2010-07-29T08:00:00.000" Score="90" Body="&lt;p&gt;Community wiki.&lt;/p&gt;" OwnerUserId="-1" LastActivityDate="2010-07-29T08:00:00.000" CommentCount="0" ContentLicense="CC BY-SA 2.5" />
  <row Id="5" PostTypeId="5" CreationDate="2010-07-29T09:00:00.000" Score="0" Body="&lt;p&gt;Tag wiki&lt;/p&gt;" OwnerUserId="-1" LastActivityDate="2010-07-29T09:00:00.000" CommentCount="0" />
  <row Id="7" PostTypeId="2" ParentId="6" CreationDate="2010-07-29T10:00:00.000" Score="12" Body="&lt;p&gt;An answer before its question.&lt;/p&gt;" OwnerUserId="11" CommentCount="0" />
  <row Id="8" PostTypeId="2" ParentId="6" CreationDate="2010-07-29T11:00:00.000" Score="30" Body="&lt;p&gt;A later, better answer.&lt;/p&gt;" OwnerUserId="12" CommentCount="0" />
  <row Id="6" PostTypeId="1" CreationDate="2010-07-29T09:30:00.000" Score="11" Body="&lt;p&gt;Second question&lt;/p&gt;" OwnerUserId="10" Title="Q2" AnswerCount="2" CommentCount="0" />
  <row Id="9" PostTypeId="2" ParentId="404" CreationDate="2010-07-29T11:00:00.000" Score="30" Body="&lt;p&gt;Orphan.&lt;/p&gt;" OwnerUserId="12" CommentCount="0" />
</posts>
"""


def test_stackexchange_posts_xml(tmp_path):
    site = tmp_path / "python.stackexchange.com"
    site.mkdir()
    (site / "Posts.xml").write_text(POSTS_XML, encoding="utf-8")
    out = tmp_path / "o.jsonl"
    report = build_pairs([site / "Posts.xml"], out, PairRules(max_length_ratio=None))
    pairs = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda p: p["meta"]["post_id"])
    assert ids(pairs) == [("3", "2"), ("8", "7")]
    p = pairs[0]
    assert p["prompt"] == "Reverse a list\n\nHow do I reverse a list & keep the original?\n\n```\nx = [1, 2]\n    y = x\n```"
    assert p["chosen"] == "Use `reversed(x)`:\n\n- lazy\n- no copy"
    assert p["meta"]["site"] == "python.stackexchange.com" and p["meta"]["source"] == "stackexchange"
    assert p["meta"]["chosen_created"] - p["meta"]["rejected_created"] == 50 * 60
    assert report.reply_removed["bot"] == 1  # the Community user (-1)
    assert report.reply_removed["missing_post"] == 1
    assert report.posts == 2 and report.replies == 6  # the tag wiki row is neither


def test_html_to_text():
    assert html_to_text("<p>a &lt;b&gt; &amp;amp;</p><p>next<br/>line</p>") == "a <b> &amp;\n\nnext\nline"
    assert html_to_text("<pre><code>  indented\n\n  kept\n</code></pre>") == "```\n  indented\n\n  kept\n```"
    assert html_to_text('<p>see <a href="http://x">the docs</a> <img alt="diagram" src="y"></p>') == "see the docs diagram"
    assert html_to_text("plain text, no markup") == "plain text, no markup"


# ---------------------------------------------------------------------------------------------- threads


def test_threads_jsonl(tmp_path):
    rows = [{"id": "t1", "prompt": "Name a prime.", "score": 12, "replies": [
                {"id": "r1", "text": "Nine.", "score": 2, "created": 5, "author": "a",
                 "replies": [{"id": "r1a", "text": "Nine is 3 x 3.", "score": 99, "created": 6}]},
                {"id": "r2", "text": "Seven.", "score": 20, "created": 9, "author": "b"}]},
            {"prompt": "Name a colour.", "replies": [  # no id, score or times: list order is time order
                {"text": "Blue.", "score": 2}, {"text": "Red.", "score": 8}, {"text": "Green", "score": 100}]}]
    path = write_jsonl(tmp_path / "threads.jsonl", rows)
    out = tmp_path / "o.jsonl"
    report = build_pairs([path], out, PairRules(min_ratio=3.0))
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    got = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("Name a prime.", "Seven.", "Nine."), ("Name a colour.", "Red.", "Blue."),
                   ("Name a colour.", "Green", "Blue."), ("Name a colour.", "Green", "Red.")}
    assert report.reply_removed["nested"] == 1
    colour = next(p for p in pairs if p["chosen"] == "Red.")
    assert colour["meta"]["post_id"] == f"{path}:2" and colour["meta"]["post_score"] is None


# ---------------------------------------------------------------------------------------------- errors and CLI


def test_format_detection_errors(tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answers": []}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: cannot tell the format"):
        build_pairs([odd], tmp_path / "o.jsonl")
    with pytest.raises(DataError, match="file not found"):
        build_pairs([tmp_path / "nope.jsonl"], tmp_path / "o.jsonl")
    with pytest.raises(SftlabError, match="min_ratio"):
        PairRules(min_ratio=0.5)


def test_cli_prints_report(tmp_path, capsys):
    rc = write_jsonl(tmp_path / "RC.jsonl", [comment("c1", "a1", body(1), 3, T0 + 10),
                                             comment("c2", "a1", body(2), 30, T0 + 20)])
    rs = write_jsonl(tmp_path / "RS.jsonl", [submission("a1", score=5)])
    out = tmp_path / "p.jsonl"
    assert main(["pairs", str(rc), str(rs), "-o", str(out)]) == 0
    report = capsys.readouterr().out
    assert "0 pairs" in report and "min_post_score" in report
    assert main(["pairs", str(rc), str(rs), "-o", str(out), "--min-post-score", "none", "--bots", "x,y"]) == 0
    assert "1 pairs" in capsys.readouterr().out and len(out.read_text().splitlines()) == 1
    assert main(["pairs", str(rc), "-o", str(out), "--min-ratio", "lots"]) == 2
    assert "error: --min-ratio lots: expected a number" in capsys.readouterr().err


def test_output_reads_as_preference_data(tmp_path):
    from sftlab.config import DataSource
    from sftlab.data.preferences import read_preferences

    rc = [comment("c1", "a1", body(1), 3, T0 + 10), comment("c2", "a1", body(2), 30, T0 + 20)]
    pairs, _ = run(tmp_path, rc, [submission("a1")])
    recs = read_preferences(DataSource(path=str(tmp_path / "pairs.jsonl")))
    assert [(r.kind, r.chosen, r.rejected) for r in recs] == [("text", body(2), body(1))]


# ---------------------------------------------------------------------------------------------- memory


def write_reddit_dump(folder: Path, target_bytes: int) -> list[Path]:
    """RC (comments, written first) and RS files totalling about target_bytes: 12 direct replies and 3 nested
    ones per post, ~1.3 KB bodies; one post in 8 has a late high-scored reply, so some pairs survive."""
    filler = "Boil the water first, then lower the egg in gently with a spoon. " * 20
    rc, rs = open(folder / "RC.jsonl", "w"), open(folder / "RS.jsonl", "w")
    written, post = 0, 0
    while written < target_bytes:
        sid = f"p{post:x}"
        lines = [json.dumps(comment(f"{sid}c{k}", sid, f"{sid} {k}. {filler}", 10 + k, T0 + 60 * k)) for k in range(12)]
        if post % 8 == 0:
            lines.append(json.dumps(comment(f"{sid}w", sid, f"{sid} w. {filler}", 500, T0 + 9999)))
        lines += [json.dumps(comment(f"{sid}n{k}", sid, f"{sid} n{k}. {filler}", 50, T0 + 99, parent=f"t1_{sid}c0"))
                  for k in range(3)]
        chunk = "\n".join(lines) + "\n"
        sub = json.dumps(submission(sid, selftext=filler[:300])) + "\n"
        rc.write(chunk)
        rs.write(sub)
        written += len(chunk) + len(sub)
        post += 1
    rc.close()
    rs.close()
    return [folder / "RC.jsonl", folder / "RS.jsonl"]


CHILD = textwrap.dedent("""
    import json, sys, time
    from sftlab.data.votes import PairRules, build_pairs
    t = time.perf_counter()
    out = sys.argv[1]  # the on-disk index goes beside it: one filesystem, the one checked for free space
    r = build_pairs(sys.argv[2:], out, PairRules(max_pairs_per_post=1), index_dir=out.rsplit("/", 1)[0])
    # VmHWM: this process image's own peak. (ru_maxrss survives fork+exec: under a big pytest process it reports
    # the parent's size, 2.5 GB in a full-suite run, not the builder's.)
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(json.dumps({"peak_mb": hwm / 1024, "pairs": r.pairs,
                      "replies": r.replies, "s": time.perf_counter() - t}))
""")


def _peak(folder: Path, mb: int) -> dict:
    folder.mkdir()
    t = time.perf_counter()
    files = write_reddit_dump(folder, mb << 20)
    gen_s = time.perf_counter() - t
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder / "pairs.jsonl"), *map(str, files)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"gen_s": gen_s}
    for f in files:
        f.unlink()  # free the disk before the next size
    return result


# The largest dump (400 MB), its on-disk index (about as large again) and the pairs written: what the
# test needs free where pytest keeps its temporary folders.
DISK_NEEDED_MB = 1200


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_input(tmp_path):
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    assert free_mb >= DISK_NEEDED_MB, (
        f"this test writes a 400 MB Reddit dump and its on-disk index under {tmp_path}: it needs "
        f"{DISK_NEEDED_MB} MB free there and found {free_mb:.0f} MB; free disk space or point pytest's "
        "--basetemp at a larger filesystem")
    small = _peak(tmp_path / "small", 100)
    large = _peak(tmp_path / "large", 400)
    print(f"\n100 MB: {small}\n400 MB: {large}")
    assert large["replies"] > 3.5 * small["replies"] and large["pairs"] > 3.5 * small["pairs"] > 0
    assert small["peak_mb"] < 500 and large["peak_mb"] < 500
    assert large["peak_mb"] < 1.3 * small["peak_mb"] + 20
