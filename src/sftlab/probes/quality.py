"""quality: text quality of greedy generations - Flesch reading ease, length, and a scorer of your own.

Rows need only a prompt (`prompt` or `messages`). The user-supplied scorer is a Python function given
by dotted path, 'package.module:function' (or 'package.module.function'), that takes one generated
string and returns a float (a readability, empathy or safety judge, say); it is imported when the
probe is built, so a bad path fails before any model loads.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

from ..configtools import check, doc
from .base import BaseProbe, ProbeContext, ProbeError, bootstrap_ci, register_probe
from .metrics import flesch_reading_ease, text_stats


@dataclass
class QualityOptions:
    path: str = doc("rows with 'prompt' (or 'messages') to answer", default="")
    metric: Literal["flesch", "words", "scorer"] = doc(
        "the score's value: Flesch reading ease, length in words, or the mean of `scorer`", default="flesch")
    scorer: str = doc("your scorer, 'package.module:function' taking a generated string, returning a float",
                      default="")
    higher_is_better: bool = doc("direction of the value (Flesch: higher reads easier)", default=True)
    max_new_tokens: int = doc("generation budget per prompt", default=128)
    samples: int = doc("generations kept in the score for people to read", default=4)
    kind: Literal["task", "retention"] = doc("what the generations measure", default="task")
    limit: int = doc("score a fixed seeded subset of this many rows (0: all)", default=0)
    template: Literal["auto", "chat", "raw"] = doc("how prompts are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: quality)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "quality needs a file of prompts to answer")
        check(self.metric != "scorer" or bool(self.scorer), "scorer",
              "metric is 'scorer': give the function as 'package.module:function'")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")


def load_scorer(path: str, what: str = "probes.quality.scorer") -> Callable[[str], float]:
    """Import 'package.module:function' (or 'package.module.function'); a one-line ProbeError if it fails."""
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ProbeError(f"{what}: {path!r} is not a dotted path; write it as 'package.module:function'")
    try:
        obj = importlib.import_module(mod)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ProbeError(f"{what}: cannot import module {mod!r} ({type(e).__name__}: {msg}); check the "
                         "spelling and that it is on the Python path") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProbeError(f"{what}: module {mod!r} has no {attr!r}; check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ProbeError(f"{what}: {path!r} is a {type(obj).__name__}, not a function taking a string")
    return obj


def apply_scorer(fn: Callable[[str], float], text: str, path: str) -> float:
    try:
        value = fn(text)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ProbeError(f"probes.quality.scorer: {path} raised {type(e).__name__}: {msg}") from None
    try:  # ints, floats, numpy / torch scalars; not strings or booleans
        number = float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ProbeError(f"probes.quality.scorer: {path} returned {value!r}; it must return a finite float")
    return number


class Quality(BaseProbe):
    registered = "quality"
    cheap = False

    def __init__(self, options: QualityOptions) -> None:
        super().__init__(options)
        self.higher_is_better = options.higher_is_better
        self.scorer = load_scorer(options.scorer) if options.scorer else None

    def score(self, model, tokenizer, ctx: ProbeContext):
        from ..data.tokenize import use_chat_template
        from .generate import greedy_generate, load_prompts

        o = self.options
        prompts, _, places = load_prompts(o.path, "path", o.limit, ctx.seed, o.template, tokenizer,
                                          need_reference=False)
        raw = not use_chat_template(tokenizer, o.template)
        outs = greedy_generate(model, tokenizer, prompts, o.max_new_tokens, ctx.batch_size, ctx.resolve_device(model),
                               add_special_tokens=raw)
        flesch = [flesch_reading_ease(t) for t in outs]
        values = {"flesch": [f for f in flesch if f is not None],
                  "words": [float(text_stats(t)["words"]) for t in outs]}
        if self.scorer is not None:
            values["scorer"] = [apply_scorer(self.scorer, t, o.scorer) for t in outs]
        chosen = values[o.metric]
        means = {k: (sum(v) / len(v) if v else math.nan) for k, v in values.items()}
        samples = [{"source": places[i], "prompt": prompts[i][-300:], "output": outs[i]}
                   for i in range(min(o.samples, len(outs)))]
        return self.make_score(means[o.metric], len(chosen), bootstrap_ci(chosen, n_boot=ctx.n_boot, seed=ctx.seed),
                               metric=o.metric, **{f"{k}_mean": v for k, v in means.items()},
                               no_words=sum(f is None for f in flesch), samples=samples)


register_probe("quality", QualityOptions, Quality,
               "text quality of greedy generations: Flesch reading ease, length, your own scorer", cheap=False)
