"""Community votes -> preference pairs (prompt, chosen, rejected) for DPO.

Among the direct replies to one post, a reply that was written *later* than another and still has a
clearly higher score is preferred by the community: the earlier reply had more time and visibility to
collect votes, so its head start cannot explain the difference (the rule behind the Stanford Human
Preferences dataset, SHP: Ethayarajh, Choi & Swayamdipta, "Understanding Dataset Difficulty with
V-Usable Information", ICML 2022; the defaults below follow SHP's: post score >= 10, reply scores >= 2,
score ratio >= 2, at most 50 pairs per post).

Streaming: readers (`dumps.py`) yield one record at a time into an on-disk SQLite index (replies of a
post may come before the post, in another file, or twice with an updated score); pairs are then built
post by post from an index scan ordered by (post, time), so memory holds one post's replies at a time.
Pair deduplication is a table in the same index, not a Python set, so it does not grow in memory either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import re
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from ..errors import DataError, SftlabError
from . import dumps
from .dumps import Post, Reply

PROGRESS_MIN_BYTES = 64 << 20  # smaller inputs finish in seconds: no progress bar
BATCH = 5000  # rows per executemany


def _rule(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass
class PairRules:
    """Which (chosen, rejected) candidates become pairs. Each field is one rule; its CLI flag is named here."""

    min_post_score: int | None = _rule(10, "--min-post-score", "drop posts scored below this (none: no limit)")
    min_score: int | None = _rule(2, "--min-score", "drop replies scored below this (none: no limit)")
    min_ratio: float = _rule(2.0, "--min-ratio", "chosen score / rejected score at least this (a rejected "
                             "score <= 0 counts as an infinite ratio)")
    require_later: bool = _rule(True, "--allow-earlier", "(flag) also keep pairs whose chosen reply was written "
                                "before the rejected one (its higher score may be its head start)")
    max_pairs_per_post: int | None = _rule(50, "--max-pairs-per-post", "keep this many pairs per post, the "
                                           "largest score ratios first (none: all)")
    max_length_ratio: float | None = _rule(3.0, "--max-length-ratio", "drop pairs whose longer reply has more "
                                           "than this many times the shorter one's characters (none: no limit)")
    drop_op_replies: bool = _rule(True, "--keep-op-replies", "(flag) keep replies by the post's own author")
    drop_deleted_authors: bool = _rule(False, "--drop-deleted-authors", "(flag) drop replies whose author "
                                       "account is deleted (their text is kept by default)")
    bot_pattern: str = _rule(r"^automoderator$|bot$|[-_]bot[-_]", "--bot-pattern", "authors whose lowercased "
                             "name matches this regular expression are bots")
    bots: tuple[str, ...] = _rule((), "--bots", "comma list of more author names to treat as bots")
    # No leading \b: a pattern that starts with a literal is searched ~10x faster, and texts are long.
    bot_text_pattern: str = _rule(r"(?:i'm|i am) an? (?:ro)?bot\b", "--bot-text-pattern", "replies whose "
                                  "lowercased text matches this regular expression are bots")
    dedup: bool = _rule(True, "--no-dedup", "(flag) keep duplicate replies within a post and duplicate pairs")

    def __post_init__(self):
        if self.min_ratio < 1:
            raise SftlabError(f"min_ratio={self.min_ratio}: a ratio below 1 would prefer the lower score; use >= 1")
        for name in ("max_pairs_per_post", "max_length_ratio"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SftlabError(f"{name}={value}: must be at least 1 (or none for no limit)")
        for name in ("bot_pattern", "bot_text_pattern"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise SftlabError(f"{name}: not a regular expression ({e}); fix the pattern") from None
        self._bot = re.compile(self.bot_pattern)
        self._bot_text = re.compile(self.bot_text_pattern)
        self._bot_names = {b.lower() for b in self.bots}

    def is_bot(self, author: str, text: str, marked: bool) -> bool:
        author = author.lower()
        return (marked or (bool(author) and (author in self._bot_names or bool(self._bot.search(author))))
                or bool(self._bot_text.search(text.lower())))


# Report rows, in the order the rules apply; each candidate is counted once, by the first rule it fails.
POST_RULES = {"deleted": "deleted, removed or empty", "bot": "by a bot or moderator",
              "min_post_score": "score below --min-post-score"}
REPLY_RULES = {"nested": "not a direct reply (a reply to a reply)", "missing_post": "its post is not in the input",
               "post_dropped": "its post was dropped (above)", "deleted": "deleted, removed or empty",
               "deleted_author": "author account deleted", "bot": "by a bot or moderator",
               "op_reply": "by the post's author", "min_score": "score below --min-score",
               "duplicate": "same text as an earlier reply to the post"}
PAIR_RULES = {"tie": "equal scores", "not_later": "the higher-scored reply was written first",
              "min_ratio": "score ratio below --min-ratio", "length_ratio": "length ratio above --max-length-ratio",
              "cap": "over --max-pairs-per-post", "duplicate": "same prompt, chosen and rejected as an earlier pair"}


@dataclass
class Report:
    posts: int = 0  # post records read (a record read twice counts twice)
    replies: int = 0  # reply records read, nested ones included
    replaced: int = 0  # records that were read again (a later fetch replaced the earlier one)
    malformed: int = 0
    first_malformed: str = ""
    candidates: int = 0  # unordered pairs of eligible replies to the same post
    pairs: int = 0
    post_removed: Counter = field(default_factory=Counter)
    reply_removed: Counter = field(default_factory=Counter)
    pair_removed: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------------- public API


def build_pairs(inputs: list[str | Path], output: str | Path, rules: PairRules | None = None, fmt: str = "auto",
                index_dir: str | Path | None = None, progress: bool = False) -> Report:
    """Read every input, write pairs as JSON lines to `output` (atomically), return the per-rule report."""
    rules = rules or PairRules()
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: file not found")
    if fmt not in ("auto", *dumps.FORMATS):
        raise DataError(f"--format {fmt}: unknown; use auto, {', '.join(dumps.FORMATS)}")
    formats = [dumps.detect(p) if fmt == "auto" else fmt for p in paths]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="sftlab-pairs-", dir=index_dir) as tmp:
        db = _open_index(Path(tmp) / "index.sqlite")
        try:
            _ingest(db, list(zip(paths, formats)), report, progress)
            partial = output.with_name(output.name + ".partial")
            try:
                with open(partial, "w", encoding="utf-8") as out:
                    for record in _pairs(db, rules, report, progress):
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                os.replace(partial, output)  # a reader never sees half a file
            finally:
                partial.unlink(missing_ok=True)
        finally:
            db.commit()
            db.close()
    return report


def format_report(report: Report, output: str | Path) -> str:
    lines = [f"sftlab pairs: {report.pairs} pairs -> {output}",
             f"  read {report.posts} posts and {report.replies} replies"
             + (f" ({report.replaced} read again: the later fetch kept)" if report.replaced else "")]
    if report.malformed:
        lines.append(f"  skipped {report.malformed} malformed lines/rows; the first: {report.first_malformed}")
    for title, rules, counts in (("posts removed", POST_RULES, report.post_removed),
                                 ("replies removed", REPLY_RULES, report.reply_removed),
                                 (f"pairs: {report.candidates} candidates, removed", PAIR_RULES,
                                  report.pair_removed)):
        lines.append(f"  {title}:")
        lines += [f"    {counts[k]:>10}  {k:<15} {why}" for k, why in rules.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- index


_COLUMNS = "key, source, id, post_key, text, score, created, author, removed, bot, retrieved"


def _open_index(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    # A scratch file: no journal or fsync (a crash loses nothing that a rerun cannot rebuild); a bounded page
    # cache, so SQLite's memory does not grow with the input.
    db.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -32000; PRAGMA temp_store = FILE;
        CREATE TABLE items (key TEXT PRIMARY KEY, source TEXT, id TEXT, post_key TEXT, text TEXT,
                            score INTEGER, created REAL, author TEXT, removed INTEGER, bot INTEGER,
                            retrieved REAL) WITHOUT ROWID;
        CREATE TABLE seen (hash BLOB PRIMARY KEY) WITHOUT ROWID;
    """)
    return db


# A record read again (Pushshift re-fetches, overlapping dumps) replaces the stored one unless it is an
# older fetch: the later fetch has the later score.
_UPSERT = (f"INSERT INTO items ({_COLUMNS}) VALUES ({', '.join('?' * 11)}) ON CONFLICT(key) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])
           + " WHERE excluded.retrieved >= items.retrieved")


def _row(item: Post | Reply) -> tuple:
    if isinstance(item, Post):  # a post is its own thread: post_key NULL marks it as the post
        return (item.key, item.source, item.id, None, item.prompt, item.score, item.created, item.author,
                item.removed, item.bot, item.retrieved)
    return (item.key, None, item.id, item.post_key, item.text, item.score, item.created, item.author,
            item.removed, item.bot, item.retrieved)


def _ingest(db: sqlite3.Connection, files: list[tuple[Path, str]], report: Report, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for p, _ in files)
    stats: dict = {}
    stored = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="indexing", disable=not progress or
              total < PROGRESS_MIN_BYTES) as bar:
        batch: list[tuple] = []
        for path, fmt in files:
            for item in dumps.read(path, fmt, stats, bar.update):
                if isinstance(item, Post):
                    report.posts += 1
                else:
                    report.replies += 1
                    if not item.direct:  # never a candidate: not stored at all
                        report.reply_removed["nested"] += 1
                        continue
                batch.append(_row(item))
                stored += 1
                if len(batch) >= BATCH:
                    db.executemany(_UPSERT, batch)
                    batch.clear()
        db.executemany(_UPSERT, batch)
    # After the bulk load: one sort instead of index maintenance on every insert.
    db.execute("CREATE INDEX by_post ON items (post_key, created, key)")
    db.commit()
    report.replaced = stored - db.execute("SELECT count(*) FROM items").fetchone()[0]
    report.malformed = stats.get("malformed", 0)
    report.first_malformed = stats.get("first_malformed", "")


# ---------------------------------------------------------------------------------------------- pairs


def _pairs(db: sqlite3.Connection, rules: PairRules, report: Report, progress: bool):
    """Pair records, post by post, in post-key order."""
    from tqdm.auto import tqdm

    n_posts = db.execute("SELECT count(DISTINCT post_key) FROM items WHERE post_key IS NOT NULL").fetchone()[0]
    scan = db.execute(f"SELECT {_COLUMNS} FROM items WHERE post_key IS NOT NULL ORDER BY post_key, created, key")
    lookup = db.cursor()
    posts = groupby(scan, key=lambda row: row[3])
    for post_key, rows in tqdm(posts, total=n_posts, desc="pairing", unit="post",
                               disable=not progress or n_posts < 10_000):
        replies = [_reply(row) for row in rows]  # oldest first
        post_row = lookup.execute(f"SELECT {_COLUMNS} FROM items WHERE key = ?", (post_key,)).fetchone()
        post = _post(post_row) if post_row else None
        why = _post_verdict(post, rules) if post else "missing"
        if why:
            if post:
                report.post_removed[why] += 1
            report.reply_removed["missing_post" if why == "missing" else "post_dropped"] += len(replies)
            continue
        eligible = _eligible(post, replies, rules, report)
        prompt = _digest(post.prompt) if rules.dedup else b""
        for chosen, rejected, ratio in _post_pairs(post, list(eligible), rules, report):
            if rules.dedup and _seen(db, prompt + eligible[chosen] + eligible[rejected]):
                report.pair_removed["duplicate"] += 1
                continue
            report.pairs += 1
            yield _record(post, chosen, rejected, ratio)


def _post(row: tuple) -> Post:
    key, source, pid, _, prompt, score, created, author, removed, bot, retrieved = row
    return Post(key, source, pid, prompt, score, created, author, bool(removed), bool(bot), retrieved)


def _reply(row: tuple) -> Reply:
    key, _, rid, post_key, text, score, created, author, removed, bot, retrieved = row
    return Reply(key, rid, post_key, True, text, score, created, author, bool(removed), bool(bot), retrieved)


def _post_verdict(post: Post, rules: PairRules) -> str | None:
    if post.removed or not post.prompt.strip():
        return "deleted"
    if rules.is_bot(post.author, "", post.bot):
        return "bot"
    if rules.min_post_score is not None and post.score is not None and post.score < rules.min_post_score:
        return "min_post_score"
    return None


def _reply_verdict(post: Post, reply: Reply, rules: PairRules) -> str | None:
    if reply.removed or not reply.text.strip():
        return "deleted"
    if rules.drop_deleted_authors and not reply.author:
        return "deleted_author"
    if rules.is_bot(reply.author, reply.text, reply.bot):
        return "bot"
    if rules.drop_op_replies and reply.author and reply.author == post.author:  # two deleted authors differ
        return "op_reply"
    if rules.min_score is not None and reply.score < rules.min_score:
        return "min_score"
    return None


def _digest(text: str) -> bytes:
    """Identity of a text for deduplication: case and whitespace do not count."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def _eligible(post: Post, replies: list[Reply], rules: PairRules, report: Report) -> dict[Reply, bytes]:
    """The replies that may take part in pairs (oldest first) -> their text digests (b"" without dedup);
    of replies with the same text, the first stays."""
    out: dict[Reply, bytes] = {}
    seen: set[bytes] = set()
    for r in replies:
        why = _reply_verdict(post, r, rules)
        digest = _digest(r.text) if why is None and rules.dedup else b""
        if digest:
            why = "duplicate" if digest in seen else None
            seen.add(digest)
        if why:
            report.reply_removed[why] += 1
        else:
            out[r] = digest
    return out


def _judge(a: Reply, b: Reply, rules: PairRules) -> tuple[str, Reply, Reply, float]:
    """Verdict on replies a and b (a written no later than b): ("", chosen, rejected, ratio) or (rule, ...)."""
    if a.score == b.score:
        return "tie", a, b, 1.0
    chosen, rejected = (a, b) if a.score > b.score else (b, a)
    if rules.require_later and chosen is a and a.created < b.created:
        return "not_later", chosen, rejected, 0.0
    ratio = chosen.score / rejected.score if rejected.score > 0 else math.inf
    if ratio < rules.min_ratio:
        return "min_ratio", chosen, rejected, ratio
    if rules.max_length_ratio is not None:
        long, short = sorted((len(a.text), len(b.text)), reverse=True)
        if long > rules.max_length_ratio * max(short, 1):
            return "length_ratio", chosen, rejected, ratio
    return "", chosen, rejected, ratio


def _post_pairs(post: Post, replies: list[Reply], rules: PairRules, report: Report) -> list[tuple]:
    """Surviving (chosen, rejected, ratio) of one post, largest ratio first, at most max_pairs_per_post."""
    cap = rules.max_pairs_per_post
    heap: list[tuple] = []  # min-heap on (ratio, chosen score, -order): the weakest kept pair pops first
    order = 0
    for i, a in enumerate(replies):
        for b in replies[i + 1:]:
            report.candidates += 1
            why, chosen, rejected, ratio = _judge(a, b, rules)
            if why:
                report.pair_removed[why] += 1
                continue
            order += 1
            heapq.heappush(heap, (ratio, chosen.score, -order, chosen, rejected))
            if cap is not None and len(heap) > cap:
                heapq.heappop(heap)
                report.pair_removed["cap"] += 1
    return [(c, r, ratio) for ratio, _, _, c, r in sorted(heap, key=lambda h: h[:3], reverse=True)]


def _seen(db: sqlite3.Connection, key: bytes) -> bool:
    """Whether this pair was written before (and remember it): the set lives on disk, not in memory."""
    return db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key,)).rowcount == 0


def _record(post: Post, chosen: Reply, rejected: Reply, ratio: float) -> dict:
    meta = {"source": post.source, "post_id": post.id, "post_score": post.score,
            "chosen_id": chosen.id, "rejected_id": rejected.id,
            "chosen_score": chosen.score, "rejected_score": rejected.score,
            "score_ratio": None if math.isinf(ratio) else round(ratio, 4),
            "chosen_created": chosen.created, "rejected_created": rejected.created}
    if post.source == "stackexchange":
        meta["site"] = post.key.split(":")[1]
    return {"prompt": post.prompt, "chosen": chosen.text, "rejected": rejected.text, "meta": meta}


# ---------------------------------------------------------------------------------------------- CLI glue


def add_rule_arguments(parser) -> None:
    """One CLI option per PairRules field, help text from the field's documentation."""
    for f in dataclasses.fields(PairRules):
        flag, help = f.metadata["flag"], f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const=not f.default,
                                default=f.default, help=help.removeprefix("(flag) "))
        else:
            shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            parser.add_argument(flag, dest=f.name, default=f.default, metavar="X",
                                help=f"{help} (default: {'none' if shown in (None, '') else shown})")


def rules_from_args(args) -> PairRules:
    values = {}
    for f in dataclasses.fields(PairRules):
        value = getattr(args, f.name)
        if isinstance(value, str) and f.type != "str":
            value = _parse_option(f, value)
        values[f.name] = value
    return PairRules(**values)


def _parse_option(f: dataclasses.Field, text: str):
    if f.type.startswith("tuple"):
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if "None" in f.type and text.strip().lower() in ("none", "off", ""):
        return None
    kind = int if f.type.startswith("int") else float
    try:
        return kind(text)
    except ValueError:
        raise SftlabError(f"{f.metadata['flag']} {text}: expected {'an integer' if kind is int else 'a number'}"
                          + (" or none" if "None" in f.type else "")) from None
