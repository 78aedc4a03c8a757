"""The leaderboard: pure functions from trials' scored trajectories to a ranking. No torch.

Both axes are oriented so that higher is better (see sftlab.trajectory). Hypervolumes are computed
after min-max normalising each axis over every scored point of every trial (the base included, as
each trial's step 0): the reference point is the worst value observed on each axis and the ideal the
best, so a trial's hypervolume is the share of that box its trajectory dominates (0 to 1), comparable
between trials of one arena and not across arenas.

Per (method, budget, seed) one learning rate is kept by the arena's rule (largest hypervolume, or
best final task score); per (method, budget) the kept trials are averaged over seeds (mean and
sample standard deviation).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..trajectory import Point, final_point, hypervolume_2d, knee, orient, overshoot

RULES = {"hypervolume": "the learning rate whose trajectory has the largest hypervolume",
         "final_task": "the learning rate with the best final task score"}


@dataclass
class TrialResult:
    """One finished trial: what the leaderboard needs (points oriented, as sftlab.trajectory makes them)."""

    name: str
    method: str
    budget: int | None
    lr: float
    seed: int
    points: list[Point]
    trainable: int = 0
    # tokens_per_s, tokens, trained_tokens, peak_mem_mb (+ peak_scope, peak_gpu_mb), wall_s, cpu_s
    stats: dict = field(default_factory=dict)


def trial_summary(t: TrialResult, ref: tuple[float, float], ideal: tuple[float, float]) -> dict:
    last = final_point(t.points)
    over = overshoot(t.points)
    k = knee(t.points)
    return {"trial": t.name, "method": t.method, "budget": t.budget, "lr": t.lr, "seed": t.seed,
            "trainable_params": t.trainable, "final_step": last.step, "final_task": _shown(last, "task"),
            "final_retention": _shown(last, "retention"),
            "final_task_ci": _shown_ci(last, "task"), "final_retention_ci": _shown_ci(last, "retention"),
            "final_dominated": bool(over), "dominated_by": [p.step for p in over],
            "knee_step": k.point.step, "knee_task": _shown(k.point, "task"),
            "knee_retention": _shown(k.point, "retention"), "knee_reason": k.reason,
            "hypervolume": _hv(t.points, ref, ideal), "oriented_final": [last.task, last.retention], **t.stats}


def _hv(points: list[Point], ref, ideal) -> float:
    if any(ideal[i] <= ref[i] for i in range(2)):
        return 0.0  # every point is the same on an axis: no box to fill
    return hypervolume_2d(points, ref, ideal)


def _shown(p: Point, axis: str) -> float:
    return orient(p.value(axis), p.meta.get(f"{axis}_higher_is_better", True))


def _shown_ci(p: Point, axis: str) -> list[float]:
    lo, hi = p.ci(axis)
    if p.meta.get(f"{axis}_higher_is_better", True):
        return [lo, hi]
    return [-hi, -lo]


def _key(row: dict, rule: str) -> float:
    return row["hypervolume"] if rule == "hypervolume" else row["oriented_final"][0]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def build_leaderboard(results: list[TrialResult], rule: str = "hypervolume", task: str = "",
                      retention: str = "") -> dict:
    """{rows, trials, reference_point, ideal_point, rule, normalisation}; rows best first by hypervolume."""
    if rule not in RULES:
        raise ValueError(f"lr rule {rule!r}: one of {sorted(RULES)}")
    results = [r for r in results if r.points]
    pts = [p for r in results for p in r.points]
    if not pts:
        return {"rows": [], "trials": [], "rule": RULES[rule], "task": task, "retention": retention}
    ref = (min(p.task for p in pts), min(p.retention for p in pts))
    ideal = (max(p.task for p in pts), max(p.retention for p in pts))
    summaries = [trial_summary(r, ref, ideal) for r in results]
    kept = {}
    for s in summaries:  # one learning rate per (method, budget, seed), by the rule
        k = (s["method"], s["budget"], s["seed"])
        if k not in kept or _key(s, rule) > _key(kept[k], rule):
            kept[k] = s
    for s in summaries:
        s["kept"] = kept[(s["method"], s["budget"], s["seed"])] is s
    rows = [_row([s for s in kept.values() if (s["method"], s["budget"]) == mb])
            for mb in dict.fromkeys((s["method"], s["budget"]) for s in kept.values())]
    rows.sort(key=lambda r: -r["hypervolume"])
    sample = results[0].points[0]
    return {"task": task or sample.meta.get("task_name", "task"),
            "retention": retention or sample.meta.get("retention_name", "retention"),
            "rule": RULES[rule], "rows": rows, "trials": summaries,
            "reference_point": [_unorient(ref[0], sample, "task"), _unorient(ref[1], sample, "retention")],
            "ideal_point": [_unorient(ideal[0], sample, "task"), _unorient(ideal[1], sample, "retention")],
            "normalisation": "each axis min-max scaled over every scored checkpoint of every trial and the base; "
                             "hypervolume reference point = the worst observed value on each axis "
                             "(reference_point, in the scores' own units), ideal = the best (ideal_point)"}


def _unorient(v: float, p: Point, axis: str) -> float:
    return orient(v, p.meta.get(f"{axis}_higher_is_better", True))


# What a trial cost, as the arena measured it (sftlab.arena.runner.run_stats), with units for the tables.
RESOURCES = ("tokens_per_s", "tokens", "trained_tokens", "peak_mem_mb", "peak_gpu_mb", "wall_s", "cpu_s")
UNITS = {"tokens_per_s": "tokens/s", "tokens": "tokens", "trained_tokens": "tokens", "peak_mem_mb": "MB",
         "peak_gpu_mb": "MB", "wall_s": "s", "cpu_s": "CPU s"}
RESOURCE_NOTE = ("peak MB: the trial's own peak resident memory (VmHWM reset before each trial: the process's "
                 "baseline at the trial's start plus what the trial added; MB = 2^20 bytes); GPU MB: the CUDA "
                 "allocator's peak\nwall s / CPU s: the trial's wall-clock and CPU (user + system, all threads) "
                 "seconds; tokens: non-padding tokens trained on; with several seeds these are means")


def _row(kept: list[dict]) -> dict:
    first = kept[0]
    row = {"method": first["method"], "budget": first["budget"], "trainable_params": first["trainable_params"],
           "lr": sorted({s["lr"] for s in kept}), "seeds": len(kept)}
    for col in ("final_task", "final_retention", "hypervolume", *RESOURCES):
        row[col], row[col + "_sd"] = _mean_sd([s.get(col) for s in kept])
    row["peak_scope"] = "process" if any(s.get("peak_scope") == "process" for s in kept) else "trial"
    # Off the budget by more than the solver's tolerance: a method capped at its largest setting (the arena
    # plan's `capped`, prompt tuning at a large budget) or accepted with a warning; flagged, never hidden.
    b = first["budget"]
    row["off_budget"] = bool(b) and abs(first["trainable_params"] - b) > 0.10 * b
    row["final_dominated"] = sum(s["final_dominated"] for s in kept)
    row["knee"] = [{"seed": s["seed"], "step": s["knee_step"], "task": s["knee_task"],
                    "retention": s["knee_retention"]} for s in kept]
    row["final_task_ci"] = first["final_task_ci"] if len(kept) == 1 else None
    row["final_retention_ci"] = first["final_retention_ci"] if len(kept) == 1 else None
    return row


def _num(v, sd=None, fmt="{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = fmt.format(v)
    return text + (f"±{fmt.format(sd)}" if sd else "")


def format_leaderboard(board: dict) -> str:
    """A terminal table, best first, with the rule and the normalisation stated under it."""
    rows = board.get("rows", [])
    if not rows:
        return "leaderboard: no finished trial with both scores"
    gpu = any(_finite(r.get("peak_gpu_mb")) for r in rows)
    head = (f"{'method':<8}{'budget':>9}{'trainable':>12}{'lr':>10}  {board['task'][:18]:>18}  "
            f"{board['retention'][:18]:>18}  {'knee step':>9}{'overshoot':>10}{'HV':>12}{'tok/s':>9}"
            f"{'peak MB':>9}" + (f"{'GPU MB':>8}" if gpu else "") + f"{'wall s':>8}{'CPU s':>8}{'tokens':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        knees = ",".join(str(k["step"]) for k in r["knee"])
        overshot = f"{r['final_dominated']}/{r['seeds']}"
        peak = _num(r.get("peak_mem_mb"), None, "{:.0f}") + ("" if r.get("peak_scope", "trial") == "trial" else "*")
        lines.append(
            f"{r['method']:<8}{_budget(r['budget']):>9}"
            f"{format(r['trainable_params'], ',') + ('!' if r.get('off_budget') else ''):>12}"
            f"{','.join(f'{x:g}' for x in r['lr']):>10}  {_num(r['final_task'], r['final_task_sd'], '{:.4g}'):>18}  "
            f"{_num(r['final_retention'], r['final_retention_sd'], '{:.4g}'):>18}  {knees:>9}"
            f"{overshot:>10}{_num(r['hypervolume'], r['hypervolume_sd']):>12}"
            f"{_num(r.get('tokens_per_s'), None, '{:.0f}'):>9}{peak:>9}"
            + (f"{_num(r.get('peak_gpu_mb'), None, '{:.0f}'):>8}" if gpu else "")
            + f"{_num(r.get('wall_s'), None, '{:.0f}'):>8}{_num(r.get('cpu_s'), None, '{:.0f}'):>8}"
            f"{_num(r.get('tokens'), None, '{:,.0f}'):>10}")
    ref = ", ".join(f"{v:.4g}" for v in board["reference_point"])
    lines += ["", f"learning rate per method: {board['rule']}; with several seeds: mean±sd over seeds",
              "overshoot: seeds whose final checkpoint an earlier one dominates beyond its confidence interval",
              f"HV: hypervolume, {board['normalisation']}; reference point ({board['task']}, {board['retention']}) "
              f"= ({ref})", RESOURCE_NOTE]
    if any(r.get("off_budget") for r in rows):
        lines.append("! trainable more than 10% off the budget: the method cannot reach it sensibly and is capped "
                     "at its largest setting (arena.json: capped, note), or was accepted with a warning")
    if any(r.get("peak_scope", "trial") != "trial" for r in rows):
        lines.append("* process-wide peak (the high-water mark since the process started, not the trial's own): "
                     "this system could not reset it per trial (/proc/self/clear_refs)")
    return "\n".join(lines)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def _budget(b) -> str:
    return "ref" if b is None else f"{b:,}"
