"""Records -> token ids with completion-only labels.

Chat records are rendered with the tokenizer's chat template. The assistant spans are found by
rendering each conversation prefix with and without the generation prompt and diffing the strings,
so the prompt/answer boundary never depends on `{% generation %}` markers in the template. The
end-of-turn token after each answer stays a label (otherwise the model never learns to stop); note
that for SmolLM2 it is also the pad token, so padding is masked by length, never by token id.

A tokenizer without a chat template (a base model such as Gemma-3-270M) under data.template=auto gets
sftlab's plain format instead (`render_plain`): each turn a paragraph, each answer after "Answer:" on the
next line, the final answer followed by EOS, the tokenizer's BOS in front; answers are found the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..errors import DataError, ModelError
from .formats import Record

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not apply
    source: str
    images: list | None = None  # images.ImageRef of the row's images (vision-language models; multimodal.py)
    # other per-token model inputs the processor made for a row with images ({name: ids}, 0 where absent)
    token_inputs: dict | None = None

    @property
    def n_trained(self) -> int:
        """Tokens the loss applies to. labels[0] never becomes a target (nothing precedes it to predict it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # sources of dropped over-long examples

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens, {self.trained_tokens} trained tokens, "
                f"{self.truncated} prompts left-truncated, {len(self.dropped)} dropped as over-long")


def use_chat_template(tokenizer, template: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ModelError("data.template: 'chat' but the tokenizer has no chat template; use a model whose "
                         "tokenizer has one (data.template=raw works for prompt/completion and text data only)")
    return has if template == "auto" else template == "chat"


PLAIN_CUE = "Answer:"  # what precedes an answer in the plain format; the answer follows after one space


def render_plain(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as plain text for a model without a chat template: turns are paragraphs, an assistant
    turn is "Answer: <content>" on the line after its question, and the generation prompt is the cue alone:

        Which desk code does this article go to? ...      (user)
        <BLANK LINE>
        Apollo 11 was ...                                  (the same user turn's second paragraph)
        Answer: H                                          (assistant)
    """
    out = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out += f"\n{PLAIN_CUE} {m['content']}"
        else:
            out += ("\n\n" if i else "") + m["content"]
    return out + (f"\n{PLAIN_CUE}" if add_generation_prompt else "")


def render_chat(tokenizer, messages: list[dict], assistant_turns: str, train_on_prompt: bool, source: str,
                plain: bool = False):
    """Return (text, spans): the rendered chat and the character spans to train on (`plain`: render_plain)."""

    def render(msgs, gen):
        if plain:
            return render_plain(msgs, gen)
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages, False)
    if train_on_prompt:
        return text, [(0, len(text))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant_turns == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        if i == 0:  # nothing before it to render with a generation prompt, so no prompt/answer boundary
            raise DataError(f"{source}: the conversation starts with an assistant message, which answers nothing; "
                            "start it with a user or system message, or set data.assistant_turns=last")
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ModelError(
                f"{source}: the chat template renders conversation prefixes inconsistently (it rewrites earlier "
                "turns), so answer spans cannot be located; use data.assistant_turns=last or a template "
                "without history rewriting")
        end = len(upto.rstrip())  # keep the end-of-turn token, not the newline after it
        spans.append((len(before), end))
    return text, spans


def label_offsets(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Token ids of `text`; a token is a label when it holds at least one character of a span.

    "Holds any character" (not "starts inside"): a token merged across the boundary (the header's
    newline + an answer that starts with a newline) carries the answer's first characters, so it
    must be trained, as `{% generation %}` masks in transformers/TRL do.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        end = max(end, start + 1)  # zero-width offsets: treat as the character at `start`
        if any(start < e and end > s for s, e in spans):
            labels[j] = ids[j]
    return ids, labels


def plain_ids(tokenizer, text: str, spans: list[tuple[int, int]], messages: list[dict]):
    """Token ids and labels of a plain-format chat: the tokenizer's leading specials (BOS) + the text + EOS,
    which is a label when the final turn is a trained answer (the model learns to stop, as with end-of-turn)."""
    ids, labels = label_offsets(tokenizer, text, spans)
    probe = tokenizer("a")["input_ids"]
    lead = probe[:_n_leading_specials(tokenizer, probe)]  # BOS where the tokenizer adds one (Gemma), else none
    ids, labels = lead + ids, [IGNORE] * len(lead) + labels
    eos = tokenizer.eos_token_id
    if eos is not None and messages and messages[-1]["role"] == "assistant":
        trained = bool(spans) and spans[-1][1] >= len(text.rstrip())
        ids, labels = ids + [eos], labels + [eos if trained else IGNORE]
    return ids, labels


def tokenize_raw(tokenizer, rec: Record, train_on_prompt: bool):
    """prompt + completion (+ EOS) as plain text, like TRL's non-conversational prompt-completion."""
    if rec.kind == "text":
        prompt, completion = "", rec.text
    else:
        prompt, completion = rec.prompt, rec.completion
    ids = tokenizer(prompt + completion)["input_ids"]  # special tokens per the tokenizer (BOS when it adds one)
    # The answer starts where the prompt's own tokens and the joint tokens diverge, not at len(prompt tokens):
    # a prompt ending in a space ("Answer: " + "Paris") tokenizes jointly as [..., ":", " Paris"], and counting
    # the prompt's tokens would mask " Paris", so the answer's first token would never be trained.
    n_prompt = common_prefix(tokenizer(prompt)["input_ids"], ids) if prompt else _n_leading_specials(tokenizer, ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    first = 0 if train_on_prompt else n_prompt
    labels = [IGNORE] * first + ids[first:]
    return ids, labels


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids the two lists share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _n_leading_specials(tokenizer, ids: list[int]) -> int:
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def tokenize_record(tokenizer, rec: Record, chat: bool, cfg) -> Example:
    if rec.images:
        raise DataError(f"{rec.source}: this row has images but the model is a text-only model; use a "
                        "vision-language model (a folder whose config.json has a vision_config) or remove the images")
    if rec.kind == "text":
        ids, labels = tokenize_raw(tokenizer, rec, True)
    elif chat:
        messages = rec.messages if rec.kind == "chat" else [
            {"role": "user", "content": rec.prompt}, {"role": "assistant", "content": rec.completion}]
        text, spans = render_chat(tokenizer, messages, cfg.assistant_turns, cfg.train_on_prompt, rec.source)
        ids, labels = label_offsets(tokenizer, text, spans)
    elif rec.kind == "chat" and cfg.template == "auto":  # the tokenizer has no chat template: the plain format
        text, spans = render_chat(tokenizer, rec.messages, cfg.assistant_turns, cfg.train_on_prompt, rec.source,
                                  plain=True)
        ids, labels = plain_ids(tokenizer, text, spans, rec.messages)
    elif rec.kind == "chat":
        raise ModelError(f"{rec.source}: chat data needs a chat template or sftlab's plain format, but "
                         "data.template is 'raw'; set data.template=auto (the plain format when the tokenizer has "
                         "no template) or chat")
    else:
        ids, labels = tokenize_raw(tokenizer, rec, cfg.train_on_prompt)
    ex = Example(ids, labels, rec.source)
    if ex.n_trained == 0:
        raise DataError(f"{rec.source}: every label is masked after tokenization (nothing to train on); check "
                        "that the answer is not empty and the chat template renders assistant turns")
    return ex


def fit_length(ex: Example, max_length: int) -> Example | None:
    """Left-truncate the prompt so the example fits; None when the last answer itself does not fit."""
    excess = len(ex.input_ids) - max_length
    if excess <= 0:
        return ex
    # Start of the last trained span: everything before it is prompt that may be cut from the left.
    j = len(ex.labels) - 1
    while j >= 0 and ex.labels[j] == IGNORE:  # untrained tail (e.g. the newline after end-of-turn)
        j -= 1
    while j >= 0 and ex.labels[j] != IGNORE:
        j -= 1
    last_start = j + 1
    # At least one prompt token must stay: the answer's first token is predicted from the token before it.
    if excess >= last_start:
        return None
    return Example(ex.input_ids[excess:], ex.labels[excess:], ex.source)


def tokenize_all(records: list[Record], tokenizer, cfg, progress: bool = False,
                 encode=None) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record; over-long ones are left-truncated, then dropped (or an error) per cfg.overlong.
    `encode(record) -> Example` replaces the text path (a vision-language model's processor: multimodal.py); rows
    with images are never truncated (a cut through an image's tokens breaks it), only dropped."""
    if encode is None:
        chat = use_chat_template(tokenizer, cfg.template)
        encode = partial(tokenize_record, tokenizer, chat=chat, cfg=cfg)
    stats = TokenizeStats()
    out = []
    it = records
    if progress and len(records) > 2000:
        from tqdm.auto import tqdm

        it = tqdm(records, desc="tokenizing", unit="ex")
    for rec in it:
        ex = encode(rec)
        fitted = fit_length(ex, cfg.max_length) if not ex.images else (
            ex if len(ex.input_ids) <= cfg.max_length else None)
        if fitted is None and ex.images and cfg.overlong == "error":
            raise DataError(f"{rec.source}: {len(ex.input_ids)} tokens with its images, above data.max_length="
                            f"{cfg.max_length}; rows with images are never truncated: raise data.max_length, use "
                            "smaller images or set data.overlong=drop")
        if fitted is None:
            if cfg.overlong == "error":
                raise DataError(f"{rec.source}: the answer alone is longer than data.max_length={cfg.max_length} "
                                "tokens; raise data.max_length or set data.overlong=drop")
            stats.dropped.append(rec.source)
            continue
        stats.truncated += fitted is not ex
        out.append(fitted)
        stats.examples += 1
        stats.tokens += len(fitted.input_ids)
        stats.trained_tokens += fitted.n_trained
    return out, stats
