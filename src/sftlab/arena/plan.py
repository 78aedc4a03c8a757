"""Arena config -> trials. Torch-free: planning (and the budget solver) runs before any model loads.

An arena config is a normal run config (model, data, train, checkpoint, probes, scoring, logging)
without a `method:` section, plus an `arena:` section saying what to compare. Every trial gets the
same data, the same number of steps and examples per step (so the same trained tokens), the same
probes and the same checkpoints; only the method section, the learning rate and the seed differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import RunConfig, config_from_dict, parse_remedies, read_yaml
from ..configtools import ConfigError, apply_overrides, check, doc, from_dict

# The arena's names for quantized bases -> the run config's `quantization:` section (config_scale.py).
QUANTIZATIONS: dict[str, dict] = {
    "none": {},
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True},  # QLoRA (Dettmers et al. 2023)
    "fp4": {"bits": 4, "quant_type": "fp4"},
    "int8": {"bits": 8},  # LLM.int8 (Dettmers et al. 2022)
}


def trial_label(method: str, quant: str = "none", remedy: str = "none") -> str:
    """What the leaderboard and the report call a trial's (method, base, remedy): 'lora', 'lora@nf4' on a quantized
    base, 'lora+kl' with a forgetting remedy."""
    label = method if quant in ("", "none") else f"{method}@{quant}"
    return label if remedy in ("", "none") else f"{label}+{remedy}"


def remedy_variant(entry) -> tuple[str, dict | None]:
    """An `arena.remedies` value -> (its label, the run config's remedy entry or None for 'none')."""
    if isinstance(entry, str):
        return entry, (None if entry == "none" else {"name": entry})
    return str(entry.get("label") or entry["name"]), {k: v for k, v in entry.items() if k != "label"}


# Remedies whose scored trajectory is not the trial's own (remedies/ema.py writes RUN/ema): the leaderboard reads it.
SCORES_DIR = {"ema": "ema"}


@dataclass
class ArenaSection:
    name: str = doc("the arena folder's name (under output_dir)", default="arena")
    output_dir: str = doc("where the arena folder is made", default="runs")
    methods: list[str] = doc("methods to compare (full is the reference and ignores the budget)",
                             default_factory=lambda: ["full", "lora", "oft", "prefix", "prompt"])
    method_options: dict[str, dict] = doc("per method, options fixed before the budget solver picks the rest, "
                                          "e.g. {lora: {dropout: 0.05}}", default_factory=dict)
    budgets: list[str] = doc("trainable-parameter budgets: counts, e.g. [1M] or [500k, 2M], or shares of the "
                             "base's parameters, e.g. ['1%']; a method that cannot reach one is capped at "
                             "its largest setting and flagged",
                             default_factory=lambda: ["1M"])
    seeds: list[int] = doc("seeds; each (method, budget, lr) runs once per seed", default_factory=lambda: [0])
    quantizations: list[str] = doc(
        "bases to compare under each adapter method: none (full precision), nf4 (4-bit NormalFloat with double "
        "quantization: QLoRA's recipe), fp4, int8 (LLM.int8); needs bitsandbytes. Each quantized (method, "
        "budget) is its own leaderboard row and frontier (named e.g. lora@nf4); retention is measured against "
        "the full-precision base for all (scoring.retention_base). Full fine-tuning trains the base weights "
        "themselves, so it runs on none only", default_factory=lambda: ["none"])
    remedies: list[Any] = doc(
        "forgetting remedies to compare, an axis like methods (docs/remedies.md): none (plain training), a remedy's "
        "name (kl, l2sp, replay, dft, ema, wise), or a section {name: kl, weight: 0.5, label: kl0.5}. Each is its "
        "own leaderboard row and frontier, named e.g. lora+kl; ema's row is its averaged trajectory (RUN/ema), "
        "wise's adds the interpolated points of RUN/wise.json", default_factory=lambda: ["none"])
    lrs: dict[str, list[float]] = doc("per method, the learning rates to sweep (absent: the method's registered "
                                      "default_lr times lr_factors)", default_factory=dict)
    lr_factors: list[float] = doc("the default sweep: multiples of each method's default learning rate",
                                  default_factory=lambda: [0.3, 1.0, 3.0])
    lr_rule: Literal["hypervolume", "final_task"] = doc(
        "how each method's learning rate is chosen for the leaderboard: the largest hypervolume of its "
        "trajectory, or the best final task score", default="hypervolume")
    task: str = doc("task score for the leaderboard's axis (default: the first task probe)", default="")
    retention: str = doc("retention score for the other axis (default: the first retention probe)", default="")
    backend: Literal["local", "ray"] = doc("local: trials one after another in this process; ray: one Ray task "
                                           "per trial (pip install 'sftlab[ray]')", default="local")
    gpus_per_trial: float = doc("ray: GPUs each trial requests", default=0.0)
    cpus_per_trial: float = doc("ray: CPUs each trial requests", default=1.0)

    def __post_init__(self):
        check(bool(self.methods), "methods", "list at least one method")
        check(bool(self.seeds), "seeds", "list at least one seed")
        check(bool(self.quantizations), "quantizations", "list at least one base, e.g. [none, nf4, int8]")
        for q in self.quantizations:
            check(q in QUANTIZATIONS, "quantizations", f"{q!r} is not one of {', '.join(QUANTIZATIONS)}")
        check(len(set(self.quantizations)) == len(self.quantizations), "quantizations", "lists a base twice")
        check(bool(self.remedies), "remedies", "list at least one variant, e.g. [none, kl]")
        for r in self.remedies:
            check(isinstance(r, str) or (isinstance(r, dict) and isinstance(r.get("name"), str)), "remedies",
                  f"{r!r}: give a remedy's name (or none), or a section with a name, e.g. {{name: kl, weight: 0.5}}")
        labels = [remedy_variant(r)[0] for r in self.remedies]
        check(len(set(labels)) == len(labels), "remedies",
              "lists a variant twice; give one of them a label, e.g. {name: kl, weight: 0.5, label: kl0.5}")
        check(all(f > 0 for f in self.lr_factors), "lr_factors", "must be positive")
        for m, grid in self.lrs.items():
            check(bool(grid) and all(lr > 0 for lr in grid), f"lrs.{m}", "must be a non-empty list of positive rates")

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class Trial:
    name: str
    method: str  # as listed in the arena (dora stays dora); cfg.method.name is the registered method
    budget: int | None  # None: full fine-tuning, the reference
    lr: float
    seed: int
    cfg: RunConfig | None  # None when refused
    trainable: int = 0
    setting: str = ""  # the budget solver's one-line description
    note: str = ""  # a warning (budget outside 10%) or why the trial is refused
    hash: str = ""
    capped: bool = False  # the budget is beyond the method's reach: trained at its largest setting (note says)
    quant: str = "none"  # the base: a key of QUANTIZATIONS
    remedy: str = "none"  # the label of an arena.remedies variant

    @property
    def label(self) -> str:
        return trial_label(self.method, self.quant, self.remedy)

    @property
    def refused(self) -> bool:
        return self.cfg is None

    def record(self) -> dict:
        return {"name": self.name, "method": self.method, "budget": self.budget, "lr": self.lr, "seed": self.seed,
                "trainable_params": self.trainable, "setting": self.setting, "note": self.note, "hash": self.hash,
                "capped": self.capped, "quantization": self.quant, "label": self.label, "remedy": self.remedy,
                "run_dir": f"trials/{self.name}", **self._scores()}

    def _scores(self) -> dict:
        """Where the leaderboard reads this trial's points when a remedy scores a trajectory of its own."""
        names = [r.name for r in self.cfg.remedies] if self.cfg is not None else []
        out = {}
        for n in names:
            if n in SCORES_DIR:
                out["scores_dir"] = f"trials/{self.name}/{SCORES_DIR[n]}"
            if n == "wise":
                out["extra_points"] = f"trials/{self.name}/wise.json"
        return out


def load_arena(path: str | Path, overrides: list[str] = ()) -> tuple[ArenaSection, dict]:
    """(arena section, the shared run config as a dict). Overrides address both: arena.seeds=[0,1]."""
    p = Path(path)
    data = read_yaml(p, "arena config")
    if not isinstance(data, dict) or not isinstance(data.get("arena", {}), dict):
        raise ConfigError(f"{p}: an arena config is a run config plus an 'arena:' section")
    apply_overrides(data, list(overrides))
    return arena_from_dict(data)


def arena_from_dict(data: dict) -> tuple[ArenaSection, dict]:
    data = copy.deepcopy(data)
    arena = from_dict(ArenaSection, data.pop("arena", {}) or {}, "arena")
    if "method" in data:
        raise ConfigError("method: an arena config has no method section; list methods in arena.methods and "
                          "fixed options in arena.method_options")
    train = data.get("train", {}) or {}
    if not int(train.get("steps", 0) or 0):
        raise ConfigError("train.steps: an arena needs a fixed step count, so every trial sees the same tokens")
    config_from_dict({**data, "method": {"name": "full"}})  # the shared sections are valid before anything runs
    for i, variant in enumerate(arena.remedies):  # names and options, before any trial is planned
        entry = remedy_variant(variant)[1]
        if entry is not None:
            try:
                parse_remedies([entry])
            except ConfigError as e:
                raise ConfigError(f"arena.{str(e).replace('remedies[0]', f'remedies[{i}]')}") from None
    return arena, data


def trial_hash(cfg: RunConfig) -> str:
    """What makes two trials the same: the whole config but its name and folder."""
    d = {k: v for k, v in cfg.to_dict().items() if k != "select"}  # selection reads the path, it trains nothing
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("name", "output_dir")}
    d = yaml.safe_load(yaml.safe_dump(d))  # as it reads back from config.yaml (floats, tuples)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def lr_grid(arena: ArenaSection, method: str) -> list[float]:
    if method in arena.lrs:
        return list(arena.lrs[method])
    from ..methods import default_lr

    base = default_lr(method)  # the method's registration (a preset: its own or its method's)
    return [float(f"{base * f:.3g}") for f in arena.lr_factors]


def _short(n: int | None, text: str = "") -> str:
    if n is None:
        return "ref"
    if text.strip().endswith("%"):  # a share of the base: named as asked
        return text.strip()[:-1] + "pct"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def plan_trials(arena: ArenaSection, base: dict, model_shape=None) -> list[Trial]:
    """Every (method, budget, lr, seed), each with a validated config (or refused, with the reason)."""
    from ..methods import resolve
    from ..methods.budget import BudgetError, budget_count, solve_budget
    from ..methods.budget import model_shape as read_shape

    shape = model_shape if model_shape is not None else base.get("model", {}).get("path", "")
    try:  # read once: a layout outside the config formulas is built and walked (budget_rules.py)
        shape = read_shape(shape)
    except BudgetError:
        pass  # each trial records the refusal
    budgets = [budget_count(str(b), shape) for b in arena.budgets]
    parts = (base.get("vision") or {}).get("train") or ["language"]
    # the solver counts a VLM's language model (what trains by default), not its projector or vision tower yet
    unsized = (f"budget: vision.train {parts} trains more than the language model, and the budget solver counts "
               "the language model only; leave vision.train at [language] in an arena"
               if parts != ["language"] and getattr(shape, "scope", "") else "")
    labels = {n: str(b) for n, b in zip(budgets, arena.budgets)}
    packing = bool((base.get("data") or {}).get("packing", False))
    if packing and not all(resolve(m)[0].packing for m in arena.methods):
        packing = False  # prefix/prompt cannot pack; every trial pads, so all see the same rows
    trials = []
    for method in arena.methods:
        for budget in ([None] if method == "full" else budgets):
            try:
                if unsized:
                    raise BudgetError(unsized)
                sol = solve_budget(shape, method, budget or 1, arena.method_options.get(method), cap=True)
                section, note = sol.section(), sol.warning if method != "full" else ""
            except BudgetError as e:
                sol, section, note = None, None, str(e)
            for quant in arena.quantizations:
                for variant in arena.remedies:
                    rlabel, entry = remedy_variant(variant)
                    for lr in lr_grid(arena, method):
                        for seed in arena.seeds:
                            # a full-precision, remedy-free trial keeps the name it had before those axes existed
                            tag = ("" if quant == "none" else f"-{quant}") + ("" if entry is None else f"-{rlabel}")
                            name = f"{method}-{_short(budget, labels.get(budget, ''))}{tag}-lr{lr:g}-s{seed}"
                            trials.append(_trial(name, method, budget, lr, seed, base, section, sol, note, packing,
                                                 arena, quant, rlabel, entry))
    return trials


def _trial(name, method, budget, lr, seed, base, section, sol, note, packing, arena, quant="none",
           remedy="none", entry=None) -> Trial:
    if section is None:
        return Trial(name, method, budget, lr, seed, None, note=note, quant=quant, remedy=remedy)
    from ..methods import resolve

    if quant != "none" and not resolve(method)[0].peft:
        return Trial(name, method, budget, lr, seed, None, quant=quant, remedy=remedy,
                     note=f"{method} trains the base weights themselves, which a {quant} base keeps frozen: "
                          "it runs on the full-precision base only (quantizations: none)")
    d = copy.deepcopy(base)
    d["method"] = section
    if quant != "none":
        d["quantization"] = dict(QUANTIZATIONS[quant])
    if entry is not None:
        d["remedies"] = list(d.get("remedies") or []) + [dict(entry)]
    d.setdefault("train", {})["lr"] = lr
    d.setdefault("data", {})["packing"] = packing
    d["run"] = {**(d.get("run") or {}), "name": name, "seed": seed, "output_dir": str(arena.folder / "trials")}
    try:
        cfg = config_from_dict(d)
    except ConfigError as e:
        if entry is None:
            raise
        return Trial(name, method, budget, lr, seed, None, quant=quant, remedy=remedy, note=str(e))
    return Trial(name, method, budget, lr, seed, cfg, sol.trainable, sol.description, note, trial_hash(cfg),
                 sol.capped, quant, remedy)


def trials_table(trials: list[Trial]) -> str:
    lines = [f"{'trial':<34}{'trainable':>12}  setting"]
    for t in trials:
        what = f"REFUSED: {t.note}" if t.refused else ("CAPPED: " if t.capped else "") + t.setting + (
            f"  ({t.note})" if t.note else "")
        lines.append(f"{t.name:<34}{t.trainable:>12,}  {what}")
    return "\n".join(lines)


