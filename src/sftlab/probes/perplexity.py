"""perplexity: corpus perplexity on general text - a retention probe.

exp(token-mean negative log-likelihood) over plain text passages, every token scored. The default
corpus is a fixed, seeded set of Wikipedia lead sections from the offline summaries; give `path` for
your own (a .txt file of blank-line separated passages, or rows with a `text` field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset


@dataclass
class PerplexityOptions:
    path: str = doc("general text: a .txt file (passages separated by blank lines) or rows with 'text'; "
                    "empty: offline Wikipedia lead sections", default="")
    n: int = doc("Wikipedia passages to use when path is empty", default=64)
    limit: int = doc("score a fixed seeded subset of this many passages of `path` (0: all)", default=0)
    max_length: int = doc("tokens per passage (longer ones keep their beginning)", default=256)
    kind: Literal["task", "retention"] = doc("what the perplexity measures", default="retention")
    score_name: str = doc("name of the score in trajectory.jsonl (default: perplexity)", default="")

    def __post_init__(self):
        check(self.n >= 1, "n", "must be >= 1")
        check(self.limit >= 0, "limit", "must be >= 0")
        check(self.max_length >= 2, "max_length", "must be >= 2")


def general_or_file(path: str, n: int, limit: int, seed: int, what: str) -> list[str]:
    """The passages a retention probe reads: `path`'s (a seeded subset of `limit`), or `n` Wikipedia leads."""
    from .texts import general_passages, read_texts

    if not path:
        return general_passages(n, seed=0)  # one fixed corpus, whatever the run's seed
    texts = read_texts(path, what)
    return [texts[i] for i in subset(len(texts), limit, seed)]


class Perplexity(BaseProbe):
    registered = "perplexity"
    higher_is_better = False
    cheap = True

    def score(self, model, tokenizer, ctx: ProbeContext):
        from .likelihood import example_logprobs, pad_id, text_examples

        o = self.options
        texts = general_or_file(o.path, o.n, o.limit, ctx.seed, "probes.perplexity.path")
        examples = text_examples(tokenizer, texts, o.max_length)
        res = example_logprobs(model, examples, pad_id(tokenizer), ctx.batch_size, ctx.resolve_device(model))
        tokens = [n for _, n, _ in res]
        loss = sum(-lp for lp, _, _ in res) / sum(tokens)
        lo, hi = bootstrap_ci([-lp / n for lp, n, _ in res], weights=tokens, n_boot=ctx.n_boot, seed=ctx.seed)
        return self.make_score(math.exp(loss), len(examples), (math.exp(lo), math.exp(hi)), loss=loss,
                               loss_ci=[lo, hi], tokens=sum(tokens))


register_probe("perplexity", PerplexityOptions, Perplexity,
               "corpus perplexity on general text (default: offline Wikipedia leads)")
