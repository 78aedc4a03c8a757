"""Community-vote dumps -> a stream of posts and replies, one record at a time.

Three formats, all read streaming (nothing here holds more than one record, so a 400 GB dump needs no
more memory than a 4 KB one):

- reddit: Pushshift JSON lines (`RS_*` submissions, `RC_*` comments; plain, `.gz` or `.zst`). Submissions have
  `id`, `title`, `selftext`; comments have `id`, `parent_id` (`t3_X` = a direct reply to submission X,
  `t1_Y` = a reply to comment Y), `link_id` (`t3_X`), `body`. Both: `score` (older months: `ups`/`downs`),
  `created_utc` (an int, or a string in some months), `author` (`[deleted]` once the account is gone),
  `retrieved_on`/`retrieved_utc` (when Pushshift fetched it: a record seen twice keeps the later fetch).
- stackexchange: `Posts.xml` from the archive.org dumps: `<row Id PostTypeId ParentId Score CreationDate
  Body Title OwnerUserId .../>`; questions (PostTypeId 1) are posts, answers (2) are their direct replies.
- threads: JSON lines, one thread a line: `{"id", "prompt", "score", "created", "replies": [{"id", "text",
  "score", "created", "author", "replies": [...]}]}`; replies inside replies are nested (not direct).

Text comes out as plain text: Reddit's HTML entities are unescaped; StackExchange's HTML is rendered
with paragraphs, lists and code blocks kept (`html_to_text`).
"""

from __future__ import annotations

import gzip
import html
import io
import itertools
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError

FORMATS = ("reddit", "stackexchange", "threads")
MARKERS = ("[deleted]", "[removed]")  # what Reddit leaves in place of deleted or moderator-removed text
# Reddit moderators' comments ("distinguished") and pinned ones are not community answers.
STAFF = ("moderator", "admin")


@dataclass(slots=True, eq=False)  # identity: replies key dicts
class Post:
    key: str  # unique across all inputs: "reddit:t3_abc", "stackexchange:cooking:12", "threads:42"
    source: str  # "reddit" | "stackexchange" | "threads"
    id: str  # the id as the dump spells it (provenance)
    prompt: str
    score: int | None  # None: the format has none (threads may omit it)
    created: float | None  # unix seconds
    author: str  # "" when unknown or deleted
    removed: bool  # deleted, removed by moderators, or nothing left to answer
    bot: bool = False  # the format itself marks the author as a bot or moderator
    retrieved: float = 0.0  # a record seen again replaces this one only if retrieved no earlier


@dataclass(slots=True, eq=False)  # identity: replies key dicts
class Reply:
    key: str
    id: str
    post_key: str  # the Post.key of the thread it belongs to
    direct: bool  # a direct reply to the post (not a reply to a reply)
    text: str
    score: int
    created: float | None
    author: str
    removed: bool
    bot: bool = False
    retrieved: float = 0.0


class Counted:
    """A binary file being read, with the bytes consumed so far (for a progress bar)."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb")

    def done(self) -> int:
        return self.raw.tell()


# ---------------------------------------------------------------------------------------------- detection


def detect(path: Path) -> str:
    """The format of one input file, from its name (.xml) or its first JSON line."""
    name = path.name.lower()
    if ".xml" in name:
        return "stackexchange"
    file = Counted(path)
    try:
        for lineno, raw in enumerate(_lines(file), start=1):
            if raw.strip():
                return _detect_json(path, lineno, raw)
    finally:
        file.raw.close()
    raise DataError(f"{path}: empty file; remove it from the inputs")


def _detect_json(path: Path, lineno: int, raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path}:{lineno}: not valid JSON; pass --format, or check the file") from None
    if isinstance(obj, dict) and "replies" in obj:
        return "threads"
    if isinstance(obj, dict) and ({"link_id", "parent_id", "subreddit", "title"} & obj.keys()):
        return "reddit"
    fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{path}:{lineno}: cannot tell the format from fields [{fields}]; expected Pushshift "
                    "submissions/comments, or threads with 'replies' (or pass --format)")


def read(path: Path, fmt: str, stats: dict, on_bytes: Callable[[int], None] = lambda n: None
         ) -> Iterator[Post | Reply]:
    """Every post and reply in one file. Malformed lines/rows are counted in stats['malformed'] (the first
    one's place in stats['first_malformed']), not fatal: month-long dumps do end in a truncated line."""
    readers = {"reddit": _reddit, "stackexchange": _stackexchange, "threads": _threads}
    yield from readers[fmt](path, stats, on_bytes)


def _bad(stats: dict, place: str, why: str) -> None:
    stats["malformed"] = stats.get("malformed", 0) + 1
    stats.setdefault("first_malformed", f"{place}: {why}")


# ---------------------------------------------------------------------------------------------- opening


def _decompressed(file: Counted) -> io.BufferedIOBase:
    name = file.path.name.lower()
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{file.path}: reading .zst needs the zstandard package: pip install "
                            "'sftlab[votes]' (or decompress it: zstd -d --long=31)") from None
        # Pushshift compresses with a 2 GiB window (--long=31); the library's default limit refuses that.
        decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
        reader = decompressor.stream_reader(file.raw, read_size=1 << 20, closefd=False)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=file.raw)
    return file.raw


def _lines(file: Counted) -> Iterator[bytes]:
    try:
        yield from _decompressed(file)
    except DataError:
        raise
    except Exception as e:  # zstandard.ZstdError, gzip.BadGzipFile, EOFError: a broken or cut-off archive
        raise DataError(f"{file.path}: cannot decompress it ({type(e).__name__}: {e}); check the download") from None


def _json_lines(path: Path, stats: dict, on_bytes) -> Iterator[tuple[str, dict]]:
    file = Counted(path)
    last = 0
    try:
        for lineno, raw in enumerate(_lines(file), start=1):
            if lineno % 4096 == 0:
                now = file.done()
                on_bytes(now - last)
                last = now
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                _bad(stats, f"{path}:{lineno}", f"not valid JSON ({e})")
                continue
            if isinstance(obj, dict):
                yield f"{path}:{lineno}", obj
            else:
                _bad(stats, f"{path}:{lineno}", "not a JSON object")
        on_bytes(file.done() - last)
    finally:
        file.raw.close()


# ---------------------------------------------------------------------------------------------- reddit


def _reddit(path: Path, stats: dict, on_bytes) -> Iterator[Post | Reply]:
    for place, obj in _json_lines(path, stats, on_bytes):
        try:
            item = _reddit_comment(obj) if ("body" in obj or "parent_id" in obj) else _reddit_submission(obj)
        except (KeyError, TypeError, ValueError) as e:
            _bad(stats, place, f"not a Pushshift submission or comment ({type(e).__name__}: {e})")
            continue
        yield item


def _fullname(obj: dict, prefix: str) -> str:
    name = obj.get("name") or obj["id"]  # early dumps have no 'name'
    return name if name.startswith(prefix) else prefix + name


def _reddit_score(obj: dict) -> int:
    if obj.get("score") is not None:
        return int(obj["score"])
    return int(obj["ups"]) - int(obj.get("downs") or 0)


def _reddit_common(obj: dict) -> dict:
    author = obj.get("author") or ""
    return {"score": _reddit_score(obj), "created": float(obj["created_utc"]),
            "author": "" if author in MARKERS else author,
            "bot": obj.get("distinguished") in STAFF or bool(obj.get("stickied")),
            "retrieved": float(obj.get("retrieved_on") or obj.get("retrieved_utc") or 0)}


def _reddit_submission(obj: dict) -> Post:
    name = _fullname(obj, "t3_")
    title, body = html.unescape(obj["title"] or ""), html.unescape(obj.get("selftext") or "")
    removed = (body.strip() in MARKERS or title.strip() in MARKERS or not title.strip()
               or obj.get("removed_by_category") is not None)
    prompt = title.strip() + ("\n\n" + body.strip() if body.strip() and not removed else "")
    return Post(f"reddit:{name}", "reddit", name, prompt, removed=removed, **_reddit_common(obj))


def _reddit_comment(obj: dict) -> Reply:
    name = _fullname(obj, "t1_")
    link, parent = obj["link_id"], obj["parent_id"]
    text = html.unescape(obj["body"] or "")
    return Reply(f"reddit:{name}", name, f"reddit:{link}", parent == link, text.strip(),
                 removed=text.strip() in MARKERS, **_reddit_common(obj))


# ---------------------------------------------------------------------------------------------- stackexchange


def _stackexchange(path: Path, stats: dict, on_bytes) -> Iterator[Post | Reply]:
    # Several sites' Posts.xml may be read at once; ids restart per site, so the folder names the site.
    site = path.parent.name if path.name.lower().startswith("posts.xml") else path.name.split(".")[0]
    file = Counted(path)
    last, root, n = 0, None, 0
    try:
        for event, elem in ET.iterparse(_decompressed(file), events=("start", "end")):
            if root is None:
                root = elem
            if event != "end" or elem.tag != "row":
                continue
            n += 1
            item = _se_row(elem.attrib, site, f"{path}:row {n}", stats)
            # iterparse keeps every parsed row attached to the root; clearing both keeps memory flat.
            elem.clear()
            root.clear()
            if n % 4096 == 0:
                now = file.done()
                on_bytes(now - last)
                last = now
            if item is not None:
                yield item
        on_bytes(file.done() - last)
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML ({e}); expected a StackExchange Posts.xml") from None
    finally:
        file.raw.close()


def _se_time(text: str) -> float:
    # "2010-07-28T19:04:21.300", UTC without a zone suffix
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def _se_row(a: dict, site: str, place: str, stats: dict) -> Post | Reply | None:
    kind = a.get("PostTypeId")
    if kind not in ("1", "2"):  # tag wikis, moderator nominations, ...: not questions or answers
        return None
    try:
        common = {"score": int(a["Score"]), "created": _se_time(a["CreationDate"]),
                  # -1 is the "Community" user that owns wiki posts and bumps old questions
                  "author": a.get("OwnerDisplayName") or (f"user{a['OwnerUserId']}" if "OwnerUserId" in a else ""),
                  "bot": a.get("OwnerUserId") == "-1"}
        text = html_to_text(a.get("Body") or "")
        if kind == "1":
            title = (a.get("Title") or "").strip()
            prompt = title + ("\n\n" + text if text else "")
            return Post(f"stackexchange:{site}:{a['Id']}", "stackexchange", a["Id"], prompt,
                        removed=not title or "DeletionDate" in a, **common)
        return Reply(f"stackexchange:{site}:a{a['Id']}", a["Id"], f"stackexchange:{site}:{a['ParentId']}", True,
                     text, removed=not text or "DeletionDate" in a, **common)
    except (KeyError, ValueError) as e:
        _bad(stats, place, f"not a Posts.xml question or answer ({type(e).__name__}: {e})")
        return None


# ---------------------------------------------------------------------------------------------- threads


def _threads(path: Path, stats: dict, on_bytes) -> Iterator[Post | Reply]:
    for place, obj in _json_lines(path, stats, on_bytes):
        try:
            post, replies = _thread(obj, place)
        except (KeyError, TypeError, ValueError) as e:
            _bad(stats, place, f"not a thread {{prompt, replies: [{{text, score}}]}} ({type(e).__name__}: {e})")
            continue
        yield post
        yield from replies


def _thread(obj: dict, place: str) -> tuple[Post, list[Reply]]:
    tid = str(obj["id"]) if obj.get("id") is not None else place
    key = f"threads:{tid}"
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise TypeError(f"prompt is {type(prompt).__name__}, not a string")
    score = None if obj.get("score") is None else int(obj["score"])
    created = None if obj.get("created") is None else float(obj["created"])
    post = Post(key, "threads", tid, prompt.strip(), score, created, str(obj.get("author") or ""),
                removed=not prompt.strip() or prompt.strip() in MARKERS)
    flat: list[tuple[dict, bool]] = []
    _flatten(obj["replies"], True, flat)
    # Without a time on every reply, the list order is the time order (oldest first).
    timed = all(r.get("created") is not None for r, _ in flat)
    replies = []
    for i, (r, direct) in enumerate(flat):
        text = r["text"]
        if not isinstance(text, str):
            raise TypeError(f"reply text is {type(text).__name__}, not a string")
        rid = str(r["id"]) if r.get("id") is not None else f"{tid}/{i}"
        author = str(r.get("author") or "")
        replies.append(Reply(f"{key}/{rid}", rid, key, direct, text.strip(), int(r["score"]),
                             float(r["created"]) if timed else float(i), "" if author in MARKERS else author,
                             removed=text.strip() in MARKERS))
    return post, replies


def _flatten(replies: list, direct: bool, out: list) -> None:
    if not isinstance(replies, list):
        raise TypeError(f"replies is {type(replies).__name__}, not a list")
    for r in replies:
        if not isinstance(r, dict):
            raise TypeError(f"a reply is {type(r).__name__}, not an object")
        out.append((r, direct))
        _flatten(r.get("replies") or [], False, out)


# ---------------------------------------------------------------------------------------------- html


_BLOCK = {"p", "div", "blockquote", "ul", "ol", "table", "tr", "hr", "h1", "h2", "h3", "h4", "h5", "h6",
          "dl", "dd", "dt"}


class _TextParser(HTMLParser):
    """StackExchange's HTML subset -> readable plain text (markdown-like code and lists)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)  # &amp; &lt; &#39; ... become characters
        self.parts: list[tuple[str, bool]] = []  # (text, verbatim): code blocks keep their whitespace
        self.pre = 0

    def _add(self, text: str) -> None:
        self.parts.append((text, False))

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK:
            self._add("\n\n")
        elif tag == "br":
            self._add("\n")
        elif tag == "li":
            self._add("\n- ")
        elif tag == "pre":
            self.pre += 1
            self._add("\n\n```\n")
        elif tag == "code" and not self.pre:
            self._add("`")
        elif tag == "img" and dict(attrs).get("alt"):
            self._add(dict(attrs)["alt"])

    def handle_endtag(self, tag):
        if tag in _BLOCK:
            self._add("\n\n")
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.parts.append(("\n```\n\n", True))
        elif tag == "code" and not self.pre:
            self._add("`")

    def handle_data(self, data):
        if self.pre:
            self.parts.append((data.strip("\n"), True))
        else:  # outside <pre>, HTML whitespace (line breaks included) is one space
            self._add(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment: paragraphs separated by blank lines, code blocks fenced."""
    if "<" not in markup and "&" not in markup:
        return markup.strip()
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    out: list[str] = []
    for verbatim, run in itertools.groupby(parser.parts, key=lambda part: part[1]):
        text = "".join(t for t, _ in run)
        if not verbatim:
            text = re.sub(r" *\n *", "\n", text)  # no spaces at the ends of prose lines
        out.append(text)
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()
