"""Batched log-likelihoods of trained spans, through the same forward pass and labels as training.

`objectives.forward_hidden` gives final hidden states aligned with the input ids (it drops the
virtual tokens prompt tuning prepends), and the output layer is applied only at scored positions,
so a probe costs what an eval step costs and works on plain HF and PEFT-wrapped models alike.
"""

from __future__ import annotations

import copy
import json
import weakref
from contextlib import contextmanager

import torch

from ..config import DataSection
from ..data.collate import pad_batch
from ..data.formats import Record
from ..data.tokenize import IGNORE, Example, common_prefix, fit_length, tokenize_record, use_chat_template
from ..errors import DataError
from ..objectives import forward_hidden, head_removed, to_device, unwrap


@contextmanager
def scoring(model):
    """Eval mode (no dropout) under no_grad; the model's training flag is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def length_batches(examples: list, batch_size: int, length=lambda e: len(e.input_ids)) -> list[list[int]]:
    """Index batches of similar lengths (less padding); deterministic (stable sort)."""
    order = sorted(range(len(examples)), key=lambda i: length(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def example_logprobs(model, examples: list[Example], pad: int, batch_size: int, device,
                     chunk: int = 1024, vision=None) -> list[tuple[float, int, int]]:
    """Per example: (sum of log p(target) over its trained positions, their count, argmax-correct count).
    `vision`: a vision-language model's batch image tensors maker (vision_maker), as in training."""
    out: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(examples)
    with scoring(model):
        for idx in length_batches(examples, batch_size):
            batch = to_device(pad_batch([examples[i] for i in idx], pad, vision=vision), device)
            hidden, head = forward_hidden(model, batch)  # (B, L, H)
            for i, r in zip(idx, _span_logprobs(hidden, batch["targets"], head, chunk)):
                out[i] = r
    return out


def group_logprobs(model, groups: list[list[Example]], pad: int, batch_size: int, device,
                   chunk: int = 1024, vision=None) -> list[list[tuple[float, int, int]]]:
    """example_logprobs for groups of examples that share a prompt (one row's labels or choices).

    Each row's prompt is run once and its key/value cache reused for every continuation, and the tokens
    every row begins with (a chat template's system turn, a fixed instruction) are run once for all rows:
    scoring 8 labels of a 100-token prompt costs about the prompt's own tokens, not eight prompts. Prefix
    and prompt tuning share too (their virtual tokens enter the cache in the first pass, the rest runs on
    the base model with positions after them). Results equal example_logprobs' (tested).

    A vision-language model (`vision` set: its batches' image tensors maker) scores every sequence whole, images
    and all, as training's forward pass does: the shared-cache path would have to carry pixel values and
    multimodal positions (Qwen2-VL) into its block masks.
    """
    if not groups:
        return []
    if vision is not None:
        return _split(example_logprobs(model, [e for g in groups for e in g], pad, batch_size, device, chunk,
                                       vision), groups)
    P = [_shared_prefix(g) for g in groups]
    C = _all_rows_prefix(groups, P)
    learned = _prompt_learning(model)
    if not _cache_reusable(model) or min(P) < 1 or (learned and C < 1):
        return _split(example_logprobs(model, [e for g in groups for e in g], pad, batch_size, device, chunk),
                      groups)
    # Prefix and prompt tuning add their virtual tokens in the common pass; the later passes extend that cache
    # on the model underneath, with positions after the virtual tokens (where the plain forward puts them).
    inner = unwrap(model) if learned else model
    order = length_batches(groups, batch_size, length=lambda g: len(g[0].input_ids))  # batch_size prompts
    out: list = [None] * len(groups)
    with scoring(model), head_removed(model) as head:
        common = _run_common(model, groups[0][0].input_ids[:C], device) if C else None
        for idx in order:
            res = _groups_batch(model, inner, [groups[i] for i in idx], [P[i] for i in idx], pad, device, chunk,
                                head, common)
            for i, r in zip(idx, res):
                out[i] = r
    return out


def _split(flat_results: list, groups: list[list]) -> list[list]:
    """Results of the flattened groups, regrouped."""
    out, at = [], 0
    for g in groups:
        out.append(flat_results[at:at + len(g)])
        at += len(g)
    return out


def _prompt_learning(model) -> bool:
    cfg = getattr(getattr(model, "module", model), "peft_config", None)
    return bool(cfg) and any(getattr(c, "is_prompt_learning", False) for c in cfg.values())


def _cache_reusable(model) -> bool:
    """A transformers model whose key/value cache we may extend, with SDPA attention (which takes the block
    masks of _groups_batch as they are; other attention kernels take the plain path)."""
    from transformers import PreTrainedModel

    base = unwrap(model)
    return isinstance(base, PreTrainedModel) and getattr(base.config, "_attn_implementation", "") == "sdpa"


def _cache_arg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _shared_prefix(group: list[Example]) -> int:
    """Tokens common to every example, leaving each at least one token of its own."""
    first = group[0].input_ids
    return min([len(e.input_ids) - 1 for e in group] + [common_prefix(first, e.input_ids) for e in group[1:]])


def _last_scored(e: Example) -> int:
    """Index of the last token whose log-prob is scored (the input before it predicts it)."""
    return max((i for i, x in enumerate(e.labels) if x != IGNORE), default=len(e.input_ids) - 1)


def _all_rows_prefix(groups: list[list[Example]], P: list[int]) -> int:
    """Tokens every group's shared prefix (`P`: their lengths) begins with, leaving each group one of its own."""
    first = groups[0][0].input_ids
    return max(0, min([min(P) - 1] + [common_prefix(first, g[0].input_ids) for g in groups[1:]]))


def _run_common(model, ids: list[int], device) -> tuple:
    """The tokens every prompt starts with, run once (with prefix/prompt tuning's virtual tokens): their hidden
    states (C, H) and key/value cache (batch 1)."""
    x = torch.tensor([ids], device=device)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    return out.logits[0, -len(ids):], getattr(out, _cache_arg(model))


def _repeat_cache(cache, idx) -> None:
    for layer in cache.layers:  # rows picked (and repeated) along the batch dimension
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _groups_batch(model, inner, groups: list[list[Example]], P: list[int], pad: int, device, chunk: int, head,
                  common: tuple | None) -> list[list]:
    """Several groups at once, one row each: the rest of the group's shared prefix (after the common tokens,
    cached in `common`), then every continuation of the group side by side, each attending to the prefix
    and to itself only (a block mask; positions of each continuation continue the prefix). Equal to
    scoring every (prompt, answer) sequence on its own, at the cost of one prompt plus its answers. `P`: each
    group's shared prefix length; `inner`: the model that extends the common cache (group_logprobs)."""
    C = 0 if common is None else common[0].shape[0]
    flat = [e for g in groups for e in g]
    owner = [i for i, g in enumerate(groups) for _ in g]  # group of each continuation
    name = _cache_arg(model)  # transformers renamed past_key_values to cache (5.2x)
    cache = None if common is None else copy.deepcopy(common[1])  # the common cache serves every batch
    K = 0 if cache is None else cache.get_seq_length()  # cached positions before each row
    # Inputs after the last scored token are not needed (its prediction comes from the token before it): an
    # answer "B<|im_end|>\n" adds one token per label, not three.
    end = [min(len(e.input_ids), max(P[o] + 1, _last_scored(e))) for e, o in zip(flat, owner)]
    row = [p - C for p in P]  # each group's row: the rest of its prefix, then its continuations
    for k, o in enumerate(owner):
        row[o] += end[k] - P[o]
    S, G = max(row), len(groups)
    ids = torch.full((G, S), pad, dtype=torch.long)
    pos = torch.zeros((G, S), dtype=torch.long)
    allowed = torch.zeros((G, S, S), dtype=torch.bool)
    start = [0] * len(flat)  # where each continuation sits in its group's row
    ks = iter(range(len(flat)))
    for i, g in enumerate(groups):
        r = P[i] - C
        ids[i, :r] = torch.tensor(g[0].input_ids[C:P[i]])
        pos[i, :r] = K + torch.arange(r)
        allowed[i, :r, :r] = torch.ones(r, r, dtype=torch.bool).tril()
        at = r
        for e in g:
            k = next(ks)
            t = end[k] - P[i]
            ids[i, at:at + t] = torch.tensor(e.input_ids[P[i]:end[k]])
            pos[i, at:at + t] = K + r + torch.arange(t)
            allowed[i, at:at + t, :r] = True
            allowed[i, at:at + t, at:at + t] = torch.ones(t, t, dtype=torch.bool).tril()
            start[k] = at
            at += t
        allowed[i, torch.arange(at, S), torch.arange(at, S)] = True  # padding sees itself: no empty softmax
    mask = torch.cat([torch.ones((G, S, K), dtype=torch.bool), allowed], -1)[:, None]  # (G, 1, S, K + S)
    ids, pos, mask = to_device({"a": ids, "b": pos, "c": mask}, device).values()
    kw = {}
    if cache is not None:
        _repeat_cache(cache, torch.zeros(G, dtype=torch.long, device=ids.device))
        kw = {name: cache}
    h = inner(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None, **kw).logits
    batch = to_device(pad_batch(flat, pad), device)  # targets of the whole sequences, (N, L)
    hidden = h.new_zeros((len(flat), batch["targets"].shape[1], h.shape[-1]))  # (N, L, H)
    for k, o in enumerate(owner):
        if C:
            hidden[k, :C] = common[0]
        hidden[k, C:P[o]] = h[o, :P[o] - C]
        hidden[k, P[o]:end[k]] = h[o, start[k]:start[k] + end[k] - P[o]]
    return _split(_span_logprobs(hidden, batch["targets"], head, chunk), groups)


def _span_logprobs(hidden, targets, head, chunk: int) -> list[tuple[float, int, int]]:
    """Per row of (B, L, H) hidden states: summed log p(target), scored count, argmax-correct count."""
    sel = targets != IGNORE
    rows = sel.nonzero()[:, 0]  # (N,) batch row of each scored position
    h, y = hidden[sel], targets[sel]  # (N, H), (N,)
    lp_sum = torch.zeros(hidden.shape[0], dtype=torch.float64, device=h.device)
    ok = torch.zeros(hidden.shape[0], dtype=torch.long, device=h.device)
    for s in range(0, y.numel(), chunk):
        logits = head(h[s:s + chunk]).float()  # (n, V)
        lp = logits.log_softmax(-1).gather(-1, y[s:s + chunk, None])[:, 0]
        lp_sum.index_add_(0, rows[s:s + chunk], lp.double())
        ok.index_add_(0, rows[s:s + chunk], (logits.argmax(-1) == y[s:s + chunk]).long())
    counts = sel.sum(-1)
    return [(float(lp_sum[j]), int(counts[j]), int(ok[j])) for j in range(hidden.shape[0])]


def data_section(template: str, max_length: int, assistant_turns: str = "last") -> DataSection:
    """The data options tokenization needs: completion-only labels (by default on the last assistant turn)."""
    return DataSection(template=template, max_length=max_length, assistant_turns=assistant_turns,
                       train_on_prompt=False)


def vision_maker(tokenizer):
    """A vision-language run's batch image tensors maker (pad_batch's `vision`, as in training), None for a text
    model: the processor travels with the run's tokenizer (models.processor_of)."""
    from functools import partial

    from ..config_vision import DEFAULT_MAX_PIXELS
    from ..data.multimodal import vision_batch
    from ..models import processor_of

    proc = processor_of(tokenizer)
    if proc is None:
        return None
    return partial(vision_batch, proc, max_pixels=getattr(proc, "sftlab_max_pixels", DEFAULT_MAX_PIXELS))


def _image_key(images) -> list | None:
    if not images:
        return None
    return [[f"{r.kind}:{r.value}" if r.kind in ("path", "base64") else f"{r.kind}:{id(r.value)}" for r in row]
            for row in images]


def memo_answer_examples(owner, tokenizer, prompts: list[list[dict]], answers: list[str], template: str,
                         max_length: int, sources: list[str], images: list[list] | None = None) -> list[Example]:
    """answer_examples, remembered on `owner` (a probe) for the same tokenizer and inputs: a run scores the
    same rows at every checkpoint, and tokenizing them again is a tenth of a small probe's cost."""
    key = (len(tokenizer), template, max_length, json.dumps([prompts, answers, sources, _image_key(images)]))
    hit = owner.__dict__.get("_answer_examples")  # one entry: the rows of the latest call
    if hit is None or hit[0]() is not tokenizer or hit[1] != key:  # the same tokenizer object, same inputs
        hit = (weakref.ref(tokenizer), key, answer_examples(tokenizer, prompts, answers, template, max_length,
                                                            sources, images))
        owner.__dict__["_answer_examples"] = hit
    return hit[2]


def answer_examples(tokenizer, prompts: list[list[dict]], answers: list[str], template: str, max_length: int,
                    sources: list[str], images: list[list] | None = None) -> list[Example]:
    """Each prompt conversation followed by its answer as the assistant turn; labels on the answer.

    With a chat template the scored span is the answer plus the end-of-turn token (as in training),
    so an answer that is a prefix of another ("bio" / "biology") is not favoured for being short.
    A vision-language run (the tokenizer's processor, models.processor_of) renders every row through the
    processor as training does (data/multimodal.py), each with its `images` (ImageRefs; none for a text row).
    """
    from ..models import processor_of

    cfg = data_section(template, max_length)
    if processor_of(tokenizer) is not None:
        return _vision_answer_examples(processor_of(tokenizer), prompts, answers, cfg, sources, images)
    if any(images or ()):
        raise DataError(f"{sources[[bool(i) for i in images].index(True)]}: this row has images but the model is a "
                        "text-only model; score image rows on a vision-language model's run, or remove the images")
    chat = use_chat_template(tokenizer, template)
    out = []
    for msgs, ans, src in zip(prompts, answers, sources):
        if chat or template == "auto":  # auto without a chat template: the plain format, as in training
            rec = Record("chat", src, messages=msgs + [{"role": "assistant", "content": ans}])
        else:
            rec = Record("prompt_completion", src, prompt="\n\n".join(m["content"] for m in msgs), completion=ans)
        ex = fit_length(tokenize_record(tokenizer, rec, chat, cfg), max_length)
        if ex is None:
            raise DataError(f"{src}: the answer {ans[:40]!r} alone is longer than max_length={max_length}; "
                            "raise the probe's max_length")
        out.append(ex)
    return out


def _vision_answer_examples(proc, prompts, answers, cfg, sources, images) -> list[Example]:
    from ..config_vision import DEFAULT_MAX_PIXELS
    from ..data.multimodal import tokenize_multimodal

    out = []
    max_pixels = getattr(proc, "sftlab_max_pixels", DEFAULT_MAX_PIXELS)
    for i, (msgs, ans, src) in enumerate(zip(prompts, answers, sources)):
        refs = list(images[i]) if images else []
        rec = Record("chat", src, messages=msgs + [{"role": "assistant", "content": ans}], images=refs or None)
        ex = tokenize_multimodal(proc, rec, cfg, max_pixels)
        fitted = fit_length(ex, cfg.max_length) if not refs else (ex if len(ex.input_ids) <= cfg.max_length else None)
        if fitted is None:
            raise DataError(f"{src}: {len(ex.input_ids)} tokens{' with its images' if refs else ''}, above the probe's "
                            f"max_length={cfg.max_length} (rows with images are never truncated); raise max_length")
        out.append(fitted)
    return out


def text_examples(tokenizer, texts: list[str], max_length: int, sources: list[str] | None = None) -> list[Example]:
    """Plain text, every token scored; longer texts keep their first `max_length` tokens."""
    out = []
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"][:max_length]
        if len(ids) < 2:
            raise DataError(f"{sources[i] if sources else f'text {i}'}: fewer than 2 tokens; nothing to score")
        out.append(Example(list(ids), list(ids), sources[i] if sources else f"text {i}"))
    return out
