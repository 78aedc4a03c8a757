"""Batched log-likelihoods of trained spans, through the same forward pass and labels as training.

`objectives.forward_hidden` gives final hidden states aligned with the input ids (it drops the
virtual tokens prompt tuning prepends), and the output layer is applied only at scored positions,
so a probe costs what an eval step costs and works on plain HF and PEFT-wrapped models alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import DataSection
from ..data.collate import pad_batch
from ..data.formats import Record
from ..data.tokenize import IGNORE, Example, fit_length, tokenize_record, use_chat_template
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
                     chunk: int = 1024) -> list[tuple[float, int, int]]:
    """Per example: (sum of log p(target) over its trained positions, their count, argmax-correct count)."""
    out: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(examples)
    with scoring(model):
        for idx in length_batches(examples, batch_size):
            batch = to_device(pad_batch([examples[i] for i in idx], pad), device)
            hidden, head = forward_hidden(model, batch)  # (B, L, H)
            for i, r in zip(idx, _span_logprobs(hidden, batch["targets"], head, chunk)):
                out[i] = r
    return out


def group_logprobs(model, groups: list[list[Example]], pad: int, batch_size: int, device,
                   chunk: int = 1024) -> list[list[tuple[float, int, int]]]:
    """example_logprobs for groups of examples that share a prompt (one row's labels or choices).

    The shared token prefix is run once and its key/value cache reused for every continuation, so
    scoring 8 labels of a 150-token prompt costs about one prompt, not eight. Results equal
    example_logprobs' (tested); models that rewrite the cache themselves (prefix and prompt tuning)
    take the plain path.
    """
    if not _cache_reusable(model) or not groups:
        flat = [e for g in groups for e in g]
        res, out, at = example_logprobs(model, flat, pad, batch_size, device, chunk), [], 0
        for g in groups:
            out.append(res[at:at + len(g)])
            at += len(g)
        return out
    order = length_batches(groups, batch_size, length=lambda g: len(g[0].input_ids))  # batch_size prompts
    out: list = [None] * len(groups)
    with scoring(model):
        for idx in order:
            for i, r in zip(idx, _groups_batch(model, [groups[i] for i in idx], pad, device, chunk)):
                out[i] = r
    return out


def _cache_reusable(model) -> bool:
    """A transformers model whose cache we may extend (prefix/prompt tuning write their own into it)."""
    from transformers import PreTrainedModel

    cfg = getattr(model, "peft_config", None)
    if cfg and any(getattr(c, "is_prompt_learning", False) for c in cfg.values()):
        return False
    return isinstance(unwrap(model), PreTrainedModel)


def _cache_arg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _shared_prefix(group: list[Example]) -> int:
    """Tokens common to every example, leaving each at least one token of its own."""
    first, n = group[0].input_ids, min(len(e.input_ids) for e in group) - 1
    for e in group[1:]:
        n = next((i for i in range(n) if e.input_ids[i] != first[i]), n)
    return n


def _groups_batch(model, groups: list[list[Example]], pad: int, device, chunk: int) -> list[list]:
    """Several groups at once: their shared prefixes right-padded into one batch and run once, the cache
    repeated per continuation, the continuations in one batch (their positions continue each prefix)."""
    P = [_shared_prefix(g) for g in groups]
    if min(P) < 1:
        return [example_logprobs(model, g, pad, len(g), device, chunk) for g in groups]
    flat = [e for g in groups for e in g]
    owner = [i for i, g in enumerate(groups) for _ in g]  # group of each continuation
    Pmax, name = max(P), _cache_arg(model)  # transformers renamed past_key_values to cache (5.2x)
    pre_ids = torch.full((len(groups), Pmax), pad, dtype=torch.long)
    pre_mask = torch.zeros((len(groups), Pmax), dtype=torch.long)
    for i, g in enumerate(groups):
        pre_ids[i, :P[i]] = torch.tensor(g[0].input_ids[:P[i]])
        pre_mask[i, :P[i]] = 1
    T = max(len(e.input_ids) - P[o] for e, o in zip(flat, owner))
    cont_ids = torch.full((len(flat), T), pad, dtype=torch.long)
    cont_mask = torch.zeros((len(flat), T), dtype=torch.long)
    for k, (e, o) in enumerate(zip(flat, owner)):
        cont_ids[k, :len(e.input_ids) - P[o]] = torch.tensor(e.input_ids[P[o]:])
        cont_mask[k, :len(e.input_ids) - P[o]] = 1
    idx = torch.tensor(owner)
    pre_ids, pre_mask, cont_ids, cont_mask, idx = to_device(
        {"a": pre_ids, "b": pre_mask, "c": cont_ids, "d": cont_mask, "e": idx}, device).values()
    with head_removed(model) as head:
        pre = model(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True)
        cache = getattr(pre, name)
        for layer in cache.layers:  # each prompt's keys and values, once per continuation of it
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        pos = torch.tensor([P[o] for o in owner], device=cont_ids.device)[:, None] + torch.arange(
            T, device=cont_ids.device)  # (N, T): positions continue each prompt (its padding is masked)
        cont = model(input_ids=cont_ids, attention_mask=torch.cat([pre_mask[idx], cont_mask], 1), position_ids=pos,
                     use_cache=True, **{name: cache}).logits  # (N, T, H)
    batch = to_device(pad_batch(flat, pad), device)  # targets of the whole sequences, (N, L)
    hidden = cont.new_zeros((len(flat), batch["targets"].shape[1], cont.shape[-1]))  # (N, L, H)
    for k, o in enumerate(owner):
        n = len(flat[k].input_ids)
        hidden[k, :P[o]] = pre.logits[o, :P[o]]
        hidden[k, P[o]:n] = cont[k, :n - P[o]]
    res, out, at = _span_logprobs(hidden, batch["targets"], head, chunk), [], 0
    for g in groups:
        out.append(res[at:at + len(g)])
        at += len(g)
    return out


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


def answer_examples(tokenizer, prompts: list[list[dict]], answers: list[str], template: str, max_length: int,
                    sources: list[str]) -> list[Example]:
    """Each prompt conversation followed by its answer as the assistant turn; labels on the answer.

    With a chat template the scored span is the answer plus the end-of-turn token (as in training),
    so an answer that is a prefix of another ("bio" / "biology") is not favoured for being short.
    """
    cfg = data_section(template, max_length)
    chat = use_chat_template(tokenizer, template)
    out = []
    for msgs, ans, src in zip(prompts, answers, sources):
        if chat:
            rec = Record("chat", src, messages=msgs + [{"role": "assistant", "content": ans}])
        else:
            rec = Record("prompt_completion", src, prompt="\n\n".join(m["content"] for m in msgs), completion=ans)
        ex = fit_length(tokenize_record(tokenizer, rec, chat, cfg), max_length)
        if ex is None:
            raise DataError(f"{src}: the answer {ans[:40]!r} alone is longer than max_length={max_length}; "
                            "raise the probe's max_length")
        out.append(ex)
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
