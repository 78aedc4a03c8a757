"""Preference pairs for DPO-style objectives (not SFT): {prompt, chosen, rejected} rows -> `Preference`.

Read through the same sources, column mapping and one-line `DataError`s as SFT records (formats.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .formats import _describe, _messages, _rename, _rows, _text

if TYPE_CHECKING:
    from ..config import DataSource


@dataclass
class Preference:
    """One preference pair, for DPO-style objectives (not SFT)."""

    kind: str  # "text": prompt/chosen/rejected are strings | "chat": all three are message lists
    source: str
    prompt: str | list[dict]
    chosen: str | list[dict]  # chat: the assistant turn(s) that follow the prompt
    rejected: str | list[dict]


def read_preferences(src: DataSource) -> list[Preference]:
    """All preference pairs of one source: {prompt, chosen, rejected} as strings, or TRL's conversational form
    (message lists; without 'prompt', the messages chosen and rejected share are the prompt). Other fields
    (e.g. the 'meta' that `sftlab pairs` writes) are ignored."""
    label, rows = _rows(src)
    out = [_preference(_rename(row, src.columns), place) for place, row in rows]
    if not out:
        raise DataError(f"{label}: no preference pairs; the source is empty")
    return out


def _preference(row: dict, place: str) -> Preference:
    for name in ("chosen", "rejected"):
        if name not in row:
            raise DataError(f"{place}: missing field '{name}' for a preference pair (fields here: "
                            f"[{', '.join(map(str, row))}]); add it or map a field to it with columns")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _chat_preference(prompt, chosen, rejected, place)
    if prompt is None:
        raise DataError(f"{place}: missing field 'prompt'; string pairs need it (only conversational pairs "
                        "may leave the prompt inside chosen/rejected)")
    _text(prompt, "prompt", place, "a string or a list of chat messages")
    _text(chosen, "chosen", place, "a string or a list of chat messages", nonempty=True)
    _text(rejected, "rejected", place, "a string or a list of chat messages", nonempty=True)
    if chosen == rejected:
        raise DataError(f"{place}: chosen and rejected are the same text: nothing to prefer; remove the row")
    return Preference("text", place, prompt, chosen, rejected)


def _chat_preference(prompt: Any, chosen: Any, rejected: Any, place: str) -> Preference:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{place}: 'chosen' is {_describe(chosen)} but 'rejected' is {_describe(rejected)}; use "
                        "two strings or two lists of chat messages")
    chosen, rejected = _messages(chosen, "chosen", place), _messages(rejected, "rejected", place)
    if prompt is None:  # TRL's implicit prompt: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif not isinstance(prompt, list):
        raise DataError(f"{place}: 'prompt' is {_describe(prompt)} but chosen/rejected are message lists; make "
                        'the prompt a list too, e.g. [{"role": "user", "content": "..."}]')
    prompt = _messages(prompt, "prompt", place)
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise DataError(f"{place}: '{name}' must end with a non-empty assistant message (the answer being "
                            "judged); fix the row")
    if chosen == rejected:
        raise DataError(f"{place}: chosen and rejected are the same messages: nothing to prefer; remove the row")
    return Preference("chat", place, prompt, chosen, rejected)
