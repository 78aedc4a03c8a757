"""heldout_loss: token-mean completion-only loss and perplexity on a data file.

The examples are read and tokenized exactly as training data (any supported format, chat
template, completion-only labels), so on a run's eval file this equals the loss the training loop
logs. Pointed at general data (`kind: retention`) it measures forgetting instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from ..errors import DataError
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset


@dataclass
class HeldoutOptions:
    path: str = doc("data file in any training format (prompt/completion, chat, alpaca, text)", default="")
    kind: Literal["task", "retention"] = doc("what the loss measures: the task, or retention on general data",
                                             default="task")
    limit: int = doc("score a fixed seeded subset of this many examples (0: all)", default=0)
    max_length: int = doc("maximum tokens per example (prompts are left-truncated first)", default=512)
    template: Literal["auto", "chat", "raw"] = doc("how examples are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: heldout_loss)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "heldout_loss needs the data file to score")
        check(self.limit >= 0, "limit", "must be >= 0")
        check(self.max_length >= 8, "max_length", "must be >= 8")


class HeldoutLoss(BaseProbe):
    registered = "heldout_loss"
    higher_is_better = False
    cheap = True

    def examples(self, tokenizer, seed: int):
        from ..config import DataSource
        from ..data.formats import read_source
        from ..data.tokenize import tokenize_all
        from .likelihood import data_section

        o = self.options
        records = read_source(DataSource(path=o.path))
        records = [records[i] for i in subset(len(records), o.limit, seed)]
        from ..models import processor_of

        cfg = data_section(o.template, o.max_length, assistant_turns="all")  # every answer counts, as in training
        proc = processor_of(tokenizer)  # a vision-language run: every row through its processor, as in training
        encode = None
        if proc is not None:
            from ..config_vision import DEFAULT_MAX_PIXELS
            from ..data.multimodal import encoder

            encode = encoder(proc, cfg, getattr(proc, "sftlab_max_pixels", DEFAULT_MAX_PIXELS))
        examples, stats = tokenize_all(records, tokenizer, cfg, encode=encode)
        if not examples:
            raise DataError(f"{o.path}: every example is longer than max_length={o.max_length}; raise it")
        return examples, stats

    def score(self, model, tokenizer, ctx: ProbeContext):
        from .likelihood import example_logprobs, pad_id, vision_maker

        examples, stats = self.examples(tokenizer, ctx.seed)
        res = example_logprobs(model, examples, pad_id(tokenizer), ctx.batch_size, ctx.resolve_device(model),
                               vision=vision_maker(tokenizer))
        nll = [-lp / n for lp, n, _ in res]  # per-example token-mean loss
        tokens = [n for _, n, _ in res]
        total = sum(tokens)
        loss = sum(-lp for lp, _, _ in res) / max(total, 1)
        ci = bootstrap_ci(nll, weights=tokens, n_boot=ctx.n_boot, seed=ctx.seed)
        return self.make_score(loss, len(examples), ci, ppl=math.exp(loss), ppl_ci=[math.exp(c) for c in ci],
                               tokens=total, token_acc=sum(c for _, _, c in res) / max(total, 1),
                               dropped=len(stats.dropped))


register_probe("heldout_loss", HeldoutOptions, HeldoutLoss,
               "token-mean completion-only loss (and perplexity) on a data file")
