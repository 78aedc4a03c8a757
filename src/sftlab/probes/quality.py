"""quality: text quality of greedy generations - Flesch reading ease, length, writing-quality dimensions, and a
scorer of your own.

Rows need only a prompt (`prompt` or `messages`). `dimensions` lists built-in writing scorers (readability,
empathy, safety, actionability, connection, and a model `judge`: sftlab.probes.writing, docs/writing-quality.md);
each is reported per scored checkpoint with its mean and bootstrap CI in the score's `extra.dimensions`, and
any of them can be the score's value (`metric`). The user-supplied scorer is a Python function given by dotted
path, 'package.module:function' (or 'package.module.function'), that takes one generated string and returns a
float; it is imported when the probe is built, and the dimensions' libraries are checked then, so a bad path or a
missing library fails before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from ..configtools import ConfigError, check, doc
from ..registry import RegistryError
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset
from .metrics import flesch_reading_ease, text_stats
from .writing import SCORERS, ScorerSettings, build_scorer
from .writing.base import call_function, load_function

METRICS = ("flesch", "words", "scorer", "readability", "empathy", "safety", "actionability", "connection", "judge")


@dataclass
class QualityOptions:
    path: str = doc("rows with 'prompt' (or 'messages') to answer", default="")
    metric: Literal["flesch", "words", "scorer", "readability", "empathy", "safety", "actionability", "connection",
                    "judge"] = doc("the score's value: Flesch reading ease (sftlab's own count), length in words, the "
                                   "mean of `scorer`, or one of the dimensions (scored even when not listed there)",
                                   default="flesch")
    scorer: str = doc("your scorer, 'package.module:function' taking a generated string, returning a float",
                      default="")
    higher_is_better: bool = doc("direction of the value (Flesch: higher reads easier)", default=True)
    max_new_tokens: int = doc("generation budget per prompt", default=128)
    samples: int = doc("generations kept in the score for people to read", default=4)
    kind: Literal["task", "retention"] = doc("what the generations measure", default="task")
    limit: int = doc("score a fixed seeded subset of this many rows (0: all)", default=0)
    template: Literal["auto", "chat", "raw"] = doc("how prompts are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: quality)", default="")
    dimensions: list[str] = doc(
        "writing-quality scorers reported per scored checkpoint with mean and CI: readability, empathy, safety, "
        "actionability, connection, judge (docs/writing-quality.md; pip install 'sftlab[quality]')",
        default_factory=list)
    safety_classifier: str = doc(
        "safety from your classifier instead of the lexicon: 'package.module:function' returning P(unsafe) of a "
        "text, or a local text-classification model folder", default="")
    safety_label: str = doc("the classifier label meaning unsafe (empty: the one named unsafe, toxic, harmful, ...)",
                            default="")
    judge_model: str = doc("the judge's causal LM, as model.path: a local folder, a .gguf file, 'smollm2'",
                           default="")
    judge_rubric: str = doc("the judge's criterion: overall, readability, empathy, safety, actionability, "
                            "connection, or your own text", default="overall")
    judge_dtype: Literal["float32", "bfloat16", "float16"] = doc("the judge model's dtype", default="float32")

    def __post_init__(self):
        check(bool(self.path), "path", "quality needs a file of prompts to answer")
        check(self.metric != "scorer" or bool(self.scorer), "scorer",
              "metric is 'scorer': give the function as 'package.module:function'")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        for name in self.dimensions:
            try:
                SCORERS.get(name)
            except RegistryError as e:
                raise ConfigError(f"dimensions: {e}") from None
        dup = sorted({d for d in self.dimensions if self.dimensions.count(d) > 1})
        check(not dup, "dimensions", f"{dup[0]!r} is listed twice; give it once" if dup else "")
        check("judge" not in self.scored_dimensions() or bool(self.judge_model), "judge_model",
              "the judge needs a model: give a model.path-style spec (a folder, a .gguf file, 'smollm2')")
        check(bool(self.judge_rubric.strip()), "judge_rubric", "give a rubric name or your own criterion text")

    def scored_dimensions(self) -> list[str]:
        """The dimensions to score: those listed, plus `metric` when it names one."""
        extra = [self.metric] if self.metric in SCORERS and self.metric not in self.dimensions else []
        return list(self.dimensions) + extra

    def scorer_settings(self, batch_size: int = 8) -> ScorerSettings:
        return ScorerSettings(safety_classifier=self.safety_classifier, safety_label=self.safety_label,
                              judge_model=self.judge_model, judge_rubric=self.judge_rubric,
                              judge_dtype=self.judge_dtype, batch_size=batch_size)


def load_scorer(path: str, what: str = "probes.quality.scorer") -> Callable[[str], float]:
    """Import 'package.module:function' (or 'package.module.function'); a one-line ProbeError if it fails."""
    return load_function(path, what)


def apply_scorer(fn: Callable[[str], float], text: str, path: str) -> float:
    return call_function(fn, text, path, "probes.quality.scorer")


class Quality(BaseProbe):
    registered = "quality"
    cheap = False

    def __init__(self, options: QualityOptions) -> None:
        super().__init__(options)
        self.higher_is_better = options.higher_is_better
        self.scorer = load_scorer(options.scorer) if options.scorer else None
        settings = options.scorer_settings()
        self.dimensions = {d: build_scorer(d, settings) for d in options.scored_dimensions()}

    def score(self, model, tokenizer, ctx: ProbeContext):
        from ..data.tokenize import use_chat_template
        from .generate import greedy_generate, load_prompts

        o = self.options
        prompts, _, places = load_prompts(o.path, "path", o.limit, ctx.seed, o.template, tokenizer,
                                          need_reference=False)
        raw = not use_chat_template(tokenizer, o.template)
        device = ctx.resolve_device(model)
        outs = greedy_generate(model, tokenizer, prompts, o.max_new_tokens, ctx.batch_size, device,
                               add_special_tokens=raw)
        flesch = [flesch_reading_ease(t) for t in outs]
        values = {"flesch": [f for f in flesch if f is not None],
                  "words": [float(text_stats(t)["words"]) for t in outs]}
        if self.scorer is not None:
            values["scorer"] = [apply_scorer(self.scorer, t, o.scorer) for t in outs]
        dims, per_answer = self.score_dimensions(outs, device, ctx) if self.dimensions else ({}, {})
        values.update({k: [v for v in vs if v is not None] for k, vs in per_answer.items()})
        chosen = values[o.metric]
        means = {k: (sum(v) / len(v) if v else math.nan) for k, v in values.items()}
        samples = [{"source": places[i], "prompt": prompts[i][-300:], "output": outs[i]}
                   for i in range(min(o.samples, len(outs)))]
        # every answer's values in prompt order (None: not scorable), so two checkpoints' answers to the same
        # prompts can be compared pair by pair (sftlab compare)
        aligned = {"flesch": flesch, "words": values["words"], **per_answer}
        extra = {"dimensions": dims} if dims else {}
        extra["per_answer"] = {"sources": places, "values": aligned}
        return self.make_score(means[o.metric], len(chosen), bootstrap_ci(chosen, n_boot=ctx.n_boot, seed=ctx.seed),
                               metric=o.metric, **{f"{k}_mean": v for k, v in means.items()},
                               no_words=sum(f is None for f in flesch), samples=samples, **extra)

    def score_dimensions(self, answers: list[str], device, ctx: ProbeContext) -> tuple[dict, dict]:
        """({name: {mean, ci_low, ci_high, n, scale, source, counts}}, {name: per-answer values, None where not
        scorable}); secondary values (grade level, tone) get summaries of their own, with `of` naming their
        dimension."""
        questions = question_texts(self.options.path, self.options.limit, ctx.seed)
        out: dict[str, dict] = {}
        per_answer: dict[str, list[float]] = {}
        for name, scorer in self.dimensions.items():
            spec = SCORERS.get(name)
            scored = scorer(answers, questions, device)
            per_answer[name] = [None if v is None else float(v) for v in scored.values]
            out[name] = summarise([v for v in per_answer[name] if v is not None], ctx) | {"scale": spec.scale, "source": spec.source,
                                                            "counts": dict(scored.counts)}
            for sub, vals in scored.extra.items():
                out[sub] = summarise([float(v) for v in vals if v is not None], ctx) | {"of": name}
        return out, per_answer


def summarise(values: list[float], ctx: ProbeContext) -> dict:
    lo, hi = bootstrap_ci(values, n_boot=ctx.n_boot, seed=ctx.seed)
    return {"mean": sum(values) / len(values) if values else math.nan, "ci_low": lo, "ci_high": hi, "n": len(values)}


def question_texts(path: str, limit: int, seed: int) -> list[str]:
    """The conversation each answer answers, as plain text (system turns left out), in load_prompts' order."""
    from .texts import prompt_messages, read_rows

    rows = read_rows(path, "path")
    rows = [rows[i] for i in subset(len(rows), limit, seed)]
    return ["\n\n".join(m["content"] for m in prompt_messages(row, place) if m["role"] != "system")
            for place, row in rows]


register_probe("quality", QualityOptions, Quality,
               "text quality of greedy generations: Flesch reading ease, length, writing-quality dimensions "
               "(readability, empathy, safety, actionability, connection, a model judge), your own scorer",
               cheap=False)
