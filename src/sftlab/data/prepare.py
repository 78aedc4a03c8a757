"""Config -> tokenized train and eval examples, shared by `train` and `data inspect`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import DataError
from .formats import load_records
from .tokenize import Example, TokenizeStats, tokenize_all


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats

    def stats_dict(self) -> dict:
        def d(s: TokenizeStats):
            return {"examples": s.examples, "tokens": s.tokens, "trained_tokens": s.trained_tokens,
                    "truncated": s.truncated, "dropped": len(s.dropped)}

        return {"train_stats": d(self.train_stats), "eval_stats": d(self.eval_stats)}


_MEMO: dict[str, Prepared] = {}  # the last result: an arena's trials run in one process tokenize once


def _memo_key(cfg, tokenizer, processor=None) -> str | None:
    """Data options, seed, tokenizer and the sources' sizes and times; None when a source is not a file."""
    import hashlib
    import json
    import os

    from ..configtools import to_dict

    stats = []
    for src in list(cfg.data.train) + list(cfg.data.eval):
        if not os.path.isfile(src.path):
            return None  # a hub dataset or a folder: no cheap way to tell it changed
        st = os.stat(src.path)
        stats.append([os.path.abspath(src.path), st.st_size, st.st_mtime_ns])
    key = {"data": to_dict(cfg.data), "seed": cfg.run.seed, "files": stats,
           "processor": [type(processor).__name__, str(getattr(processor, "chat_template", "")),
                         cfg.vision.max_image_pixels] if processor is not None else None,
           "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer), sorted(_added(tokenizer)),
                         str(getattr(tokenizer, "chat_template", "")), tokenizer.pad_token_id, tokenizer.eos_token_id]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _added(tokenizer) -> list:
    """Added tokens (model.new_tokens): two tokenizers of one length may differ in them."""
    get = getattr(tokenizer, "get_added_vocab", None)
    return [list(kv) for kv in get().items()] if get else []


def prepare_data(cfg, tokenizer, progress: bool = False, processor=None) -> Prepared:
    """Tokenized train and eval examples; the same inputs twice in one process are tokenized once
    (the examples are read-only to everything downstream). `processor`: a vision-language model's processor,
    through which every record is tokenized (data/multimodal.py)."""
    key = _memo_key(cfg, tokenizer, processor)
    if key is not None and key in _MEMO:
        return _MEMO[key]
    out = _prepare(cfg, tokenizer, progress, processor)
    if key is not None:
        _MEMO.clear()
        _MEMO[key] = out
    return out


def _prepare(cfg, tokenizer, progress: bool, processor=None) -> Prepared:
    d = cfg.data
    encode = None
    if processor is not None:
        from .multimodal import encoder

        encode = encoder(processor, d, cfg.vision.max_image_pixels)
    if not d.train:
        raise DataError("data.train: no training data; add a source, e.g. data.train=[{path: train.jsonl}]")
    records = load_records(d.train, cfg.run.seed)
    if d.limit:
        records = records[: d.limit]
    eval_records = load_records(d.eval, cfg.run.seed) if d.eval else []
    if d.eval_fraction:
        order = list(range(len(records)))
        random.Random(cfg.run.seed).shuffle(order)
        n_eval = max(1, int(round(d.eval_fraction * len(records))))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    train, train_stats = tokenize_all(records, tokenizer, d, progress, encode)
    if not train:
        raise DataError(f"data.train: every example was dropped as longer than data.max_length={d.max_length}; "
                        "raise data.max_length")
    ev, eval_stats = tokenize_all(eval_records, tokenizer, d, progress, encode)
    return Prepared(train, ev, train_stats, eval_stats)
