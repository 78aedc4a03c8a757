"""Images in chat rows (the HF/TRL convention), decoded with Pillow; the model's processor does the rest.

A row carries images in two ways, alone or together:

- image parts in a message's content: `{"type": "image", "image": "img/cat.png"}` (also `path`, `url` or
  `base64` as the key; a `data:image/...;base64,` URI or a bare base64 string works as the value);
- an `images` column beside `messages` (or `prompt`/`completion`): a list of paths or base64 strings (or, from a
  `datasets` source, decoded images or `{"bytes": ..., "path": ...}` entries), one per `{"type": "image"}` part
  without a source of its own, in order. Without any image part the images go to the start of the first user
  message (as TRL does).

Relative paths start at the data file's folder. Paths are checked when the data is read (cheap: a stat); the
pixels are decoded when the data is tokenized (`open_image`), where an unreadable or oversized image is a
one-line `DataError` that names the row and the image. Nothing here imports torch, and Pillow only when an
image is opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

SOURCE_KEYS = ("image", "path", "url", "base64")
IMAGE_HINT = ('an image part is {"type": "image", "image": "PATH"} (a path relative to the data file, or base64), or '
              '{"type": "image"} with the image in the row\'s "images" list')
_B64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from. kind: path (value: the resolved file), base64 (value: the encoded string),
    bytes (value: bytes) or pil (value: an already decoded image, from a `datasets` source)."""

    kind: str
    value: Any
    label: str  # how the row names it, for messages: the path as written, "base64 image", ...

    def describe(self, index: int) -> str:
        return f"image {index + 1} ({self.label})"


# ---------------------------------------------------------------------------------------------- parsing


def text_of(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def has_images(content: Any) -> bool:
    return isinstance(content, list) and any(p.get("type") == "image" for p in content)


def parse_parts(content: list, at: str, place: str) -> list[dict] | str:
    """A content list -> normalised parts ({"type": "text", "text": s} and {"type": "image", "source": ...} with
    the raw source or None); a list of text parts only becomes its joined string (a text model reads it)."""
    parts = []
    for j, part in enumerate(content):
        where = f"{at} content[{j}]"
        if not isinstance(part, dict):
            kind = "a string" if isinstance(part, str) else f"a {type(part).__name__}"
            raise DataError(f"{place}: {where} is {kind} ({str(part)[:30]!r}); expected a part like "
                            '{"type": "text", "text": "..."} or {"type": "image", "image": "img.png"}, or put the '
                            "message text in 'content' as a string")
        kind = part.get("type", "image" if any(k in part for k in SOURCE_KEYS) else "text")
        if kind == "text":
            text = part.get("text", part.get("content"))
            if not isinstance(text, str):
                raise DataError(f"{place}: {where} is a text part without a string 'text'; add the text")
            parts.append({"type": "text", "text": text})
        elif kind in ("image", "image_url"):
            src = next((part[k] for k in SOURCE_KEYS if part.get(k) is not None), None)
            if kind == "image_url" and isinstance(part.get("image_url"), dict):  # OpenAI's {"image_url": {"url"}}
                src = part["image_url"].get("url")
            parts.append({"type": "image", "source": src})
        else:
            raise DataError(f"{place}: {where} has type {kind!r}; sftlab reads text and image parts ({IMAGE_HINT})")
    if not any(p["type"] == "image" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def attach(messages: list[dict], column: Any, base: Path, place: str) -> tuple[list[dict], list[ImageRef]]:
    """Resolve a row's images: (messages with bare {"type": "image"} parts, their ImageRefs in order).

    `column`: the row's "images" value (None when absent). Image parts without a source take the column's
    images in order; with no image part at all, the column's images go to the start of the first user message."""
    column = _column(column, place, base)
    slots = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    if column and not slots:
        messages = _insert_first_user(messages, len(column), place)
        slots = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    bare = sum(p["source"] is None for p in slots)
    if bare != len(column):
        raise DataError(f"{place}: the messages have {bare} image part(s) without a source but 'images' lists "
                        f"{len(column)}; give one {{\"type\": \"image\"}} part per listed image")
    refs, pending = [], iter(column)
    for i, p in enumerate(slots):
        src = p.pop("source")
        refs.append(next(pending) if src is None else to_ref(src, base, place, i))
    for i, ref in enumerate(refs):
        check_exists(ref, place, i)
    return messages, refs


def prompt_images(column: Any, base: Path, place: str) -> list[ImageRef]:
    """The images of a prompt/completion row whose prompt is a string (they go before the prompt)."""
    refs = _column(column, place, base)
    for i, ref in enumerate(refs):
        check_exists(ref, place, i)
    return refs


def _column(value: Any, place: str, base: Path) -> list:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        value = [value]  # one image where a list is expected
    return [value[i] if isinstance(value[i], ImageRef) else to_ref(value[i], base, place, i)
            for i in range(len(value))]


def _insert_first_user(messages: list[dict], n: int, place: str) -> list[dict]:
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if user is None:
        raise DataError(f"{place}: the row lists images but has no user message to put them in; add image parts "
                        f"where they belong ({IMAGE_HINT})")
    content = messages[user]["content"]
    text = [{"type": "text", "text": content}] if isinstance(content, str) else content
    out = list(messages)
    out[user] = {**messages[user], "content": [{"type": "image", "source": None} for _ in range(n)] + text}
    return out


def to_ref(src: Any, base: Path, place: str, index: int) -> ImageRef:
    """One image source as written in a row -> an ImageRef (paths resolved against `base`)."""
    label = f"image {index + 1}"
    if isinstance(src, dict):  # datasets' Image feature: {"bytes": b"...", "path": "..."}
        if isinstance(src.get("bytes"), (bytes, bytearray)):
            return ImageRef("bytes", bytes(src["bytes"]), str(src.get("path") or "bytes"))
        src = next((src[k] for k in ("path",) + SOURCE_KEYS if isinstance(src.get(k), str)), src)
    if isinstance(src, (bytes, bytearray)):
        return ImageRef("bytes", bytes(src), "bytes")
    if hasattr(src, "size") and hasattr(src, "convert"):  # a PIL image (datasets decodes Image columns)
        return ImageRef("pil", src, "decoded image")
    if not isinstance(src, str) or not src.strip():
        raise DataError(f"{place}: {label} is {type(src).__name__ if src is not None else 'null'}; {IMAGE_HINT}")
    if src.startswith("data:"):
        head, _, data = src.partition(",")
        if ";base64" not in head:
            raise DataError(f"{place}: {label} is a data URI without ;base64; encode the image as base64")
        return ImageRef("base64", data, "base64 data URI")
    if src.startswith(("http://", "https://")):
        raise DataError(f"{place}: {label} is a URL ({src[:60]}); sftlab does not download images: save it beside "
                        "the data file and give its relative path")
    if len(src) > 512 and _B64.match(src[:4096]):
        return ImageRef("base64", src, "base64 image")
    path = Path(src.removeprefix("file://")).expanduser()
    return ImageRef("path", path if path.is_absolute() else base / path, src)


def check_exists(ref: ImageRef, place: str, index: int) -> None:
    if ref.kind == "path" and not ref.value.is_file():
        raise DataError(f"{place}: {ref.describe(index)} not found (looked for {ref.value}); image paths are "
                        "relative to the data file's folder: fix the path or add the file")


# ---------------------------------------------------------------------------------------------- decoding


def _source(ref: ImageRef, place: str, index: int):
    if ref.kind == "path":
        return ref.value
    if ref.kind == "bytes":
        return io.BytesIO(ref.value)
    try:
        return io.BytesIO(base64.b64decode(ref.value, validate=False))
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{place}: {ref.describe(index)} is not valid base64 ({e}); re-encode the image "
                        "(base64 of the file's bytes) or give a path") from None


def open_image(ref: ImageRef, place: str, index: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image decoded as RGB (a PIL image); a one-line DataError when missing, unreadable or too large."""
    from PIL import Image, UnidentifiedImageError

    if ref.kind == "pil":
        _check_size(ref, ref.value.size, place, index, max_pixels)
        return ref.value.convert("RGB")
    check_exists(ref, place, index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(_source(ref, place, index)) as im:
                _check_size(ref, im.size, place, index, max_pixels)  # the header only: before decoding
                return im.convert("RGB")
    except Image.DecompressionBombError:
        raise DataError(f"{place}: {ref.describe(index)} is too large for Pillow to decode safely; downscale "
                        "it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{place}: cannot decode {ref.describe(index)} with Pillow ({_first_line(e)}); check the "
                        "file, or re-save it as PNG or JPEG") from None


def image_size(ref: ImageRef, place: str, index: int) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels (for `sftlab data inspect`)."""
    from PIL import Image, UnidentifiedImageError

    if ref.kind == "pil":
        return tuple(ref.value.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_source(ref, place, index)) as im:
                return tuple(im.size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{place}: cannot decode {ref.describe(index)} with Pillow ({_first_line(e)}); check the "
                        "file, or re-save it as PNG or JPEG") from None


def _check_size(ref: ImageRef, size: tuple[int, int], place: str, index: int, max_pixels: int) -> None:
    w, h = size
    if max_pixels and w * h > max_pixels:
        raise DataError(f"{place}: {ref.describe(index)} is {w}x{h} = {w * h:,} pixels, above "
                        f"vision.max_image_pixels={max_pixels}; downscale the image or raise the limit")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__
