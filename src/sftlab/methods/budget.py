"""Matched budgets: choose a method's knobs so that it trains a given number of parameters.

Comparing fine-tuning methods is only fair at equal trainable-parameter counts (the convention of the
LoRA, DoRA and OFT papers' tables: Hu et al. 2021; Liu et al. 2024; Qiu et al. 2023). The counts are
exact: per-module formulas over the model's shape, written down from config.json for Llama-family layouts
and read from the modules of the model built on the meta device for any other (budget_rules.py,
model_walk.py); `measure_trainable` builds the model the method registry really trains, on the meta device,
to check them.

The search changes as little as it can. Tier 1 moves only the method's main knob (LoRA rank, OFT/BOFT
block size, number of virtual tokens); tier 2 also tries other target-module sets; tier 3 also adapts
a subset of the layers; tier 4 both. The first tier with a setting within TOLERANCE of the budget wins
(the closest count within that tier). Failing that, the closest setting of all is accepted with a
warning when it is within REFUSE, and refused otherwise, naming it; with `cap` (the arena), a budget above
everything the method can sensibly reach (prompt tuning would need thousands of virtual tokens) is met by
its largest setting instead, flagged `capped`. Within a tier, a layer subset takes the most layers that fit
(fewer layers are the last resort, after the module set, the rank or the block size). Options in
`base_options` are pinned: the search moves only the others. Full fine-tuning is the reference: its count
is reported, never solved or refused.

A budget is a count (`1e6`, `500k`) or a share of the base model's parameters (`1%`, `0.5%`; budget_count).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

from ..registry import RegistryError
from . import METHODS
from .base import PRESETS, resolve
from .budget_rules import (MAX_VIRTUAL_TOKENS, MODEL_TYPES, RULES, BudgetError, ModelShape, Search, formula_shape,
                           read_config)

TOLERANCE = 0.10  # within this relative error of the budget a setting is a match
REFUSE = 0.25  # beyond this no setting is offered

__all__ = ["BudgetError", "BudgetSolution", "ModelShape", "budget_count", "count_trainable", "measure_trainable", "method_names",
           "model_shape", "parse_count", "read_config", "solve_budget", "solve_all", "TOLERANCE", "REFUSE"]


@dataclass(frozen=True)
class BudgetSolution:
    method: str  # the registered method name (dora -> lora with use_dora)
    options: dict  # merge into the config's `method:` section (pinned base options included)
    trainable: int  # exact trainable-parameter count of that setting
    target: int
    rel_error: float  # (trainable - target) / target
    within_tolerance: bool  # |rel_error| <= TOLERANCE
    description: str  # one line, e.g. "rank 3 on all-linear, all 30 layers"
    alternatives: int  # settings searched (a bisection counts only a few of them)
    warning: str = ""  # set when the match is outside TOLERANCE (or the method's count is fixed)
    capped: bool = False  # the budget is beyond the method's sensible reach: its largest setting, flagged

    def section(self) -> dict:
        return {"name": self.method, **self.options}

    def yaml(self) -> str:
        """The `method:` section as YAML, ready to paste into a config."""
        import yaml

        return yaml.safe_dump({"method": self.section()}, sort_keys=False, default_flow_style=None).rstrip()


def model_shape(model: str | Path | Mapping | ModelShape) -> ModelShape:
    """The shape the counts need, from a config mapping, a model folder, 'smollm2' or a hub id: written down
    from config.json for the Llama-family layouts (no torch), read from the built model's modules otherwise."""
    if isinstance(model, ModelShape):
        return model
    cfg = read_config(model)
    if cfg.get("model_type", "") in MODEL_TYPES:
        return formula_shape(cfg)
    from .model_walk import walk  # torch and transformers: seconds, paid only for other layouts

    return walk(cfg)


def resolve_method(method: str, base_options: Mapping | None) -> tuple[str, dict]:
    """(registered method name, options): a preset (dora) names its method and the options it implies."""
    try:
        spec, implied = resolve(method)
        RULES.get(spec.name)
    except (RegistryError, BudgetError):
        raise BudgetError(f"budget: {_unknown(method)}") from None
    return spec.name, {**implied, **dict(base_options or {})}


def _unknown(method: str) -> str:
    from ..registry import unknown_name_message

    return unknown_name_message("budget rule", method, method_names())


def method_options(name: str, options: Mapping):
    """The method's options dataclass, validated as a config's `method:` section would be."""
    from ..config import parse_method

    return parse_method({"name": name, **options}).options


def count_trainable(model, method: str, options: Mapping | None = None) -> int:
    """Exact trainable-parameter count of `method` with `options` (a `method:` section without name)."""
    shape = model_shape(model)
    name, opts = resolve_method(method, options)
    return RULES.get(name).count(shape, method_options(name, opts))


def solve_budget(model, method: str, params: int | str, base_options: Mapping | None = None, *,
                 layer_pattern: str = "spread", max_virtual_tokens: int = MAX_VIRTUAL_TOKENS,
                 cap: bool = False) -> BudgetSolution:
    """Knobs of `method` whose trainable count is closest to `params` (a count, or a share such as '1%';
    see the module docstring). `cap`: a budget above the method's reach gets its largest setting, flagged."""
    shape = model_shape(model)
    target = budget_count(params, shape)
    if target < 1:
        raise BudgetError(f"budget: the parameter budget must be >= 1, got {params}")
    name, base = resolve_method(method, base_options)
    rule, configured = RULES.get(name), method_options(name, base)
    fields = dataclasses.asdict(configured)

    def count(knobs: dict) -> int:  # counting needs attributes, not validation: a namespace is ~10x cheaper
        return rule.count(shape, SimpleNamespace(**{**fields, **knobs}))

    seen: list[tuple[int, dict, int]] = []
    settings = 0
    for family in rule.candidates(shape, configured, set(base), Search(layer_pattern, max_virtual_tokens)):
        settings += len(family.values)
        seen += [(family.tier, knobs, count(knobs)) for knobs in map(family.knobs, bracket(family, count, target))]
    level, knobs, n = choose(seen, target)
    top = max(c[2] for c in seen)
    capped = cap and not rule.fixed and (top - target) / target < -TOLERANCE
    if capped:  # nothing reaches the budget: the largest setting (the lowest tier that has it)
        level, knobs, n = min((c for c in seen if c[2] == top), key=lambda c: c[0])
    err = (n - target) / target
    options = {**base, **knobs}
    chosen = method_options(name, options)  # the answer must be a valid config section
    text = rule.describe(shape, chosen)
    if rule.fixed:
        warning = f"{name}: its count is fixed at {n:,} (the reference); the budget is not used"
    elif capped:
        warning = (f"{method}: capped at its largest sensible setting, {text}: {n:,} parameters, {n / target:.0%} "
                   f"of the {target:,} asked")
    elif abs(err) > REFUSE:
        lo, hi = min(c[2] for c in seen), max(c[2] for c in seen)
        raise BudgetError(f"budget: no {method} setting comes within {REFUSE:.0%} of {target:,} parameters "
                          f"(reachable: {lo:,} to {hi:,}); the closest is {text}: {n:,} ({err:+.1%})")
    elif abs(err) > TOLERANCE:
        warning = (f"{method}: the closest setting is {err:+.1%} off the budget "
                   f"(outside the {TOLERANCE:.0%} tolerance)")
    else:
        warning = ""
    return BudgetSolution(name, options, n, target, err, abs(err) <= TOLERANCE, text, settings, warning, capped)


def bracket(family, count, target: int) -> list[int]:
    """Indices of `family.values` worth counting: both ends (the reachable range) and the two values
    around `target`, found by bisection (the count rises with the value; the tests check that it does)."""
    lo, hi = 0, len(family.values)  # first index whose count reaches the target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if count(family.knobs(mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    last = len(family.values) - 1
    return sorted({0, last} | {i for i in (lo - 1, lo) if 0 <= i <= last})


def choose(cands: list[tuple[int, dict, int]], target: int) -> tuple[int, dict, int]:
    """Within TOLERANCE in the lowest tier that has a match: the one adapting the most layers, then the
    closest; else the closest of all."""
    def err(c):
        return abs(c[2] - target) / target

    def layers(c) -> float:  # None: every layer
        return math.inf if c[1].get("layers") is None else len(c[1]["layers"])

    for level in sorted({c[0] for c in cands}):
        ok = [c for c in cands if c[0] == level and err(c) <= TOLERANCE]
        if ok:  # min keeps the first of equals: the generators list preferred ones first
            return min(ok, key=lambda c: (-layers(c), err(c)))
    return min(cands, key=lambda c: (err(c), c[0]))


def method_names() -> list[str]:
    """Every method the solver sizes, full first and each preset after the method it is a variant of."""
    names = ["full"] + [n for n in METHODS.names() if n in RULES and n != "full"]
    for preset in PRESETS.names():
        base = PRESETS.get(preset).base
        if base in names:
            names.insert(names.index(base) + 1, preset)
    return names


def solve_all(model, params: int, methods: list[str] | None = None, **kw) -> dict[str, BudgetSolution | str]:
    """Every method (and dora) at one budget: a solution, or the refusal message."""
    names = methods or method_names()
    out: dict[str, BudgetSolution | str] = {}
    shape = model_shape(model)
    for name in names:
        try:
            out[name] = solve_budget(shape, name, params, **kw)
        except BudgetError as e:
            out[name] = str(e)
    return out


def measure_trainable(config: Mapping, method: str, options: Mapping | None = None) -> int:
    """Trainable parameters of the model the registered method really builds (on the meta device: no memory).

    Uses the config parser and the method's own apply(), as training does, and counts as training's
    trainable_report does."""
    from ..train.loop import trainable_report
    from .model_walk import build_meta

    name, opts = resolve_method(method, options)
    model = METHODS.get(name).apply(build_meta(config), method_options(name, opts))
    return trainable_report(model)["trainable_params"]


_SUFFIX = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9}


def parse_count(text: str | int, total: int | None = None) -> int:
    """'1e6', '500k', '2M', '1.5m', '1,000,000' -> an integer count; '1%' -> 1% of `total` (the base's
    parameters, budget_count gives them)."""
    s = str(text).strip().lower().replace(",", "").replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmb%]?)", s)
    if not m:
        raise BudgetError(f"budget: cannot read {text!r} as a parameter count (e.g. 1e6, 500k, 2M, or 1% "
                          "of the base's parameters)")
    if m.group(2) == "%":
        if total is None:
            raise BudgetError(f"budget: {text!r} is a share of the base's parameters; give the model too")
        if not 0 < float(m.group(1)) <= 100:
            raise BudgetError(f"budget: {text!r}: a share must be above 0% and at most 100%")
        return int(round(float(m.group(1)) / 100 * total))
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))


def budget_count(text: str | int, model) -> int:
    """A budget as a count: '1%' is 1% of the base model's parameters (every weight, the head once when
    tied: what full fine-tuning trains), anything else parse_count reads."""
    if isinstance(text, int):
        return text
    total = sum(n for _, n in model_shape(model).base_params()) if str(text).strip().endswith("%") else None
    return parse_count(text, total)


# ---- text for the CLI --------------------------------------------------------------------------------

def flow_yaml(section: dict) -> str:
    """{name: lora, r: 3, ...} on one line (YAML flow style: pasteable as `method: {...}`)."""
    import yaml

    return yaml.safe_dump(section, default_flow_style=True, sort_keys=False, width=10 ** 6).strip()


def format_solution(sol: BudgetSolution, shape: ModelShape, model: str = "") -> str:
    status = "within" if sol.within_tolerance else "OUTSIDE"
    return "\n".join([
        f"{model + ' ' if model else ''}({shape.summary()}): {sol.target:,} trainable parameters asked",
        f"{sol.method}: {sol.description}",
        f"trainable {sol.trainable:,} ({sol.rel_error:+.1%}, {status} the {TOLERANCE:.0%} tolerance); "
        f"{sol.alternatives:,} settings searched",
        "", sol.yaml()])


def format_table(results: dict[str, BudgetSolution | str], target: int) -> str:
    head = f"{'method':<8} {'trainable':>13} {'error':>9}  setting (the method: section, as YAML)"
    lines = [f"budget: {target:,} trainable parameters", head, "-" * len(head)]
    for name, sol in results.items():
        if isinstance(sol, str):
            lines.append(f"{name:<8} {'refused':>13} {'':>9}  {sol.removeprefix('budget: ')}")
            continue
        error = "reference" if RULES.get(sol.method).fixed else f"{sol.rel_error:+.1%}"
        mark = "" if sol.within_tolerance or RULES.get(sol.method).fixed else "!"
        lines.append(f"{name:<8} {sol.trainable:>13,} {error:>9}{mark:<1} {flow_yaml(sol.section())}")
        lines.append(f"{'':<8} {'':>13} {'':>9}  = {sol.description}")
    lines.append(f"(! = outside the {TOLERANCE:.0%} tolerance; refused = nothing within {REFUSE:.0%}; "
                 "full fine-tuning is the fixed reference)")
    return "\n".join(lines)
