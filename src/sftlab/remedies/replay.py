"""replay: a stated share of the training *tokens* is general text, so the model keeps rehearsing it.

Rehearsal of pretraining-like data is the oldest remedy against catastrophic forgetting (Robins 1995,
"Catastrophic forgetting, rehearsal and pseudorehearsal"). `data.train` can already mix a plain-text source by
example `weight`; this recipe states the mix the way it matters, as tokens: with `share` s and T trained task
tokens, general-text passages are added (every token trained) until they hold s/(1-s) x T trained tokens, i.e.
a share s of all trained tokens per epoch. Passages are cycled when the pool is smaller than that.

The replay text must never be the retention probes' text: a probe would then measure memory of the replay, not
retention. The default pool is the offline Wikipedia leads *after* the ones any Wikipedia-reading probe uses
(probes take the first n of one fixed order); any overlap with a retention probe's passages (the same passage,
or one containing the other) is refused before training. What was mixed goes to provenance.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..configtools import check, doc
from ..errors import DataError
from .base import Hooks, RemedySpec, register_remedy


@dataclass
class ReplayOptions:
    share: float = doc("share of all trained tokens (task + replay) that are general text, in (0, 1)", default=0.1)
    path: str = doc("general text: a .txt file (passages separated by blank lines) or rows with 'text'; empty: "
                    "offline Wikipedia leads that no probe reads", default="")
    n: int = doc("passages in the pool (Wikipedia when path is empty; a seeded subset of path's when > 0)",
                 default=256)
    max_length: int = doc("tokens per replay passage (longer ones keep their beginning)", default=256)

    def __post_init__(self):
        check(0 < self.share < 1, "share", f"must be in (0, 1), got {self.share}")
        check(self.n >= 0, "n", "must be >= 0")
        check(self.max_length >= 2, "max_length", "must be >= 2")


def _norm(text: str) -> str:
    return " ".join(text.split())


def probe_texts(cfg) -> list[str]:
    """The passages the config's retention probes read from files or Wikipedia (kl_to_base, perplexity, ...)."""
    from ..probes.perplexity import general_or_file

    out = []
    for i, p in enumerate(cfg.probes):
        o = p.options
        if getattr(o, "kind", "retention") != "retention" or not hasattr(o, "max_length") or not hasattr(o, "n"):
            continue
        out += general_or_file(getattr(o, "path", ""), o.n, getattr(o, "limit", 0), cfg.run.seed,
                               f"probes[{i}].path")
    return out


def wiki_skip(cfg) -> int:
    """How many of the fixed-order Wikipedia leads the probes read (they read the first n)."""
    return max([p.options.n for p in cfg.probes if hasattr(p.options, "n") and not getattr(p.options, "path", "x")]
               + [0])


def replay_texts(cfg, o: ReplayOptions) -> tuple[list[str], str]:
    """(the replay pool, where it came from)."""
    from ..probes.perplexity import general_or_file
    from ..probes.texts import general_passages

    if o.path:
        return general_or_file(o.path, o.n, o.n, cfg.run.seed, "remedies.replay.path"), o.path
    skip = wiki_skip(cfg)
    return general_passages(skip + o.n, seed=0)[skip:], f"wikipedia leads {skip}..{skip + o.n - 1}"


def check_no_overlap(replay: list[str], probes: list[str]) -> None:
    """Refuse replay text that is, or contains, or is contained in a retention probe's passage."""
    keys = [_norm(t) for t in probes if _norm(t)]
    exact = set(keys)
    for i, t in enumerate(replay):
        r = _norm(t)
        hit = r in exact or next((k for k in keys if (len(k) > 40 and k in r) or (len(r) > 40 and r in k)), None)
        if hit:
            raise DataError(f"remedies.replay: replay passage {i} ({r[:50]!r}...) overlaps a retention probe's "
                            "text, so the probe would measure memory of the replay; give replay.path or the probe "
                            "a disjoint corpus")


class Replay(Hooks):
    def __init__(self, options: ReplayOptions):
        self.options = options
        self.record: dict = {}

    def prepare(self, trainer, data):
        from ..data.tokenize import Example

        cfg, o = trainer.cfg, self.options
        texts, source = replay_texts(cfg, o)
        check_no_overlap(texts, probe_texts(cfg))
        max_len = min(o.max_length, cfg.data.max_length)
        pool = []
        for i, t in enumerate(texts):
            ids = trainer.tokenizer(t)["input_ids"][:max_len]
            if len(ids) >= 2:
                pool.append(Example(list(ids), list(ids), f"replay:{i}"))  # every token trained
        if not pool:
            raise DataError("remedies.replay: no replay passage has 2 tokens or more; give longer text")
        task = sum(e.n_trained for e in data.train)
        want = o.share / (1 - o.share) * task
        added, got = [], 0
        while got < want:
            ex = pool[len(added) % len(pool)]
            added.append(ex)
            got += ex.n_trained
        stats = dataclasses.replace(data.train_stats, examples=data.train_stats.examples + len(added),
                                    tokens=data.train_stats.tokens + sum(len(e.input_ids) for e in added),
                                    trained_tokens=data.train_stats.trained_tokens + got)
        self.record = {"share": o.share, "source": source, "passages": len(pool), "replay_examples": len(added),
                       "replay_trained_tokens": got, "task_trained_tokens": task,
                       "actual_share": got / max(got + task, 1), "overlap_checked_against": len(probe_texts(cfg))}
        # a new Prepared: the examples prepare_data returns are shared read-only (memoised per process)
        return dataclasses.replace(data, train=list(data.train) + added, train_stats=stats)

    def provenance(self) -> dict:
        return self.record


register_remedy(RemedySpec("replay", ReplayOptions, Replay,
                           "a share of the trained tokens is general text (Wikipedia leads no probe reads, or a "
                           "file), checked disjoint from the retention probes' text", "data",
                           cite="Robins 1995", objectives=("sft",)))
