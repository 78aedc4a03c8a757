"""The leaderboard: pure functions from trials' scored trajectories to a ranking. No torch.

Both axes are oriented so that higher is better (see sftlab.trajectory). Hypervolumes are computed
after min-max normalising each axis over every scored point of every trial (the base included, as
each trial's step 0): the reference point is the worst value observed on each axis and the ideal the
best, so a trial's hypervolume is the share of that box its trajectory dominates (0 to 1), comparable
between trials of one arena and not across arenas.

Per (method, budget, seed) one learning rate is kept by the arena's rule (largest hypervolume, or
best final task score); per (method, budget) the kept trials are averaged over seeds (mean and
sample standard deviation). Four points of each kept trial are compared across seeds, each as a mean
with a 95% Student-t interval over the n seeds (mean ± t(0.975, n-1) · sd / sqrt(n); none for n = 1):

- start: step 0, before the first update (the base; a quantized base's own error; virtual tokens' start);
- final: the last checkpoint;
- selected: the checkpoint the stated `select:` rule picks (sftlab.trajectory.select; default the knee
  among checkpoints above the base's task CI; the base only when no checkpoint beats it, counted);
- rewound: the checkpoint with the best task score along the path (sftlab.trajectory.best_rewound).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..errors import SftlabError
from ..trajectory import (Choice, Point, best_rewound, final_point, hypervolume_2d, is_base, orient, overshoot,
                          rewind, rule_text, select_params)

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


POINTS = ("start", "final", "selected", "rewound")

# Student t's 0.975 quantile for 1..30 degrees of freedom; beyond, the Cornish-Fisher expansion (error < 1e-7).
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.04523, 2.042272)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"t quantile: df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (i + 1) for i, g in enumerate(terms))


def mean_ci(values: list[float]) -> dict:
    """{mean, ci_low, ci_high, sd, n} across seeds: a 95% t-interval for n >= 2; for n = 1 no interval (None)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if not n:
        return {"mean": math.nan, "ci_low": None, "ci_high": None, "sd": None, "n": 0}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "sd": None, "n": 1}
    sd = statistics.stdev(vals)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd": sd, "n": n}


def _selected(points: list[Point], select: dict | None) -> Choice | None:
    try:
        return rewind(points, "select", **select_params(select))
    except SftlabError:  # nothing to choose from under this rule (e.g. no base scored for max_kl)
        return None


def _at(p: Point | None, **extra) -> dict | None:
    if p is None:
        return None
    return {"step": p.step, "task": _shown(p, "task"), "retention": _shown(p, "retention"), **extra}


def trial_summary(t: TrialResult, ref: tuple[float, float], ideal: tuple[float, float],
                  select: dict | None = None) -> dict:
    last = final_point(t.points)
    over = overshoot(t.points)
    sel = _selected(t.points, select)
    rew = best_rewound(t.points).point
    start = min(t.points, key=lambda p: p.progress)  # step 0: the base, or where virtual tokens begin
    return {"trial": t.name, "method": t.method, "budget": t.budget, "lr": t.lr, "seed": t.seed,
            "trainable_params": t.trainable, "final_step": last.step, "final_task": _shown(last, "task"),
            "final_retention": _shown(last, "retention"),
            "final_task_ci": _shown_ci(last, "task"), "final_retention_ci": _shown_ci(last, "retention"),
            "final_dominated": bool(over), "dominated_by": [p.step for p in over],
            "start": _at(start), "final": _at(last), "selected": _at(sel.point, base=is_base(sel.point)) if sel else None,
            "selected_reason": sel.reason if sel else "no point qualifies under the rule",
            "rewound": _at(rew),
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
                      retention: str = "", select: dict | None = None) -> dict:
    """{rows, trials, reference_point, ideal_point, rule, select, normalisation}; rows best first by hypervolume.
    `select` is the config's `select:` section ({max_kl: x}, {min_task: y}, or empty for the default knee)."""
    if rule not in RULES:
        raise ValueError(f"lr rule {rule!r}: one of {sorted(RULES)}")
    results = [r for r in results if r.points]
    pts = [p for r in results for p in r.points]
    if not pts:
        return {"rows": [], "trials": [], "rule": RULES[rule], "task": task, "retention": retention,
                "select": select_params(select), "select_rule": rule_text(select)}
    ref = (min(p.task for p in pts), min(p.retention for p in pts))
    ideal = (max(p.task for p in pts), max(p.retention for p in pts))
    summaries = [trial_summary(r, ref, ideal, select) for r in results]
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
            "rule": RULES[rule], "select": select_params(select), "select_rule": rule_text(select),
            "rows": rows, "trials": summaries,
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
    row["per_seed"] = [{"seed": s["seed"], **{k: s[k] for k in POINTS}} for s in kept]
    row["points"] = {k: _across_seeds([s[k] for s in kept if s[k]]) for k in POINTS}
    row["points"]["selected"]["base_kept"] = sum(bool(s["selected"] and s["selected"]["base"]) for s in kept)
    return row


def _across_seeds(at: list[dict]) -> dict:
    """One point's task and retention (scores' own units) as mean and 95% t-interval over the seeds."""
    return {"task": mean_ci([a["task"] for a in at]), "retention": mean_ci([a["retention"] for a in at]),
            "steps": [a["step"] for a in at], "n": len(at)}


def ci_text(m: dict, fmt: str = "{:.4g}") -> str:
    """'0.5 [0.3, 0.7] (n=3)', or '0.5 (n=1)' where one seed gives no interval."""
    if not m or m.get("n", 0) == 0:
        return "-"
    text = fmt.format(m["mean"])
    if m.get("ci_low") is not None:
        text += f" [{fmt.format(m['ci_low'])}, {fmt.format(m['ci_high'])}]"
    return f"{text} (n={m['n']})"


def _num(v, sd=None, fmt="{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = fmt.format(v)
    return text + (f"±{fmt.format(sd)}" if sd else "")


def _method_width(rows: list[dict]) -> int:
    """The method column's width: labels such as lora@int8 or full+l2sp0.1 are longer than a method's name."""
    return max([8, *(len(str(r["method"])) + 1 for r in rows)])


def format_leaderboard(board: dict) -> str:
    """A terminal table, best first, with the rule and the normalisation stated under it."""
    rows = board.get("rows", [])
    if not rows:
        return "leaderboard: no finished trial with both scores"
    gpu = any(_finite(r.get("peak_gpu_mb")) for r in rows)
    w = _method_width(rows)
    head = (f"{'method':<{w}}{'budget':>9}{'trainable':>12}{'lr':>10}  {board['task'][:18]:>18}  "
            f"{board['retention'][:18]:>18}  {'sel. step':>9}{'overshoot':>10}{'HV':>12}{'tok/s':>9}"
            f"{'peak MB':>9}" + (f"{'GPU MB':>8}" if gpu else "") + f"{'wall s':>8}{'CPU s':>8}{'tokens':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        knees = ",".join(str(k["selected"]["step"]) if k.get("selected") else "-" for k in r["per_seed"])
        overshot = f"{r['final_dominated']}/{r['seeds']}"
        peak = _num(r.get("peak_mem_mb"), None, "{:.0f}") + ("" if r.get("peak_scope", "trial") == "trial" else "*")
        lines.append(
            f"{r['method']:<{w}}{_budget(r['budget']):>9}"
            f"{format(r['trainable_params'], ',') + ('!' if r.get('off_budget') else ''):>12}"
            f"{','.join(f'{x:g}' for x in r['lr']):>10}  {_num(r['final_task'], r['final_task_sd'], '{:.4g}'):>18}  "
            f"{_num(r['final_retention'], r['final_retention_sd'], '{:.4g}'):>18}  {knees:>9}"
            f"{overshot:>10}{_num(r['hypervolume'], r['hypervolume_sd']):>12}"
            f"{_num(r.get('tokens_per_s'), None, '{:.0f}'):>9}{peak:>9}"
            + (f"{_num(r.get('peak_gpu_mb'), None, '{:.0f}'):>8}" if gpu else "")
            + f"{_num(r.get('wall_s'), None, '{:.0f}'):>8}{_num(r.get('cpu_s'), None, '{:.0f}'):>8}"
            f"{_num(r.get('tokens'), None, '{:,.0f}'):>10}")
    lines += ["", *points_table(board)]
    ref = ", ".join(f"{v:.4g}" for v in board["reference_point"])
    lines += ["", f"learning rate per method: {board['rule']}; with several seeds: mean±sd over seeds",
              f"sel. step: the checkpoint per seed chosen by the rule {board.get('select_rule') or rule_text(None)}",
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


POINT_NOTE = {"start": "step 0, before the first update (the base; for quantized bases and virtual tokens, where "
                       "training starts)", "final": "the last checkpoint", "selected": "chosen by the select rule",
              "rewound": "the best task score along the path"}


def points_table(board: dict) -> list[str]:
    """Start, final, selected and rewound points per (method, budget): mean [95% t-interval across seeds] (n seeds)."""
    rows = [r for r in board.get("rows", []) if r.get("points")]
    if not rows:
        return []
    w = _method_width(rows)
    head = f"{'method':<{w}}{'budget':>9}  {'point':<9}{'steps':>12}  {board['task'][:30]:>32}  {board['retention'][:30]:>32}"
    lines = [f"points across seeds: mean [95% t-interval] (n seeds); select rule: "
             f"{board.get('select_rule') or rule_text(None)}", head, "-" * len(head)]
    for r in rows:
        for i, k in enumerate(POINTS):
            m = r["points"][k]
            base = m.get("base_kept", 0)
            steps = ",".join(map(str, m["steps"])) or "-"
            lines.append(f"{r['method'] if not i else '':<{w}}{_budget(r['budget']) if not i else '':>9}  {k:<9}"
                         f"{steps:>12}  {ci_text(m['task']):>32}  {ci_text(m['retention']):>32}"
                         + (f"  base kept in {base}/{r['seeds']} seed(s): no checkpoint beat it" if base else ""))
    lines.append("start: " + POINT_NOTE["start"] + "; final: " + POINT_NOTE["final"] + "; selected: " + POINT_NOTE["selected"] + "; rewound: "
                 + POINT_NOTE["rewound"] + "; interval: mean ± t(0.975, n-1)·sd/√n over seeds, none for n=1")
    return lines


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def _budget(b) -> str:
    return "ref" if b is None else f"{b:,}"
