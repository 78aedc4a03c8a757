"""The task-vs-retention plane and the rewinding recommendation.

Every scored checkpoint of every trajectory is one point (an SVG circle carrying `data-point`, so tests and
the page's script can find them); each trajectory is joined in step order; each method's Pareto frontier
(over all its trials) is drawn as a thick line. Axes are oriented as in sftlab.trajectory: lower-is-better
metrics are shown reversed, so the ideal corner is always top-right. The recommendation uses the same
frontier, overshoot and knee policy as `sftlab frontier` / `sftlab rewind` (trade-off: Biderman et al.
2024, "LoRA Learns Less and Forgets Less").
"""

from __future__ import annotations

from ..errors import SftlabError
from ..trajectory import Point, overshoot, pareto_front, point_from_scores, rewind, shown
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


def plane_svg(data: ReportData, groups: list[tuple[RunData, list[Point]]]) -> str:
    pts = [p for _, ps in groups for p in ps]
    hib_t = pts[0].meta.get("task_higher_is_better", True)
    hib_r = pts[0].meta.get("retention_higher_is_better", True)
    def extent(axis: str) -> list[float]:  # the points and their whiskers stay inside the box
        return [v for p in pts for v in (getattr(p, axis), *p.ci(axis)) if finite(v)]

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
    marks = [f'<circle class="choice" cx="{fr.x(p.task)}" cy="{fr.y(p.retention)}" r="12"><title>recommended: '
             f'{esc(p.meta.get("run"))} step {p.step} (knee)</title></circle>' for p in knees(data, groups)]
    return svg(fr, "".join(paths + fronts + marks + dots), f"task versus retention: {len(pts)} scored checkpoints",
               "chart plane") + legend(list(col.items()))


def knees(data: ReportData, groups: list[tuple[RunData, list[Point]]]) -> list[Point]:
    """The recommended point: the run's knee, or for an arena the knee over all trials' points pooled."""
    pooled = [p for _, ps in groups for p in ps]
    try:
        return [rewind(pooled, "knee").point] if pooled else []
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
               "frontier; dashed ring: the recommended point (knee); whiskers: 95% confidence intervals. "
               "Hover a point for its scores; click it to see them below.</p>")
    inspector = '<div id="inspector" class="inspector" aria-live="polite"></div>'
    return caption + plane_svg(data, groups) + note + inspector


def recommend(points: list[Point]) -> tuple[Point, str, list[Point]]:
    """(knee choice, its reason, the earlier points that significantly dominate the final one)."""
    choice = rewind(points, "knee")
    return choice.point, choice.reason, overshoot(points)


def _overshoot_text(points: list[Point], over: list[Point]) -> str:
    final = max(points, key=lambda p: p.progress)
    if over:
        return (f"Overshoot: the final checkpoint (step {final.step}) is dominated beyond the confidence "
                f"intervals by step(s) {', '.join(str(p.step) for p in over)}.")
    return (f"No overshoot: no earlier checkpoint beats the final one (step {final.step}) on one axis without "
            "losing on the other, beyond the confidence intervals.")


def rewind_run_html(r: RunData, points: list[Point]) -> str | None:
    if not points:
        return None
    try:
        p, reason, over = recommend(points)
    except SftlabError as e:
        return f'<p class="note">{esc(e)}</p>'
    cmd = f"sftlab rewind {r.path} --policy knee -o OUT"
    return (f'<p class="verdict">Recommended: <b>step {p.step}</b> (knee of the frontier).</p>'
            f"<p>{esc(reason)}</p><p>{esc(_overshoot_text(points, over))}</p>"
            f"<p>Export it with <code>{esc(cmd)}</code>.</p>")


def rewind_section(data: ReportData) -> str | None:
    groups = [(r, ps) for r, ps in all_points(data) if ps]
    if not groups:
        return None
    if data.kind == "run":
        return rewind_run_html(*groups[0])
    rows = []
    for r, ps in groups:
        p, reason, over = recommend(ps)
        rows.append([esc(r.name), esc(r.method), esc(max(q.step for q in ps)), f"<b>{p.step}</b>",
                     esc(", ".join(str(q.step) for q in over) or "none"), esc(reason)])
    pooled = [p for _, ps in groups for p in ps]
    best = rewind(pooled, "knee").point
    head = (f'<p class="verdict">Across all {len(pooled)} points of {len(groups)} trials, the knee is '
            f'<b>{esc(best.meta.get("run"))}</b> ({esc(best.meta.get("method"))}) at step {best.step}: '
            f"{esc(shown(best, 'task'))}; {esc(shown(best, 'retention'))}.</p>")
    return head + table(["trial", "method", "final step", "knee step", "overshoot by", "why"], rows)


register_section("plane", "Task vs retention", plane, order=20)
register_section("rewind", "Rewinding recommendation", rewind_section, order=30)
