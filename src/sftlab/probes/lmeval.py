"""lm_eval: lm-evaluation-harness tasks as one probe (`pip install 'sftlab[lmeval]'`).

For users who have the harness's datasets (or write their own task YAML over a local file): the
in-memory model, plain or PEFT-wrapped, is wrapped in lm-eval's `HFLM(pretrained=model, ...)` and
scored with its `evaluate`; weights are never re-loaded. Likelihood tasks (output types
`loglikelihood`, `loglikelihood_rolling`, `multiple_choice`) are cheap and run at every checkpoint;
a `generate_until` task makes the probe a generation probe (`cheap: auto` decides from the tasks).

Several tasks give one score: the mean of the tasks' metric (each task weighted equally, or, with
`average: samples`, every document weighted equally, as lm-eval groups with `weight_by_size`), with
each task's value, count and interval in `extra['tasks']`. One probe entry per task is the other
way: give each its own `score_name`.

Intervals come from lm-eval's per-document results (`log_samples`): a percentile bootstrap over
documents (Efron & Tibshirani 1993, ch. 13), stratified by task when there are several (each
resample redraws every task's documents within that task, so a task never vanishes from a
resample). For one task with a mean-aggregated metric (acc, acc_norm, exact_match) it is exactly
sftlab's `bootstrap_ci` over the per-document values. Corpus-level metrics (BLEU, F1, MCC, ...) are
re-aggregated by the task's own function on each of at most 100 resamples (lm-eval also caps these at
100). lm-eval's own stderr is not computed (`bootstrap_iters=0`): its bootstrap forks a process pool
per metric, which a training process should not do.

`limit` picks a seeded subset of each task's documents (sftlab's `subset`), not lm-eval's first N.
Scoring seeds python `random`, numpy and torch with the context's seed as `simple_evaluate` does, and
restores all three afterwards, so a probe run mid-training does not shift the training RNG streams.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from .base import BaseProbe, ProbeContext, ProbeError, register_probe, subset

INSTALL = "pip install 'sftlab[lmeval]'"
LIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
MAX_CORPUS_BOOT = 100  # resamples for corpus-level metrics, each a full re-aggregation (as lm-eval caps them)


@dataclass
class LmEvalOptions:
    tasks: list[str] = doc("lm-eval task, group or tag names, or paths to task YAML files", default_factory=list)
    include_path: list[str] = doc("folders of task YAML files indexed besides lm-eval's own (their task names "
                                  "can then be used in tasks)", default_factory=list)
    metric: str = doc("the metric reported, in every task (default: each task's first metric, e.g. acc)",
                      default="")
    filter: str = doc("the filter whose results are reported (default: each task's first, e.g. none)", default="")
    num_fewshot: int = doc("few-shot examples per prompt (-1: the task's own setting, else 0; like lm-eval, a "
                           "task that fixes num_fewshot: 0 keeps it)", default=-1)
    limit: int = doc("score a fixed seeded subset of this many documents per task (0: all)", default=0)
    average: Literal["tasks", "samples"] = doc("several tasks: mean of the task values, or of all documents "
                                               "(weight by size)", default="tasks")
    chat_template: bool = doc("render prompts with the tokenizer's chat template (lm-eval "
                              "--apply_chat_template; few-shot examples as turns)", default=False)
    batch_size: int = doc("HFLM batch size (0: scoring.batch_size)", default=0)
    cheap: Literal["auto", "yes", "no"] = doc("run at every checkpoint; auto: yes when every task is scored by "
                                              "likelihood, no when one generates (loads the tasks to find out)",
                                              default="auto")
    kind: Literal["task", "retention"] = doc("what the tasks measure", default="retention")
    score_name: str = doc("name of the score in trajectory.jsonl (default: lm_eval)", default="")

    def __post_init__(self):
        check(bool(self.tasks), "tasks", "lm_eval needs at least one task name or task YAML path")
        check(all(isinstance(t, str) and t for t in self.tasks), "tasks", "must be non-empty strings")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", "has duplicates")
        check(self.num_fewshot >= -1, "num_fewshot", "must be >= 0 (or -1 for the task's own setting)")
        check(self.limit >= 0 and self.batch_size >= 0, "limit", "limit and batch_size must be >= 0")


def import_lm_eval():
    """(lm_eval module, HFLM class), or a ProbeError that says how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ProbeError(f"probes.lm_eval: lm-evaluation-harness is not installed ({e}); {INSTALL}") from None
    return lm_eval, HFLM


_MANAGERS: dict = {}  # (include paths, with lm-eval's own tasks) -> TaskManager: indexing its ~15k YAMLs takes ~15 s


def task_manager(include_path: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (include_path, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(include_path) or None, include_defaults=defaults)
    return _MANAGERS[key]


def _is_yaml_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and os.path.isfile(spec)


def load_tasks(options: LmEvalOptions) -> dict:
    """{task name: lm-eval Task} of every leaf task the options name (groups and tags expanded)."""
    import_lm_eval()
    for p in options.include_path:
        if not os.path.isdir(p):
            raise ProbeError(f"probes.lm_eval.include_path: {p!r} is not a folder")
    include = tuple(options.include_path)
    names = [t for t in options.tasks if not _is_yaml_file(t)]
    tm = task_manager(include, False) if include or not names else None
    if tm is None or any(n not in tm.all_tasks for n in names):
        tm = task_manager(include, True)  # lm-eval's own task index only when a name needs it
    for n in names:
        if n not in tm.all_tasks:
            near = difflib.get_close_matches(n, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else "; list them with `lm-eval ls tasks`"
            raise ProbeError(f"probes.lm_eval.tasks: {n!r} is neither an lm-eval task/group/tag nor a YAML file{hint}")
    try:
        tasks = tm.load(list(options.tasks))["tasks"]
    except Exception as e:  # dataset download offline, bad YAML, ...: one line, traceback with --debug
        raise ProbeError(f"probes.lm_eval: could not load {options.tasks}: {type(e).__name__}: {e}") from e
    if not tasks:
        raise ProbeError(f"probes.lm_eval.tasks: {options.tasks} name no tasks")
    return tasks


def seeded_rngs(seed: int | None):
    """Context manager: python random, numpy and torch seeded for the block (None: left as they are), their
    states restored after (loading a dataset draws from `random` too)."""
    import random
    from contextlib import contextmanager

    import numpy as np
    import torch

    @contextmanager
    def block():
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])

    return block()


def boot_stats(items: list, agg, is_mean: bool, n_boot: int, seed: int):
    """Bootstrap replicates of agg(items) over documents: (n_boot,) for a mean, (<= 100,) for corpus metrics.

    The mean draws its indices exactly as `bootstrap_ci` does (same generator, same chunks), so one
    task's percentile interval equals bootstrap_ci over its per-document values.
    """
    import numpy as np

    n = len(items)
    rng = np.random.default_rng(seed)
    if is_mean:
        v = np.asarray(items, dtype=np.float64)
        chunk, out = max(1, 2_000_000 // n), []
        for s in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - s), n))  # (chunk, n) document indices
            out.append(v[idx].mean(axis=1))
        return np.concatenate(out)
    reps = min(n_boot, MAX_CORPUS_BOOT)
    return np.array([float(agg([items[i] for i in rng.integers(0, n, size=n)])) for _ in range(reps)])


def _ci(stats) -> tuple[float, float]:
    import numpy as np

    if len(stats) == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(lo), float(hi)


class LmEval(BaseProbe):
    registered = "lm_eval"
    higher_is_better = True  # until scored: then each task's own direction (they must agree)

    def __init__(self, options: LmEvalOptions) -> None:
        super().__init__(options)
        self._tasks: dict | None = None

    @property
    def cheap(self) -> bool:
        if self.options.cheap != "auto":
            return self.options.cheap == "yes"
        return all(t.get_config("output_type") in LIKELIHOOD_TYPES for t in self.tasks().values())

    def tasks(self) -> dict:
        """The loaded lm-eval tasks, kept for the next checkpoint (their datasets load once per probe)."""
        if self._tasks is None:
            with seeded_rngs(None):
                self._tasks = load_tasks(self.options)
        return self._tasks

    def _prepare(self, tasks: dict, seed: int) -> dict | None:
        """Few-shot settings as simple_evaluate applies them; the seeded `limit` subsets (None: all documents)."""
        o = self.options
        for t in tasks.values():
            if o.num_fewshot >= 0 and t.get_config("num_fewshot") != 0:
                t.set_config(key="num_fewshot", value=o.num_fewshot)
            elif t.get_config("num_fewshot") is None:
                t.set_config(key="num_fewshot", value=0)
            t.set_fewshot_seed(seed=seed)  # resets the few-shot sampler: same examples at every checkpoint
        if not o.limit:
            return None
        return {name: subset(len(t.eval_docs), o.limit, seed) for name, t in tasks.items()}

    def evaluate(self, model, tokenizer, ctx: ProbeContext) -> dict:
        """lm-eval's results dict (with per-document `samples`) for the in-memory model."""
        _, HFLM = import_lm_eval()
        from lm_eval.evaluator import evaluate

        o = self.options
        tasks = self.tasks()
        with seeded_rngs(ctx.seed):
            # HFLM sets a pad token on the tokenizer it gets when there is none: a copy, not the run's own. Its
            # warnings that a model object (not a name) was passed are what we mean, at every checkpoint: quiet
            log = logging.getLogger("lm_eval.models.huggingface")
            level, _ = log.level, log.setLevel(logging.ERROR)
            try:
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                          batch_size=o.batch_size or ctx.batch_size)
            finally:
                log.setLevel(level)
            samples = self._prepare(tasks, ctx.seed)
            try:
                return evaluate(lm=lm, task_dict={"tasks": tasks}, samples=samples, bootstrap_iters=0,
                                log_samples=True, apply_chat_template=o.chat_template,
                                fewshot_as_multiturn=o.chat_template)
            except ProbeError:
                raise
            except (ValueError, KeyError) as e:  # unsafe-code tasks, bad templates: say which probe
                raise ProbeError(f"probes.lm_eval: lm-eval failed on {list(tasks)}: {e}") from e

    def task_result(self, name: str, task, res: dict, seed: int, n_boot: int) -> dict:
        """One task's reported metric: value, direction, per-document items and their bootstrap replicates."""
        o = self.options
        metrics = [m["metric"] for m in task.get_config("metric_list") or []] or list(task.aggregation())
        metric = o.metric or metrics[0]
        if metric not in task.aggregation():
            raise ProbeError(f"probes.lm_eval.metric: task {name!r} has no metric {metric!r} "
                             f"(it has {', '.join(task.aggregation())})")
        docs = res["samples"][name]
        filters = list(dict.fromkeys(d["filter"] for d in docs))
        filt = o.filter or filters[0]
        if filt not in filters:
            raise ProbeError(f"probes.lm_eval.filter: task {name!r} has no filter {filt!r} (it has {filters})")
        items = [d[metric] for d in docs if d["filter"] == filt]
        if not items:
            raise ProbeError(f"probes.lm_eval: task {name!r} has no documents to score")
        agg = task.aggregation()[metric]
        is_mean = getattr(agg, "__name__", "") == "mean" and all(isinstance(x, numbers.Real) for x in items)
        stats = boot_stats(items, agg, is_mean, n_boot, seed)
        value = res["results"][name][f"{metric},{filt}"]
        return {"value": float(value), "n": len(items), "metric": metric, "filter": filt,
                "higher_is_better": bool(res["higher_is_better"][name][metric]),
                "ci": _ci(stats), "stats": stats, "n_boot": len(stats),
                "num_fewshot": res.get("n-shot", {}).get(name),
                "output_type": task.get_config("output_type")}

    def score(self, model, tokenizer, ctx: ProbeContext):
        import numpy as np

        res = self.evaluate(model, tokenizer, ctx)
        per = {name: self.task_result(name, t, res, ctx.seed + i, ctx.n_boot)
               for i, (name, t) in enumerate(sorted(self.tasks().items()))}
        hib = {r["higher_is_better"] for r in per.values()}
        if len(hib) > 1:
            raise ProbeError(f"probes.lm_eval: the tasks' metrics point different ways (higher is better for "
                             f"{[n for n, r in per.items() if r['higher_is_better']]} only); use one probe per task")
        self.higher_is_better = hib.pop()
        n = sum(r["n"] for r in per.values())
        k = min(len(r["stats"]) for r in per.values())
        stats = np.stack([r["stats"][:k] for r in per.values()])  # (tasks, resamples): stratified replicates
        if self.options.average == "samples":
            w = np.array([r["n"] for r in per.values()], dtype=np.float64)[:, None] / n
            value, ci = sum(r["value"] * r["n"] for r in per.values()) / n, _ci((stats * w).sum(0))
        else:
            value, ci = sum(r["value"] for r in per.values()) / len(per), _ci(stats.mean(0))
        detail = {name: {key: r[key] for key in ("value", "n", "metric", "filter", "higher_is_better", "n_boot",
                                                   "num_fewshot", "output_type")}
                  | {"ci_low": r["ci"][0], "ci_high": r["ci"][1]} for name, r in per.items()}
        first = next(iter(per.values()))
        return self.make_score(value, n, ci, tasks=detail, metric=first["metric"], filter=first["filter"],
                               average=self.options.average, lm_eval_version=_version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return ""


register_probe("lm_eval", LmEvalOptions, LmEval,
               f"lm-evaluation-harness tasks on the in-memory model ({INSTALL}); likelihood tasks run every "
               "checkpoint, generation tasks where generation probes do")
