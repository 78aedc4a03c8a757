"""Records with images -> token ids and labels through a vision-language model's processor; batches of images.

The conversation is rendered with the processor's chat template (every content a list of parts, as VLM
templates expect) and the answer spans are found exactly as for text chats (`tokenize.render_chat`: prefixes
rendered with and without the generation prompt). The template's markup for an image (LLaVA's `<image>`,
Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`) is cut out of those spans, so it is never a label, even
inside an assistant turn.

The processor then expands each image placeholder token into the image's tokens (a number that depends on the
image: Qwen2-VL's grid, Idefics3's tiles). Labels are computed on the unexpanded text (the tokenizer's offsets),
and each placeholder is replaced by its expansion, which is never trained: the expansion of image k is the
processor's output for the placeholder alone with image k. The spliced ids must equal the processor's ids for
the whole row, or the row is refused: a processor whose expansion depends on its context would otherwise get
labels shifted by a few tokens, silently.

Pixels are not kept: an example holds its images' references, and each batch's images are decoded and run
through the image processor when the batch is built (`vision_batch`), in one call over the batch's rows,
which pads rows with different numbers and sizes of images the way the model expects.
"""

from __future__ import annotations

from ..errors import DataError, ModelError
from . import images as img
from .formats import Record
from .tokenize import IGNORE, Example, label_offsets, render_chat

_MARK_A, _MARK_B = "\u2063sftlab-a\u2063", "\u2063sftlab-b\u2063"


def parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def messages_of(rec: Record) -> list[dict]:
    """The record as a conversation whose every content is a list of parts (prompt/completion rows: the images
    before the prompt in the user turn)."""
    if rec.kind == "chat":
        return [{**m, "content": parts(m["content"])} for m in rec.messages]
    if rec.kind == "prompt_completion":
        shown = [{"type": "image"} for _ in rec.images or ()]
        return [{"role": "user", "content": shown + parts(rec.prompt)},
                {"role": "assistant", "content": parts(rec.completion)}]
    raise DataError(f"{rec.source}: a {rec.kind} row cannot be trained through a vision-language model's chat "
                    "template; use messages or prompt/completion rows")


def image_markup(processor) -> str:
    """What the chat template writes for one image part (checked to hold the processor's image token)."""
    cached = getattr(processor, "_sftlab_image_markup", None)
    if cached is not None:
        return cached
    msgs = [{"role": "user", "content": [{"type": "text", "text": _MARK_A}, {"type": "image"},
                                         {"type": "text", "text": _MARK_B}]}]
    try:
        text = processor.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # a template error of any kind: one line
        raise ModelError(f"the processor's chat template cannot render an image part ({type(e).__name__}: "
                         f"{str(e)[:120]}); use a processor whose template renders {{\"type\": \"image\"}}") from None
    a, b = text.find(_MARK_A), text.find(_MARK_B)
    markup = text[a + len(_MARK_A):b] if 0 <= a < b else ""
    token = getattr(processor, "image_token", None)
    if not token or token not in markup:
        raise ModelError(f"the processor's chat template renders an image part as {markup!r}, without the image "
                         f"token {token!r}; use the model's own processor and chat template")
    processor._sftlab_image_markup = markup
    return markup


def _cut(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` with the character ranges `holes` removed."""
    out = []
    for s, e in spans:
        for hs, he in sorted(holes):
            if he <= s or hs >= e:
                continue
            if hs > s:
                out.append((s, hs))
            s = max(s, he)
        if s < e:
            out.append((s, e))
    return out


def _occurrences(text: str, sub: str) -> list[tuple[int, int]]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append((i, i + len(sub)))
        i = text.find(sub, i + len(sub))
    return out


def processor_ids(processor, text: str, images: list | None) -> tuple[list[int], dict[str, list[int]]]:
    """The processor's ids for one row, and the other per-token arrays it returns for the model (Qwen2-VL's
    mm_token_type_ids, which its multimodal rotary positions need)."""
    kw = {"images": [images]} if images else {}
    out = processor(text=[text], add_special_tokens=False, **kw)
    wanted = set(getattr(processor, "model_input_names", ())) - {"input_ids", "attention_mask"}
    extra = {k: [int(t) for t in out[k][0]] for k in out if k in wanted and _per_token(out[k], out["input_ids"])}
    return [int(t) for t in out["input_ids"][0]], extra


def _per_token(value, ids) -> bool:
    return len(value) == 1 and hasattr(value[0], "__len__") and len(value[0]) == len(ids[0])


def tokenize_multimodal(processor, rec: Record, cfg, max_pixels: int) -> Example:
    """One record through the processor: ids with each image's tokens, labels on the answers only."""
    if cfg.template == "raw":
        raise ModelError(f"{rec.source}: data.template is 'raw', which cannot place images; set data.template=auto "
                         "or chat (the processor's chat template)")
    if not getattr(processor, "chat_template", None):
        raise ModelError("the model's processor has no chat template; sftlab renders image chats with it: save the "
                         "processor with its chat_template")
    messages = messages_of(rec)
    refs = list(rec.images or [])
    text, spans = render_chat(processor, messages, cfg.assistant_turns, cfg.train_on_prompt, rec.source)
    markup = image_markup(processor)
    holes = _occurrences(text, markup)
    if len(holes) != len(refs):
        raise DataError(f"{rec.source}: the rendered chat holds {len(holes)} image(s) but the row has {len(refs)}; "
                        f"remove the literal {markup.strip()!r} from the text")
    tok = processor.tokenizer
    ids, labels = label_offsets(tok, text, _cut(spans, holes))
    if not refs:
        return Example(ids, labels, rec.source)
    pil = [img.open_image(r, rec.source, i, max_pixels) for i, r in enumerate(refs)]
    token_id = tok.convert_tokens_to_ids(processor.image_token)
    at = [j for j, t in enumerate(ids) if t == token_id]
    if len(at) != len(refs):
        raise DataError(f"{rec.source}: the text holds the image token {processor.image_token!r} {len(at)} times "
                        f"for {len(refs)} image(s); remove the literal token from the text")
    out_ids, out_labels, prev = [], [], 0
    for j, im in zip(at, pil):
        expansion, _ = processor_ids(processor, processor.image_token, [im])  # this image's tokens, never trained
        out_ids += ids[prev:j] + expansion
        out_labels += labels[prev:j] + [IGNORE] * len(expansion)
        prev = j + 1
    out_ids += ids[prev:]
    out_labels += labels[prev:]
    full, extra = processor_ids(processor, text, pil)
    if out_ids != full:
        raise ModelError(f"{rec.source}: the processor ({type(processor).__name__}) expands image placeholders "
                         "differently inside the conversation than alone, so sftlab cannot place the labels; report "
                         "the model type to sftlab")
    return Example(out_ids, out_labels, rec.source, images=refs, token_inputs=extra or None)


def encoder(processor, cfg, max_pixels: int):
    """tokenize.tokenize_all's `encode` for a vision-language model: every record through its processor."""

    def encode(rec: Record) -> Example:
        ex = tokenize_multimodal(processor, rec, cfg, max_pixels)
        if ex.n_trained == 0:
            raise DataError(f"{rec.source}: every label is masked after tokenization (nothing to train on); check "
                            "that the answer is not empty and is not only images")
        return ex

    return encode


def vision_batch(processor, rows: list[list], sources: list[str], max_pixels: int) -> dict:
    """The image processor's tensors for a batch: `rows` holds each row's ImageRefs (maybe none). One call over
    the nested list, so the image processor pads rows with fewer or smaller images as its model expects
    (Idefics3: zero images and a pixel mask; Qwen2-VL and LLaVA: images concatenated in row order)."""
    nested = [[img.open_image(r, src, i, max_pixels) for i, r in enumerate(refs or ())]
              for refs, src in zip(rows, sources)]
    if not any(nested):
        return {}
    out = processor.image_processor(images=nested, return_tensors="pt")
    return {k: v for k, v in out.items() if hasattr(v, "shape")}
