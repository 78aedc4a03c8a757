"""The study config: a run config's shared sections (run, data options, train, checkpoint, scoring, logging)
plus a `study:` section. Each (model, task) becomes one arena config (`arena_config`), validated before
anything trains, so a typo fails in a second, not after the first arena.

Built-in tasks (data written once under the cache root, deterministic):

- desks (label task): the demo's task, an article's opening -> its desk code letter; label-scoring accuracy
  (`classify`), a likelihood probe scored during training.
- describe (generative task): an article's opening -> its Wikipedia short description ("Edible berry",
  "English theologian (1328-1384)"), answered by greedy generation of a few tokens and scored by ROUGE-L F1
  (`generate`); generation runs after each arena, at every checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from ..configtools import ConfigError, apply_overrides, check, doc, from_dict

STUDY_FILE = "study.json"  # STUDY/study.json: the plan (arenas, their tasks and score names)


@dataclass
class StudySection:
    name: str = doc("the study folder's name (under output_dir)", default="study")
    output_dir: str = doc("where the study folder is made", default="runs")
    models: list[str] = doc("base models, each as model.path takes it (smollm2, a folder, a hub id); one arena "
                            "per (model, task)", default_factory=lambda: ["smollm2"])
    tasks: list[str] = doc("tasks: built-in (desks: label task; describe: generative) or names in custom_tasks",
                           default_factory=lambda: ["desks", "describe"])
    custom_tasks: dict[str, dict[str, Any]] = doc("your own tasks: {name: {train: FILE, probe: {name: classify|generate|"
                                        "heldout_loss|..., ...}}}; a generate probe makes it generative",
                                        default_factory=dict)
    task_eval: int = doc("held-out rows each built-in task probe scores", default=24)
    describe_tokens: int = doc("describe: greedy generation budget per answer", default=10)
    methods: list[str] = doc("methods (full is the reference; the questions need full, lora, oft and prefix or "
                             "prompt)", default_factory=lambda: ["full", "lora", "oft", "prompt"])
    method_options: dict[str, dict] = doc("as arena.method_options", default_factory=dict)
    budgets: list[str] = doc("trainable-parameter budgets, as arena.budgets", default_factory=lambda: ["50k"])
    seeds: list[int] = doc("seeds (>= 3 for confidence intervals worth reading)", default_factory=lambda: [0, 1, 2])
    lrs: dict[str, list[float]] = doc("per method, the learning rates swept (each method keeps its own by "
                                      "lr_rule)", default_factory=dict)
    model_lrs: dict[str, dict[str, list[float]]] = doc("per model, learning rates replacing `lrs` for it",
                                                       default_factory=dict)
    lr_rule: str = doc("as arena.lr_rule: hypervolume or final_task", default="hypervolume")
    retention: dict[str, Any] = doc("the retention probe shared by every arena",
                          default_factory=lambda: {"name": "kl_to_base", "n": 4, "max_length": 64})
    alphas: list[float] = doc("the alpha grid between the base (0) and each kept trial's final checkpoint (1)",
                              default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    best_alpha_w: float = doc("best alpha: the largest w x task + (1 - w) x retention, both min-max scaled over "
                              "the base and the grid", default=0.5)
    analyze: bool = doc("run `sftlab analyze` on kept trials (question e)", default=True)
    analyze_steps: int = doc("checkpoints analysed per kept trial, evenly spaced, the final one included",
                             default=3)
    analyze_texts: int = doc("texts per activation set (general, task)", default=8)
    analyze_layers: str = doc("layers for activations: auto (4 evenly spaced), all, or 0,5,10", default="auto")
    findings: str = doc("where the findings page is written ('' : STUDY/findings.md)", default="docs/findings.md")

    def __post_init__(self):
        check(bool(self.models), "models", "list at least one model")
        check(bool(self.tasks), "tasks", "list at least one task")
        check(len(set(self.seeds)) == len(self.seeds) and bool(self.seeds), "seeds", "list distinct seeds")
        check(all(0 < a <= 1 for a in self.alphas), "alphas", "each alpha must be in (0, 1]")
        check(0 <= self.best_alpha_w <= 1, "best_alpha_w", "must be in [0, 1]")
        check(self.analyze_steps >= 1, "analyze_steps", "must be >= 1")
        for t in self.tasks:
            check(t in BUILTIN or t in self.custom_tasks, "tasks",
                  f"{t!r} is neither built in ({', '.join(BUILTIN)}) nor in custom_tasks")
        for name, spec in self.custom_tasks.items():
            check(isinstance(spec.get("probe"), dict) and "name" in spec["probe"] and bool(spec.get("train")),
                  f"custom_tasks.{name}", "give {train: FILE, probe: {name: PROBE, ...}}")

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class TaskSpec:
    name: str
    kind: str  # "label" | "generative"
    train: str
    probe: dict  # the task probe's config entry
    score: str  # its score's name in trajectory.jsonl

    @property
    def generative(self) -> bool:
        return self.kind == "generative"


BUILTIN = ("desks", "describe")
DESCRIBE_VERSION = 1
DESCRIBE_QUESTION = "Write this article's short description (a few words, like an encyclopedia's subtitle)."


def task_spec(study: StudySection, name: str) -> TaskSpec:
    if name in study.custom_tasks:
        spec = study.custom_tasks[name]
        probe = dict(spec["probe"])
        kind = spec.get("kind") or ("generative" if probe["name"] in ("generate", "quality") else "label")
        return TaskSpec(name, kind, str(spec["train"]), probe, probe.get("score_name") or probe["name"])
    if name == "desks":
        from ..assets import ensure_demo_data

        data = ensure_demo_data()
        probe = {"name": "classify", "path": str(data.eval), "limit": study.task_eval, "labels": list(data.labels)}
        return TaskSpec(name, "label", str(data.train), probe, "classify")
    train, evals = describe_data()
    probe = {"name": "generate", "path": str(evals), "limit": study.task_eval, "metric": "rouge_l",
             "max_new_tokens": study.describe_tokens, "samples": 6}
    return TaskSpec(name, "generative", str(train), probe, "generate")


def describe_data(n_train: int = 800, n_eval: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """(train, eval) JSONL for the describe task, written once under the cache root: articles whose short
    description has 2-6 words, openings <= 160 characters; disjoint articles, seeded order."""
    from ..assets import opening, wiki_path, write_jsonl
    from ..models import cache_root

    out = cache_root() / "data" / f"wiki-describe-v{DESCRIBE_VERSION}"
    train, evals, meta = out / "train.jsonl", out / "eval.jsonl", out / "meta.json"
    if meta.is_file():
        return train, evals
    data = json.loads(wiki_path().read_text(encoding="utf-8"))
    rows = []
    for title in sorted(data):
        art = data[title]
        desc, extract = (art.get("description") or "").strip(), art.get("extract") or ""
        if 2 <= len(desc.split()) <= 6 and len(extract) >= 80:
            rows.append({"messages": [{"role": "user", "content": f"{DESCRIBE_QUESTION}\n\n{opening(extract)}"},
                                      {"role": "assistant", "content": desc}]})
    random.Random(seed).shuffle(rows)
    if len(rows) < n_train + n_eval:
        raise ConfigError(f"describe task: only {len(rows)} usable articles, need {n_train + n_eval}")
    write_jsonl(evals, rows[:n_eval])
    write_jsonl(train, rows[n_eval:n_eval + n_train])
    meta.write_text(json.dumps({"task": "wiki-describe", "version": DESCRIBE_VERSION, "train": n_train,
                                "eval": n_eval, "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                           for p in (train, evals)}}, indent=1))
    return train, evals


def slug(model: str) -> str:
    """A folder-safe short name for a model spec (a path: its last part)."""
    base = Path(model.rstrip("/")).name or model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudySection, dict]:
    """(study section, the shared run-config sections). Overrides address both: study.seeds=[0]."""
    from ..config import read_yaml

    data = read_yaml(Path(path), "study config")
    if not isinstance(data, dict) or not isinstance(data.get("study", {}), dict):
        raise ConfigError(f"{path}: a study config is a run config's shared sections plus a 'study:' section")
    apply_overrides(data, list(overrides))
    return study_from_dict(data)


def study_from_dict(data: dict) -> tuple[StudySection, dict]:
    data = copy.deepcopy(data)
    study = from_dict(StudySection, data.pop("study", {}) or {}, "study")
    for key, why in (("method", "list methods in study.methods"), ("arena", "the study makes its arenas"),
                     ("model", "list models in study.models"), ("probes", "the study sets each task's probe and "
                                                                           "study.retention")):
        if key in data:
            raise ConfigError(f"{key}: a study config has no {key} section; {why}")
    return study, data


def arena_config(study: StudySection, base: dict, model: str, task: TaskSpec) -> dict:
    """The arena config (a dict, as YAML would give it) of one (model, task)."""
    d = copy.deepcopy(base)
    d["model"] = {**(d.get("model") or {}), "path": model}
    d["data"] = {**(d.get("data") or {}), "train": [{"path": task.train}]}
    d["probes"] = [task.probe, dict(study.retention)]
    lrs = {**study.lrs, **study.model_lrs.get(model, {})}
    d["arena"] = {"name": f"{slug(model)}-{task.name}", "output_dir": str(study.folder),
                  "methods": list(study.methods), "method_options": study.method_options,
                  "budgets": list(study.budgets), "seeds": list(study.seeds),
                  "lrs": {m: lrs[m] for m in study.methods if m in lrs}, "lr_rule": study.lr_rule,
                  "task": task.score, "retention": study.retention.get("score_name") or study.retention["name"]}
    return d


def plan(study: StudySection, base: dict) -> list[dict]:
    """One entry per (model, task): {name, model, task, kind, score, retention, config}; every config validated."""
    from ..arena.plan import arena_from_dict

    out = []
    specs = [task_spec(study, t) for t in study.tasks]
    for model in study.models:
        for spec in specs:
            cfg = arena_config(study, base, model, spec)
            arena_from_dict(cfg)  # fails here, before anything trains
            out.append({"name": cfg["arena"]["name"], "model": model, "task": spec.name, "kind": spec.kind,
                        "score": spec.score, "retention": cfg["arena"]["retention"], "config": cfg})
    return out
