"""The task-vs-retention plane and the rewinding recommendation.

Every scored checkpoint of every trajectory is one point (an SVG circle carrying `data-point`, so tests and
the page's script can find them); each trajectory is joined in step order; each method's Pareto frontier
(over all its trials) is drawn as a thick line. Axes are oriented as in sftlab.trajectory: lower-is-better
metrics are shown reversed, so the ideal corner is always top-right. The recommendation uses the same
frontier, overshoot and selection rule as `sftlab frontier` / `sftlab rewind`: the config's `select:` section
(default: the knee among checkpoints above the base's task CI), stated next to the chosen point. The base is the
plane's origin, not a candidate, unless no checkpoint beats it. For an arena, each method's selected point per seed
is drawn (small squares) with their mean as a larger square and a cross of 95% t-interval whiskers across seeds
(none for one seed, whose marker says n=1), from leaderboard.json (trade-off: Biderman et al. 2024, "LoRA Learns
Less and Forgets Less").
"""

from __future__ import annotations

from ..errors import SftlabError
from ..trajectory import Choice, Point, is_base, orient, overshoot, pareto_front, point_from_scores, rewind
from ..trajectory import rule_text, select_params, shown
from .escape import esc, finite
from .load import ReportData, RunData
from .sections import register_section, table
from .svg import Axis, Frame, colours, legend, svg, symlog_axis


def run_points(r: RunData, task: str, retention: str) -> list[Point]:
    """The run's checkpoints scored on both axes (finite values), in step order."""
    out = []
    for e in r.entries:
        s = e.get("scores") or {}
        t, k = s.get(task), s.get(retention)
        if isinstance(t, dict) and isinstance(k, dict) and finite(t.get("value")) and finite(k.get("value")):
            out.append(point_from_scores(e["step"], t, k, meta={"run": r.name, "method": r.method,
                                                                "path": e.get("path")}))
    return out


def all_points(data: ReportData) -> list[tuple[RunData, list[Point]]]:
    if not data.task or not data.retention:
        return []
    return [(r, run_points(r, data.task, data.retention)) for r in data.runs]


def payload(data: ReportData) -> dict:
    """What the page's script shows when a point is clicked: one record per plotted point, by data-index."""
    points = []
    for r, pts in all_points(data):
        by_step = {e["step"]: e for e in r.entries}
        for p in pts:
            e = by_step[p.step]
            points.append({"run": r.name, "method": r.method, "step": p.step, "path": e.get("path"),
                           "sha256": e.get("sha256"),
                           "scores": {n: {k: s.get(k) for k in ("value", "ci_low", "ci_high", "kind", "n")}
                                      for n, s in (e.get("scores") or {}).items() if isinstance(s, dict)}})
    return {"title": data.title, "kind": data.kind, "task": data.task, "retention": data.retention,
            "points": points}


def _axis(name: str, hib: bool, values: list[float]) -> Axis:
    label = name if hib else f"{name} (lower is better; axis reversed)"
    return symlog_axis(label, values, flip=not hib)


def _whiskers(fr: Frame, p: Point, colour: str) -> str:
    out = []
    (tl, th), (rl, rh) = p.ci("task"), p.ci("retention")
    if finite(tl) and finite(th) and th > tl:
        out.append(f'<line x1="{fr.x(tl)}" y1="{fr.y(p.retention)}" x2="{fr.x(th)}" y2="{fr.y(p.retention)}"/>')
    if finite(rl) and finite(rh) and rh > rl:
        out.append(f'<line x1="{fr.x(p.task)}" y1="{fr.y(rl)}" x2="{fr.x(p.task)}" y2="{fr.y(rh)}"/>')
    return f'<g class="ci" stroke="{colour}">{"".join(out)}</g>' if out else ""


def report_rule(data: ReportData) -> dict:
    """The stated selection rule: the leaderboard's (an arena), else the arena's or the run's config `select:`."""
    board = data.leaderboard or {}
    if isinstance(board.get("select"), dict):
        return select_params(board["select"])
    cfg = (data.arena or {}).get("config") if data.kind == "arena" else (data.runs[0].config if data.runs else {})
    rule = cfg.get("select") if isinstance(cfg, dict) else None
    return select_params(rule if isinstance(rule, dict) else None)


def choose(points: list[Point], rule: dict) -> Choice:
    return rewind(points, "select", **rule)


def spreads(data: ReportData, hib: tuple[bool, bool]) -> list[dict]:
    """Per leaderboard row (method, budget): the selected point per seed and across seeds, in plotted units."""
    out = []
    for row in (data.leaderboard or {}).get("rows", []):
        sel = ((row.get("points") or {}).get("selected") if isinstance(row, dict) else None) or {}
        t, r = sel.get("task") or {}, sel.get("retention") or {}
        if not sel.get("n") or not finite(t.get("mean")) or not finite(r.get("mean")):
            continue
        seeds = [(s["seed"], s["selected"]) for s in row.get("per_seed", []) if isinstance(s.get("selected"), dict)]

        def plot(v, axis):
            return orient(v, hib[axis == "retention"]) if finite(v) else None

        def ci(m, axis):
            lo, hi = plot(m.get("ci_low"), axis), plot(m.get("ci_high"), axis)
            return None if lo is None or hi is None else tuple(sorted((lo, hi)))

        out.append({"method": str(row.get("method")), "budget": row.get("budget"), "n": sel["n"],
                    "task": plot(t["mean"], "task"), "retention": plot(r["mean"], "retention"),
                    "task_ci": ci(t, "task"), "retention_ci": ci(r, "retention"), "shown": (t, r),
                    "seeds": [(seed, plot(a["task"], "task"), plot(a["retention"], "retention"), a["step"])
                              for seed, a in seeds]})
    return out


def _spread_svg(fr: Frame, s: dict, c: str, names: tuple[str, str]) -> str:
    """The seeds' selected points, and their mean as a square with a cross of across-seed 95% CI whiskers."""
    x, y = fr.x(s["task"]), fr.y(s["retention"])
    parts = [f'<circle class="seed-pt" cx="{fr.x(st)}" cy="{fr.y(sr)}" r="3" fill="{c}" stroke="#000" '
             f'stroke-width="0.5"><title>{esc(s["method"])} seed {esc(seed)}: selected step {esc(step)}</title>'
             f'</circle>' for seed, st, sr, step in s["seeds"] if finite(st) and finite(sr)]
    whiskers = []
    if s["task_ci"]:
        whiskers.append(f'<line class="whisker" x1="{fr.x(s["task_ci"][0])}" y1="{y}" x2="{fr.x(s["task_ci"][1])}" '
                        f'y2="{y}"/>')
    if s["retention_ci"]:
        whiskers.append(f'<line class="whisker" x1="{x}" y1="{fr.y(s["retention_ci"][0])}" x2="{x}" '
                        f'y2="{fr.y(s["retention_ci"][1])}"/>')
    t, r = s["shown"]
    tip = (f"{s['method']}: selected point, mean over n={s['n']} seed(s)\n{names[0]} {_ci_text(t)}\n"
           f"{names[1]} {_ci_text(r)}" + ("" if whiskers else "\nn=1: no interval across seeds"))
    return (f'<g class="spread" data-method="{esc(s["method"])}" data-n="{s["n"]}" stroke="{c}" stroke-width="2">'
            + "".join(whiskers) + f'<rect class="mean-marker" x="{x - 5}" y="{y - 5}" width="10" height="10" '
            f'fill="{c}" stroke="#000" stroke-width="1"><title>{esc(tip)}</title></rect></g>' + "".join(parts))


def _ci_text(m: dict) -> str:
    text = f"{m['mean']:.4g}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        text += f" [{m['ci_low']:.4g}, {m['ci_high']:.4g}] (95% t-interval)"
    return text


def plane_svg(data: ReportData, groups: list[tuple[RunData, list[Point]]]) -> str:
    pts = [p for _, ps in groups for p in ps]
    hib_t = pts[0].meta.get("task_higher_is_better", True)
    hib_r = pts[0].meta.get("retention_higher_is_better", True)
    spread = spreads(data, (hib_t, hib_r)) if data.kind == "arena" else []

    def extent(axis: str) -> list[float]:  # the points, their whiskers and the seeds' spread stay inside the box
        vals = [v for p in pts for v in (getattr(p, axis), *p.ci(axis))]
        for s in spread:
            vals += [s[axis], *(s[axis + "_ci"] or ())] + [q[1 if axis == "task" else 2] for q in s["seeds"]]
        return [v for v in vals if finite(v)]

    fr = Frame(_axis(data.task or "task", hib_t, extent("task")),
               _axis(data.retention or "retention", hib_r, extent("retention")), height=480)
    col = colours([r.method for r, ps in groups if ps])
    paths, fronts, dots = [], [], []
    index = 0
    label_steps = len(pts) <= 40
    for r, ps in groups:
        c = col.get(r.method, "#777")
        if len(ps) > 1:
            coords = " ".join(f"{fr.x(p.task)},{fr.y(p.retention)}" for p in ps)
            paths.append(f'<polyline class="path" points="{coords}" stroke="{c}"><title>{esc(r.name)}: '
                         f'the path in step order</title></polyline>')
        for p in ps:
            dots.append(_whiskers(fr, p, c))
            tip = f"{r.name} · step {p.step}\n{shown(p, 'task')}\n{shown(p, 'retention')}"
            dots.append(f'<circle class="pt" data-point="{index}" data-run="{esc(r.name)}" '
                        f'data-method="{esc(r.method)}" data-step="{p.step}" cx="{fr.x(p.task)}" '
                        f'cy="{fr.y(p.retention)}" r="5" fill="{c}" tabindex="0"><title>{esc(tip)}</title></circle>')
            if label_steps:
                dots.append(f'<text class="steplabel" x="{fr.x(p.task) + 7}" y="{fr.y(p.retention) - 6}">'
                            f'{p.step}</text>')
            index += 1
    for method, c in col.items():
        front = sorted(pareto_front([p for r, ps in groups if r.method == method for p in ps]),
                       key=lambda p: (p.task, -p.retention))
        coords = " ".join(f"{fr.x(p.task)},{fr.y(p.retention)}" for p in front)
        fronts.append(f'<polyline class="frontier" points="{coords}" stroke="{c}"><title>{esc(method)}: Pareto '
                      f'frontier ({len(front)} points)</title></polyline>')
        fronts.extend(f'<circle class="front-ring" cx="{fr.x(p.task)}" cy="{fr.y(p.retention)}" r="8" '
                      f'stroke="{c}"/>' for p in front)
    rule = report_rule(data)
    marks = [f'<circle class="choice" cx="{fr.x(p.task)}" cy="{fr.y(p.retention)}" r="12"><title>recommended '
             f'by {esc(rule_text(rule))}: {esc(p.meta.get("run"))} step {p.step}'
             f'{" (the base: no checkpoint beats it)" if is_base(p) else ""}</title></circle>'
             for p in chosen(data, groups)]
    names = (data.task or "task", data.retention or "retention")
    seeds = [_spread_svg(fr, s, col.get(s["method"], "#777"), names) for s in spread]
    return svg(fr, "".join(paths + fronts + marks + dots + seeds),
               f"task versus retention: {len(pts)} scored checkpoints", "chart plane") + legend(list(col.items()))


def chosen(data: ReportData, groups: list[tuple[RunData, list[Point]]]) -> list[Point]:
    """The recommended point by the stated rule: the run's, or for an arena over all trials' points pooled."""
    pooled = [p for _, ps in groups for p in ps]
    try:
        return [choose(pooled, report_rule(data)).point] if pooled else []
    except SftlabError:
        return []


def plane(data: ReportData) -> str | None:
    groups = all_points(data)
    n = sum(len(ps) for _, ps in groups)
    if not n:
        return None
    partial = sum(1 for r in data.runs for e in r.entries if e.get("scores")) - n
    note = (f'<p class="note">{partial} scored checkpoint(s) lack a finite {esc(data.task)} or '
            f'{esc(data.retention)} score and are not on the plane.</p>' if partial else "")
    caption = (f"<p>{n} scored checkpoints (step 0 is the base model). Up and right are better on both axes. "
               "Thin lines: each trajectory in step order; thick lines and rings: each method's Pareto "
               f"frontier; dashed ring: the recommended point ({esc(rule_text(report_rule(data)))}); whiskers: "
               "95% confidence intervals. "
               + ("Squares: each method's selected point, the mean over seeds, with a cross of 95% t-interval "
                  "whiskers across seeds (none for a single seed: n=1); small dots: the selected point of each "
                  "seed. " if data.kind == "arena" and (data.leaderboard or {}).get("rows") else "")
               + "Hover a point for its scores; click it to see them below.</p>")
    inspector = '<div id="inspector" class="inspector" aria-live="polite"></div>'
    return caption + plane_svg(data, groups) + note + inspector


def recommend(points: list[Point], rule: dict | None = None) -> tuple[Point, str, list[Point]]:
    """(the choice by the stated rule, its reason, the earlier points that significantly dominate the final one)."""
    choice = choose(points, rule or {})
    return choice.point, choice.reason, overshoot(points)


def _overshoot_text(points: list[Point], over: list[Point]) -> str:
    final = max(points, key=lambda p: p.progress)
    if over:
        return (f"Overshoot: the final checkpoint (step {final.step}) is dominated beyond the confidence "
                f"intervals by step(s) {', '.join(str(p.step) for p in over)}.")
    return (f"No overshoot: no earlier checkpoint beats the final one (step {final.step}) on one axis without "
            "losing on the other, beyond the confidence intervals.")


def _verdict(p: Point, rule: dict) -> str:
    said = f'<span class="rule">{esc(rule_text(rule))}</span>'
    if is_base(p):
        return (f'<p class="verdict">No checkpoint beats the base under {said}: the base (step {p.step}) is kept, '
                "so there is nothing to export.</p>")
    return f'<p class="verdict">Recommended: <b>step {p.step}</b> by {said}.</p>'


def rewind_run_html(r: RunData, points: list[Point], rule: dict | None = None) -> str | None:
    if not points:
        return None
    rule = rule or {}
    try:
        p, reason, over = recommend(points, rule)
    except SftlabError as e:
        return f'<p class="note">{esc(e)}</p>'
    cmd = f"sftlab rewind {r.path} -o OUT"
    export = ("" if is_base(p) else f"<p>Export it with <code>{esc(cmd)}</code> (it reads the same rule from the "
              "run's config; --policy states another).</p>")
    return _verdict(p, rule) + f"<p>{esc(reason)}</p><p>{esc(_overshoot_text(points, over))}</p>" + export


def rewind_section(data: ReportData) -> str | None:
    groups = [(r, ps) for r, ps in all_points(data) if ps]
    if not groups:
        return None
    rule = report_rule(data)
    if data.kind == "run":
        return rewind_run_html(*groups[0], rule)
    rows = []
    for r, ps in groups:
        try:
            p, reason, over = recommend(ps, rule)
        except SftlabError as e:
            rows.append([esc(r.name), esc(r.method), esc(max(q.step for q in ps)), "-", "-", esc(e)])
            continue
        rows.append([esc(r.name), esc(r.method), esc(max(q.step for q in ps)),
                     f"<b>{p.step}</b>" + (" (base kept)" if is_base(p) else ""),
                     esc(", ".join(str(q.step) for q in over) or "none"), esc(reason)])
    pooled = [p for _, ps in groups for p in ps]
    try:
        best = choose(pooled, rule).point
    except SftlabError as e:
        return f'<p class="note">{esc(e)}</p>' + table(
            ["trial", "method", "final step", "selected step", "overshoot by", "why"], rows)
    where = ("no checkpoint beats the base: the base is kept" if is_base(best) else
             f'<b>{esc(best.meta.get("run"))}</b> ({esc(best.meta.get("method"))}) at step {best.step}')
    head = (f'<p class="verdict">Across all {len(pooled)} points of {len(groups)} trials, by '
            f'<span class="rule">{esc(rule_text(rule))}</span>, the chosen point is {where}: '
            f"{esc(shown(best, 'task'))}; {esc(shown(best, 'retention'))}.</p>")
    return head + table(["trial", "method", "final step", "selected step", "overshoot by", "why"], rows)


register_section("plane", "Task vs retention", plane, order=20)
register_section("rewind", "Rewinding recommendation", rewind_section, order=30)
