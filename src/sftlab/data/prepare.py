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


def prepare_data(cfg, tokenizer, progress: bool = False) -> Prepared:
    d = cfg.data
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
    train, train_stats = tokenize_all(records, tokenizer, d, progress)
    if not train:
        raise DataError(f"data.train: every example was dropped as longer than data.max_length={d.max_length}; "
                        "raise data.max_length")
    ev, eval_stats = tokenize_all(eval_records, tokenizer, d, progress)
    return Prepared(train, ev, train_stats, eval_stats)
