"""`sftlab data inspect CONFIG`: what the model will actually be trained on, before spending compute.

Shows a few tokenized training examples rendered back to text with the trained tokens marked, then the
counts that reveal silent data problems: the share of tokens trained (a template that masks too much or
too little), left-truncated and dropped examples, and how full packed rows are.
"""

from __future__ import annotations

import os
import sys

from .collate import plan_packed_rows
from .tokenize import IGNORE, Example, TokenizeStats

OPEN, CLOSE = "[[", "]]"
COLOUR_ON, COLOUR_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green


def inspect(cfg, n: int = 3, colour: bool | None = None) -> str:
    """Rendered examples with trained spans marked, then counts. cfg: a RunConfig.

    colour: mark trained tokens with ANSI colour instead of [[ ]]; None: colour when stdout is a
    terminal and NO_COLOR is not set.
    """
    from ..models import is_vision_language, load_processor, load_tokenizer, resolve_model
    from .prepare import prepare_data

    if colour is None:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    ref = resolve_model(cfg.model.path, cfg.model.gguf_file, content_hash=False)  # tokenizer only
    processor = None
    if is_vision_language(ref.location):  # a VLM: its processor tokenizes (data/multimodal.py)
        processor = load_processor(ref, cfg.model.trust_remote_code, cfg.model.revision)
        tokenizer = processor.tokenizer
    else:
        tokenizer = load_tokenizer(ref, cfg.model.trust_remote_code, cfg.model.revision)
    data = prepare_data(cfg, tokenizer, processor=processor)
    marks = (COLOUR_ON, COLOUR_OFF) if colour else (OPEN, CLOSE)

    shown = data.train[:max(n, 0)]
    out = [f"{len(shown)} of {len(data.train)} training examples; trained tokens "
           + ("in colour" if colour else f"between {OPEN} and {CLOSE}") + ":"]
    for k, ex in enumerate(shown, 1):
        out.append(f"\n--- example {k}: {ex.source} ({len(ex.input_ids)} tokens, {ex.n_trained} trained"
                   f"{image_note(ex)})")
        shown = render_marked(tokenizer, ex, *marks)
        out.append(collapse_runs(shown, processor.image_token) if processor is not None else shown)
    out.append("")
    out.append(counts("train", data.train_stats))
    if data.eval or data.eval_stats.dropped:
        out.append(counts("eval", data.eval_stats))
    if cfg.data.packing:
        out.append(packing_line(data.train, cfg.data.max_length))
    if processor is not None or any(e.images for e in data.train):
        out.append(images_line("train", data.train))
    return "\n".join(out)


def image_note(ex: Example) -> str:
    """', 2 images: 30x20, 12x12' for an example with images (their header sizes), else ''."""
    if not ex.images:
        return ""
    from .images import image_size

    sizes = ", ".join("x".join(map(str, image_size(r, ex.source, i))) for i, r in enumerate(ex.images))
    return f", {len(ex.images)} image{'s' if len(ex.images) > 1 else ''}: {sizes}"


def images_line(name: str, examples: list[Example]) -> str:
    """How many images the examples hold, per row and in pixels (from the images' headers)."""
    from .images import image_size

    counts = [len(e.images or ()) for e in examples]
    sizes = [image_size(r, e.source, i) for e in examples for i, r in enumerate(e.images or ())]
    if not sizes:
        return f"{name} images: none (every row is text only)"
    by_area = sorted(sizes, key=lambda s: s[0] * s[1])
    (w0, h0), (w1, h1), (wm, hm) = by_area[0], by_area[-1], by_area[len(by_area) // 2]
    return (f"{name} images: {sum(counts)} in {sum(c > 0 for c in counts)} of {len(examples)} rows (up to "
            f"{max(counts)} per row); sizes (width x height) from {w0}x{h0} to {w1}x{h1}, median {wm}x{hm}")


def collapse_runs(text: str, token: str, at_least: int = 4) -> str:
    """Runs of an image token shown once with their length: '<image>x576' instead of 576 copies."""
    import re

    return re.sub(f"(?:{re.escape(token)}){{{at_least},}}", lambda m: f"{token}x{len(m.group(0)) // len(token)}", text)


def render_marked(tokenizer, ex: Example, open_: str = OPEN, close: str = CLOSE) -> str:
    """The example's text with each run of trained tokens wrapped in open_ ... close.

    A token counts as trained when it is a target, i.e. labels[t] for t >= 1 (labels[0] is never predicted).
    """
    trained = [t > 0 and lab != IGNORE for t, lab in enumerate(ex.labels)]
    parts, t = [], 0
    while t < len(ex.input_ids):
        u = t
        while u < len(ex.input_ids) and trained[u] == trained[t]:
            u += 1
        text = tokenizer.decode(ex.input_ids[t:u], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(f"{open_}{text}{close}" if trained[t] else text)
        t = u
    return "".join(parts)


def counts(name: str, s: TokenizeStats) -> str:
    share = s.trained_tokens / s.tokens if s.tokens else 0.0
    line = (f"{name}: {s.examples} examples, {s.tokens} tokens, {s.trained_tokens} trained tokens "
            f"({share:.1%} trained), {s.truncated} left-truncated, {len(s.dropped)} dropped as over-long")
    if s.dropped:
        more = f" and {len(s.dropped) - 3} more" if len(s.dropped) > 3 else ""
        line += f" (dropped: {', '.join(s.dropped[:3])}{more})"
    return line


def packing_line(examples: list[Example], max_length: int) -> str:
    lengths = [len(e.input_ids) for e in examples]
    rows = plan_packed_rows(lengths, max_length, list(range(len(examples))))
    eff = sum(lengths) / (len(rows) * max_length) if rows else 0.0
    return (f"packing: {len(examples)} examples in {len(rows)} rows of up to {max_length} tokens, "
            f"{eff:.1%} of row capacity holds tokens")
