"""Data files -> normalised records.

Every row of every source becomes a `Record` of one of three kinds (prompt_completion, chat, text), or a
`DataError` whose one-line message starts with the place, says what is wrong and how to fix it.

Places: JSONL `file:LINE` (1-based physical line); CSV `file:row N` (1-based, the header is row 1, as a
spreadsheet shows it); JSON `file:item N` (1-based); Parquet `file:row N` and `datasets` `name[split]:row N`
are 0-based indices, the N you would pass to `table.slice(N)` / `ds[N]`.

Nothing here imports torch (pyarrow and datasets load lazily), so checking data stays fast.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import DataError
from . import images as img

if TYPE_CHECKING:
    from ..config import DataSource

FILE_TYPES = (".jsonl.gz", ".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names (and tool-result spellings of other tools) -> the roles chat templates know.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "function": "tool", "observation": "tool"}
ROLES_HINT = "allowed roles: system, user, assistant, tool (ShareGPT: human, gpt, system, tool/function/observation)"
FORMATS_HINT = ("expected prompt/completion, messages, conversations, instruction/output or text "
                "(or map your fields with data.train[].columns)")
REQUIRED = {"prompt_completion": ("prompt", "completion"), "chat": ("messages",),
            "alpaca": ("instruction", "output"), "text": ("text",)}
MESSAGE_EXAMPLE = '{"role": "user", "content": "..."}'
_MISSING = object()


@dataclass
class Record:
    kind: str  # "prompt_completion" | "chat" | "text"
    source: str  # where it came from: "data/train.jsonl:17", "data/x.csv:row 4", "squad[train]:row 12"
    prompt: str | None = None  # prompt_completion only
    completion: str | None = None  # prompt_completion only
    messages: list[dict] | None = None  # chat only: [{"role": ..., "content": str | [parts]}, ...]
    text: str | None = None  # text only
    # images.ImageRef of each image, in order (chat: one per {"type": "image"} part of the content lists, the
    # only non-string contents; prompt_completion: shown before the prompt); None: a text-only row
    images: list | None = None


# ---------------------------------------------------------------------------------------------- public API


def read_source(src: DataSource) -> list[Record]:
    """All records of one source, in file order."""
    label, rows = _rows(src)
    path = Path(src.path).expanduser()
    base = path.parent if path.is_file() else Path.cwd()  # relative image paths start at the data file's folder
    records: list[Record] = []
    first = None  # auto: the first row's format is the file's format
    for place, row in rows:
        row = _rename(row, src.columns)
        fmt = src.format
        if fmt == "auto":
            try:
                fmt = detect_format(row)
            except ValueError as e:
                raise DataError(f"{place}: {e}") from None
            first = first or fmt
            if fmt != first:
                raise DataError(f"{place}: this row is {fmt} but earlier rows are {first}; keep one format per "
                                "file (split the file into several data.train sources)")
        else:
            _require(row, fmt, place)
        rec = CONVERTERS[fmt](row, place)
        if row.get("images") or (rec.messages and any(img.has_images(m["content"]) for m in rec.messages)):
            rec = _with_images(rec, row.get("images"), base, place)
        records.append(rec)
    if not records:
        raise DataError(f"{label}: no records; the source is empty (or only blank lines): add data or remove "
                        "it from data.train")
    return records


def load_records(sources: list[DataSource], seed: int) -> list[Record]:
    """Mix sources by weight: each contributes round(weight x size) records, source by source (unshuffled)."""
    if not sources:
        raise DataError("data.train: no data sources; add one, e.g. data.train=[{path: train.jsonl}]")
    rng = random.Random(seed)  # one stream for all sources: the same file listed twice gets different subsets
    out: list[Record] = []
    for src in sources:
        out += _weighted(read_source(src), src.weight, rng)
    return out


def detect_format(row: dict) -> str:
    """The format a row's fields say it is; ValueError (without a place) when none fits."""
    if "messages" in row or "conversations" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "chosen" in row and "rejected" in row:
        raise ValueError("this is a preference pair (chosen/rejected): it trains with a preference objective, "
                         "not SFT; for SFT map 'chosen' to 'completion' with data.train[].columns")
    if "text" in row:
        return "text"
    raise ValueError(f"cannot tell the format from fields [{', '.join(map(str, row))}]; {FORMATS_HINT}")


def _weighted(records: list[Record], weight: float, rng: random.Random) -> list[Record]:
    n = len(records)
    # Half rounds up (not Python's banker's rounding) so 0.5 x 5 gives 3; at least one record, since a
    # weight > 0 means the user wants this source in the mix.
    target = max(1, math.floor(weight * n + 0.5))
    whole, extra = divmod(target, n)  # == floor(w) repeats + a subset for the fraction
    picked = sorted(rng.sample(range(n), extra))  # sorted: keep file order; training shuffles later
    return records * whole + [records[i] for i in picked]


# ---------------------------------------------------------------------------------------------- sources


def _rows(src: DataSource) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(label for whole-source errors, iterator of (place, row dict))."""
    path = Path(src.path).expanduser()
    if path.is_file():
        kind = _file_type(src.path)
        if kind is None:
            raise DataError(f"{src.path}: unsupported file type; use {', '.join(FILE_TYPES)} (or a `datasets` "
                            "name / save_to_disk folder)")
        return src.path, READERS[kind](path, src.path)
    if not path.is_dir() and _looks_like_file(src.path):
        raise DataError(f"{src.path}: file not found; check data.train[].path (relative paths start at the "
                        "current directory)")
    label = f"{src.path}[{src.split}]"
    return label, ((f"{label}:row {i}", row) for i, row in enumerate(_load_dataset(src)))


def _file_type(path: str) -> str | None:
    return next((t for t in FILE_TYPES if path.lower().endswith(t)), None)


def _looks_like_file(path: str) -> bool:
    # A hub id is exactly "owner/name", so one '/' alone does not make a file path; an explicit directory
    # prefix, a deeper path or a data-file extension does.
    return (_file_type(path) is not None or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
            or "\\" in path)


def _load_dataset(src: DataSource):
    import datasets  # lazy: heavy, and only needed for this kind of source

    path = Path(src.path).expanduser()
    try:
        # load_dataset cannot read save_to_disk folders; those hold state.json / dataset_dict.json.
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(f"{src.path}: no split {src.split!r}; it has {', '.join(ds)}: set "
                                    "data.train[].split")
                ds = ds[src.split]
            return ds
        return datasets.load_dataset(src.path, src.name or None, split=src.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (hub, builder, split errors); all mean "cannot load"
        raise DataError(f"{src.path}: cannot load it as a `datasets` dataset ({type(e).__name__}: "
                        f"{_first_line(e)}); check data.train[].path, .name and .split") from None


def _read_bytes(path: Path, label: str) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if label.lower().endswith(".gz") else data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: cannot read it ({_first_line(e)}); check the file (re-compress .gz files "
                        "with gzip)") from None


def _decode(data: bytes, label: str, base: int = 0, line: int | None = None) -> str:
    """Strict UTF-8: silently replacing bad bytes would train on garbage."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line if line is not None else data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{label}:{line}: byte 0x{data[e.start]:02x} at byte offset {base + e.start} is not "
                        "valid UTF-8; re-save the file as UTF-8") from None


# A JSONL line longer than this is refused without reading the rest of it: no example that long fits any
# max_length, and a hostile or broken file (one 1 GB line) must not be read into memory whole.
MAX_LINE_BYTES = 16 << 20


def _jsonl_lines(path: Path, label: str) -> Iterator[bytes]:
    """Physical lines without their newline, streamed (a .gz file is decompressed as it is read)."""
    try:
        with (gzip.open(path, "rb") if label.lower().endswith(".gz") else open(path, "rb")) as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise DataError(f"{label}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB (stopped "
                                    "reading it); no example this long fits data.max_length: split the line into "
                                    "records or remove it")
                yield raw.removesuffix(b"\n")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: cannot read it ({_first_line(e)}); check the file (re-compress .gz files "
                        "with gzip)") from None


def _read_jsonl(path: Path, label: str) -> Iterator[tuple[str, dict]]:
    offset = 0
    for lineno, raw in enumerate(_jsonl_lines(path, label), start=1):
        text = _decode(raw, label, offset, lineno)
        offset += len(raw) + 1
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # editors on Windows like to add a BOM
        if not text.strip():
            continue
        place = f"{label}:{lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{place}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            "JSON object") from None
        except RecursionError:  # "[[[[..." thousands deep: hostile or broken, never a training record
            raise DataError(f"{place}: JSON nested too deeply to read; each line must be one flat JSON "
                            "object like {\"prompt\": ..., \"completion\": ...}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{place}: expected a JSON object {{...}}, got {_describe(obj)}; each line must "
                            "be one JSON object")
        yield place, obj


def _read_json(path: Path, label: str) -> Iterator[tuple[str, dict]]:
    text = _decode(_read_bytes(path, label), label).removeprefix("\ufeff")
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("it looks like JSON Lines: rename it to .jsonl" if e.msg == "Extra data"
                else "fix the syntax, or use .jsonl with one object per line")
        raise DataError(f"{label}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {hint}") from None
    except RecursionError:
        raise DataError(f"{label}: JSON nested too deeply to read; expected a list of flat records "
                        "[{...}, {...}]") from None
    items = obj
    if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]}, as some exporters write
        items = next((obj[k] for k in ("data", "train") if isinstance(obj.get(k), list)), None)
    if not isinstance(items, list):
        raise DataError(f"{label}: expected a JSON list of objects (or an object with a \"data\" or \"train\" "
                        f"list), got {_describe(obj)}; wrap the records in [...]")
    for i, item in enumerate(items, start=1):
        place = f"{label}:item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{place}: expected a JSON object {{...}}, got {_describe(item)}; make every "
                            "item of the list an object")
        yield place, item


def _read_csv(path: Path, label: str) -> Iterator[tuple[str, dict]]:
    text = _decode(_read_bytes(path, label), label).removeprefix("\ufeff")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    n = 0
    try:
        for n, cells in enumerate(reader, start=1):
            if not cells:  # blank line
                continue
            if header is None:
                header = _csv_header(cells, f"{label}:row {n}")
                continue
            place = f"{label}:row {n}"
            if len(cells) != len(header):
                raise DataError(f"{place}: {len(cells)} cells but the header has {len(header)} columns; quote "
                                "cells that contain commas or line breaks")
            yield place, dict(zip(header, cells))
    except csv.Error as e:
        raise DataError(f"{label}:row {n + 1}: not valid CSV ({e}); check the quoting") from None


def _csv_header(cells: list[str], place: str) -> list[str]:
    header = [c.strip() for c in cells]  # "prompt, completion" is a common hand-written header
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"{place}: column {dupes[0]!r} appears more than once in the header; rename one")
    return header


def _read_parquet(path: Path, label: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # lazy: only Parquet sources need it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise DataError(f"{label}: not a readable Parquet file ({_first_line(e)}); re-export it, e.g. with "
                        "pandas DataFrame.to_parquet") from None
    i = 0
    for batch in table.to_batches():  # batch by batch: no second full copy of a big table as Python objects
        for row in batch.to_pylist():
            yield f"{label}:row {i}", row
            i += 1


READERS = {".jsonl.gz": _read_jsonl, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet}


# ---------------------------------------------------------------------------------------------- rows


def _rename(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    out.update({new: row[old] for old, new in columns.items() if old in row})  # a mapped field wins
    return out


def _require(row: dict, fmt: str, place: str) -> None:
    if fmt == "chat" and "conversations" in row:
        return
    for field in REQUIRED[fmt]:
        if field not in row:
            also = " (or 'conversations')" if field == "messages" else ""
            raise DataError(f"{place}: missing field '{field}'{also} for format {fmt} (fields here: "
                            f"[{', '.join(map(str, row))}]); add it or map a field to it with data.train[].columns")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    shown = repr(value)
    return f"{kind} ({shown[:37] + '...' if len(shown) > 40 else shown})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _text(value: Any, field: str, place: str, expected: str = "a string", nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{place}: '{field}' is {_describe(value)}; expected {expected}: fix the value")
    if nonempty and not value.strip():
        raise DataError(f"{place}: empty {field}: nothing to train on; fill it in or remove the row")
    return value


def _prompt_completion(row: dict, place: str) -> Record:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        return _conversational(prompt, completion, place)
    _text(prompt, "prompt", place, "a string or a list of chat messages")
    _text(completion, "completion", place, "a string or a list with one assistant message", nonempty=True)
    return Record("prompt_completion", place, prompt=prompt, completion=completion)


def _conversational(prompt: Any, completion: Any, place: str) -> Record:
    """TRL's conversational prompt-completion: both sides are message lists; the result is a chat."""
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise DataError(f"{place}: 'prompt' is {_describe(prompt)} but 'completion' is {_describe(completion)}; "
                        "use two strings or two lists of chat messages")
    head = _messages(prompt, "prompt", place)
    tail = _messages(completion, "completion", place)
    if not any(m["role"] == "assistant" for m in tail):
        raise DataError(f"{place}: 'completion' has no assistant message; make it the assistant's reply, e.g. "
                        '[{"role": "assistant", "content": "..."}]')
    return _chat_record(head + tail, "prompt+completion", place)


def _chat(row: dict, place: str) -> Record:
    field = "messages" if "messages" in row else "conversations"
    value = row[field]
    if isinstance(value, str):  # CSV cells and string columns can only hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # leave it a string: _messages reports the type
    return _chat_record(_messages(value, field, place), field, place)


def _messages(value: Any, field: str, place: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{place}: '{field}' is {_describe(value)}; expected a list of messages like "
                        f"[{MESSAGE_EXAMPLE}]")
    out = []
    for i, m in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{place}: {at} is {_describe(m)}; expected an object like {MESSAGE_EXAMPLE}")
        content = m["content"] if "content" in m else m.get("value", _MISSING)  # OpenAI/TRL, then ShareGPT
        if content is _MISSING:
            raise DataError(f"{place}: {at} has no 'content' (or ShareGPT 'value'); add the message text")
        if isinstance(content, list):  # content parts (HF/TRL): text and images
            content = img.parse_parts(content, at, place)
        elif not isinstance(content, str):
            raise DataError(f"{place}: {at} content is {_describe(content)}; expected a string or a list of "
                            "parts: put the message text in 'content'")
        out.append({"role": _role(m, at, place), "content": content})
    return out


def _role(message: dict, at: str, place: str) -> str:
    raw = message["role"] if "role" in message else message.get("from")
    if raw is None:
        raise DataError(f"{place}: {at} has no 'role' (or ShareGPT 'from'); add one: {ROLES_HINT}")
    role = ROLE_ALIASES.get(raw.lower(), raw.lower()) if isinstance(raw, str) else raw
    if role not in ROLES:
        raise DataError(f"{place}: {at} has unknown role {raw!r}; {ROLES_HINT}; fix the role")
    return role


def _chat_record(messages: list[dict], field: str, place: str) -> Record:
    if not messages:
        raise DataError(f"{place}: '{field}' is an empty list; add the conversation's messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{place}: no assistant turn: nothing to train on (roles here: {roles}); add the "
                        "assistant's reply or remove the row")
    for i in turns:
        if not img.text_of(messages[i]["content"]).strip():
            raise DataError(f"{place}: assistant message {i} of '{field}' has empty content; fill it in or "
                            "remove the row")
    return Record("chat", place, messages=messages)


def _with_images(rec: Record, column: Any, base: Path, place: str) -> Record:
    if rec.kind == "chat":
        rec.messages, rec.images = img.attach(rec.messages, column, base, place)
    elif rec.kind == "prompt_completion":
        rec.images = img.prompt_images(column, base, place)
    else:
        raise DataError(f"{place}: a {rec.kind} row cannot carry images; use messages or prompt/completion rows")
    return rec


def _alpaca(row: dict, place: str) -> Record:
    instruction = _text(row["instruction"], "instruction", place)
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input", place)  # input is optional; null means none
    output = _text(row["output"], "output", place, nonempty=True)
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    return Record("prompt_completion", place, prompt=prompt, completion=output)


def _plain_text(row: dict, place: str) -> Record:
    return Record("text", place, text=_text(row["text"], "text", place, nonempty=True))


CONVERTERS = {"prompt_completion": _prompt_completion, "chat": _chat, "alpaca": _alpaca, "text": _plain_text}
