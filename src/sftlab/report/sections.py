"""The report's sections, registered in one place.

A section is a function `render(data: ReportData) -> str | None` returning an HTML fragment (None: nothing
to show for this folder, the section is left out), plus one `register_section` call. The page shows the
registered sections sorted by `order`, each under its title with an anchor in the table of contents.

Adding a section (e.g. geometry plots from RUN/analysis/*.json, already loaded into `RunData.analysis`):

    from sftlab.report.sections import register_section
    from sftlab.report.escape import esc

    def geometry(data):
        runs = [r for r in data.runs if "spectra" in r.analysis]
        if not runs:
            return None
        return "".join(f"<h3>{esc(r.name)}</h3>..." for r in runs)

    register_section("geometry", "Geometry", geometry, order=80)

and import the module in sftlab/report/__init__.py. Escape every string that came from data with `esc`;
draw plots with sftlab.report.svg. A section that raises SftlabError is shown as that one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import SftlabError
from ..registry import Registry
from .escape import esc, finite, fmt, fmt_ci
from .load import ReportData, RunData
from .svg import Line, colours, legend, line_chart


@dataclass(frozen=True)
class Section:
    name: str  # also the HTML anchor
    title: str
    render: Callable[[ReportData], "str | None"]
    order: int = 100


SECTIONS: Registry[Section] = Registry("report section")


def register_section(name: str, title: str, render: Callable[[ReportData], "str | None"],
                     order: int = 100) -> Section:
    return SECTIONS.register(name, Section(name, title, render, order))


def render_sections(data: ReportData) -> list[tuple[Section, str]]:
    """(section, html) for every registered section that has something to show, in display order."""
    out = []
    for sec in sorted((SECTIONS.get(n) for n in SECTIONS.names()), key=lambda s: (s.order, s.name)):
        try:
            body = sec.render(data)
        except SftlabError as e:
            body = f'<p class="note">{esc(e)}</p>'
        if body:
            out.append((sec, body))
    return out


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; header and cells must already be escaped (cells may hold markup)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def per_run(data: ReportData, render_one: Callable[[RunData], "str | None"]) -> str | None:
    """One block per run: bare for a single run, a collapsible block per trial in an arena."""
    parts = []
    for r in data.runs:
        body = render_one(r)
        if not body:
            continue
        if data.kind == "run":
            parts.append(body)
        else:
            parts.append(f'<details><summary>{esc(r.name)} <span class="dim">({esc(r.method)})</span>'
                         f'</summary>{body}</details>')
    return "".join(parts) or None


# ---- overview ---------------------------------------------------------------------------------------

def _get(d: dict, *keys, default=None):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return default if d is None else d


def run_facts(r: RunData) -> list[tuple[str, object]]:
    cfg, prov = r.config, r.provenance
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    knobs = ", ".join(f"{k}={fmt(v)}" for k, v in method.items() if k != "name" and v not in (None, "", [], {}))
    scored = [e for e in r.entries if e.get("scores")]
    return [("method", f"{r.method}" + (f" ({knobs})" if knobs else "")),
            ("base model", _get(prov, "base_model", "spec") or _get(cfg, "model", "path")),
            ("base weights sha256", str(_get(prov, "base_model", "sha256", default=""))[:16] or None),
            ("learning rate", _get(cfg, "train", "lr")), ("steps", _get(cfg, "train", "steps")),
            ("batch size", _get(cfg, "train", "batch_size")), ("schedule", _get(cfg, "train", "schedule")),
            ("trainable params", prov.get("trainable_params")), ("total params", prov.get("total_params")),
            ("checkpoints", sum(1 for e in r.entries if e.get("path"))), ("scored points", len(scored)),
            ("sftlab commit", prov.get("sftlab_commit")), ("created", prov.get("created"))]


def facts_table(facts: list[tuple[str, object]]) -> str:
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in facts if v not in (None, "")]
    return f'<table class="facts">{"".join(rows)}</table>'


def overview(data: ReportData) -> str:
    parts = []
    if data.kind == "arena":
        trials = [t for t in (data.arena or {}).get("trials", []) if isinstance(t, dict)]
        status: dict[str, int] = {}
        for t in trials:
            status[str(t.get("status"))] = status.get(str(t.get("status")), 0) + 1
        cfg = (data.arena or {}).get("config")
        facts = [("arena", data.title), ("trials", len(trials)),
                 ("status", ", ".join(f"{n} {s}" for s, n in sorted(status.items()))),
                 ("runs with data", len(data.runs))]
        facts += [(f"config: {k}", v) for k, v in (cfg.items() if isinstance(cfg, dict) else [])]
        parts.append(facts_table(facts))
    else:
        r = data.runs[0]
        parts.append(facts_table([("run", r.name), ("folder", str(r.path))] + run_facts(r)))
        if r.config:
            import yaml

            parts.append(f"<details><summary>config.yaml</summary><pre>"
                         f"{esc(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>")
    axes = (f"<p>Plane axes: task score <b>{esc(data.task)}</b>, retention score <b>{esc(data.retention)}</b>.</p>"
            if data.task else "")
    notes = "".join(f"<li>{esc(n)}</li>" for n in data.notes)
    return "".join(parts) + axes + (f'<ul class="note">{notes}</ul>' if notes else "")


# ---- tables: leaderboard, trials, scores -------------------------------------------------------------

def leaderboard(data: ReportData) -> str | None:
    board = data.leaderboard
    rows = [r for r in (board or {}).get("rows", []) if isinstance(r, dict)]
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:  # flat columns; the nested per-seed points get their own table below
        cols.extend(k for k in r if k not in cols and k not in NESTED)
    meta = [("task", board.get("task")), ("retention", board.get("retention")),
            ("selection rule", board.get("select_rule")),
            ("normalisation", board.get("normalisation")), ("reference point", board.get("reference_point"))]
    info = "; ".join(f"{esc(k)}: <b>{esc(fmt(v))}</b>" for k, v in meta if v is not None)
    note = RESOURCE_NOTE if any(c in RESOURCE_LABELS for c in cols) else ""
    return (f"<p>{info}</p>" if info else "") + table(
        [esc(column_label(c)) for c in cols], [[esc(fmt(r.get(c))) for c in cols] for r in rows], "num") + note + \
        points_across_seeds(board, rows)


NESTED = ("points", "per_seed")
POINT_NAMES = {"start": "start (step 0, before the first update)", "final": "final (the last checkpoint)", "selected": "selected (by the select rule)",
               "rewound": "rewound (the best task score along the path)"}


def _mean_ci(m) -> str:
    """'0.5 [0.3, 0.7] (n=3)', or '0.5 (n=1)' where one seed gives no interval."""
    if not isinstance(m, dict) or not m.get("n") or not finite(m.get("mean")):
        return "-"
    text = fmt(m["mean"])
    if finite(m.get("ci_low")) and finite(m.get("ci_high")):
        text += f" [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"
    return f"{text} (n={m['n']})"


def points_across_seeds(board: dict, rows: list[dict]) -> str:
    """Start, final, selected and rewound points per (method, budget): mean and 95% t-interval across seeds."""
    body = []
    for r in rows:
        pts = r.get("points")
        if not isinstance(pts, dict):
            continue
        for k, label in POINT_NAMES.items():
            m = pts.get(k) if isinstance(pts.get(k), dict) else {}
            kept = m.get("base_kept") or 0
            body.append([esc(r.get("method")), esc(fmt(r.get("budget"))), esc(label),
                         esc(", ".join(str(s) for s in m.get("steps", [])) or "-"),
                         esc(_mean_ci(m.get("task"))), esc(_mean_ci(m.get("retention"))),
                         esc(f"base kept in {kept} of {r.get('seeds')} seed(s): no checkpoint beat it" if kept else "")])
    if not body:
        return ""
    return (f"<h3>Final, selected and rewound points across seeds</h3><p>Mean [95% t-interval across seeds: mean ± "
            f"t(0.975, n&minus;1)&middot;sd/&radic;n] (n seeds; one seed gives no interval). Selected by "
            f'<span class="rule">{esc(board.get("select_rule") or "select: default")}</span>.</p>'
            + table(["method", "budget", "point", "steps (per seed)", esc(str(board.get("task") or "task")),
                     esc(str(board.get("retention") or "retention")), "note"], body, "num"))


# What a trial cost (measured by the arena around each trial), with its unit: leaderboard.json's names.
RESOURCE_LABELS = {"tokens_per_s": "mean tokens/s", "tokens": "tokens", "trained_tokens": "trained tokens",
                   "peak_mem_mb": "peak memory (MB)", "peak_gpu_mb": "peak GPU memory (MB)", "wall_s": "wall (s)",
                   "cpu_s": "CPU (s)", "peak_scope": "peak measured over"}
RESOURCE_NOTE = ('<p class="dim">Peak memory: the trial\'s own peak resident memory (the kernel\'s high-water '
                 "mark, VmHWM, reset before each trial: the process's baseline at the trial's start plus what the "
                 "trial added; MB = 2^20 bytes). &ldquo;process&rdquo; in &ldquo;peak measured over&rdquo;: the "
                 "mark could not be reset, so the figure is the process's peak since it started. GPU memory: the "
                 "CUDA allocator's peak. Wall and CPU seconds (user + system, all threads) are the trial's own; "
                 "tokens: non-padding tokens trained on (trained tokens: those with a label).</p>")


def column_label(col: str) -> str:
    """A leaderboard column's name with its unit ("peak_mem_mb_sd" -> "peak memory (MB) sd")."""
    if col in RESOURCE_LABELS:
        return RESOURCE_LABELS[col]
    if col.endswith("_sd") and col[:-3] in RESOURCE_LABELS:
        return RESOURCE_LABELS[col[:-3]] + " sd"
    return col


TRIAL_COLUMNS = ("name", "method", "budget", "lr", "seed", "status", "trainable_params", "error")
# (label, leaderboard trial key, arena.json record key): the leaderboard's figures first (they carry tokens),
# the record's for a trial the leaderboard leaves out (failed, or without both scores)
TRIAL_RESOURCES = (("peak memory (MB)", "peak_mem_mb", "peak_mem_mb"), ("peak measured over", "peak_scope",
                   "peak_scope"), ("wall (s)", "wall_s", "seconds"), ("CPU (s)", "cpu_s", "cpu_s"),
                   ("tokens", "tokens", None))


def trials(data: ReportData) -> str | None:
    rows = [t for t in (data.arena or {}).get("trials", []) if isinstance(t, dict)]
    if not rows:
        return None
    board = {s.get("trial"): s for s in (data.leaderboard or {}).get("trials", []) if isinstance(s, dict)}
    res = [c for c in TRIAL_RESOURCES if any(_trial_cost(t, board, c) is not None for t in rows)]
    cells = [[f'<span class="status-{esc(t.get("status"))}">{esc(fmt(t.get(c)))}</span>' if c == "status"
              else esc(fmt(t.get(c))) for c in TRIAL_COLUMNS]
             + [esc(fmt(_trial_cost(t, board, c))) for c in res] for t in rows]
    return table([esc(c) for c in TRIAL_COLUMNS] + [esc(c[0]) for c in res], cells) + (RESOURCE_NOTE if res else "")


def _trial_cost(t: dict, board: dict, col: tuple):
    _, board_key, record_key = col
    v = (board.get(t.get("name")) or {}).get(board_key)
    if v is None or (isinstance(v, float) and not finite(v)):
        v = t.get(record_key) if record_key else None
    return v


def score_table(r: RunData, task: str | None, retention: str | None) -> str | None:
    scored = [e for e in r.entries if e.get("scores")]
    if not scored:
        return None
    names: list[str] = []
    for e in scored:
        names.extend(n for n in e["scores"] if n not in names)
    names.sort(key=lambda n: (n != task, n != retention))  # the plane's axes first
    meta = {n: next(e["scores"][n] for e in scored if n in e["scores"]) for n in names}
    head = ["step", "checkpoint"] + [
        f'{esc(n)}<br><span class="dim">{esc(_get(meta[n], "kind", default=""))}, '
        f'{"higher" if _get(meta[n], "higher_is_better", default=True) else "lower"} is better</span>'
        for n in names]
    rows = []
    for e in scored:
        cells = [esc(e.get("step")), esc(e.get("path") or ("base" if e.get("step") == 0 else ""))]
        for n in names:
            s = e["scores"].get(n)
            cells.append(esc(fmt_ci(s.get("value"), s.get("ci_low"), s.get("ci_high")))
                         if isinstance(s, dict) else "")
        rows.append(cells)
    return table(head, rows, "num")


def scores(data: ReportData) -> str | None:
    return per_run(data, lambda r: score_table(r, data.task, data.retention))


# ---- loss curves ------------------------------------------------------------------------------------

def _curve(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(float(m["step"]), float(m[key])) for m in rows if finite(m.get("step")) and finite(m.get(key))]


def loss(data: ReportData) -> str | None:
    runs = [r for r in data.runs if _curve(r.train, "loss") or _curve(r.evals, "eval_loss")]
    if not runs:
        return None
    arena = data.kind == "arena"
    by_method = colours([r.method for r in runs])
    lines = []
    for r in runs:
        train_c, eval_c = (by_method[r.method],) * 2 if arena else ("#4e79a7", "#f28e2b")
        prefix = f"{r.name}: " if arena else ""
        lines.append(Line(f"{prefix}training loss", train_c, _curve(r.train, "loss")))
        lines.append(Line(f"{prefix}eval loss", eval_c, _curve(r.evals, "eval_loss"), dashed=True, markers=True))
    items = (list(by_method.items()) if arena else [("training loss", "#4e79a7"), ("eval loss", "#f28e2b")])
    chart = line_chart([ln for ln in lines if ln.xy], "step", "loss", "loss curves")
    stats = [[esc(r.name), esc(len(r.train)), esc(fmt(r.train[-1].get("loss") if r.train else None)),
              esc(fmt(r.evals[-1].get("eval_loss") if r.evals else None)),
              esc(fmt(_mean(r.train, "tokens_per_s"))), esc(fmt(_max(r.train, "peak_mem_mb"))),
              esc(fmt(r.train[-1].get("elapsed") if r.train else None))] for r in runs]
    note = "<p class=\"dim\">Solid: training loss per logged step; dashed with dots: eval loss.</p>"
    return chart + legend(items) + note + table(
        ["run", "logged steps", "final loss", "final eval loss", "mean tokens/s", "peak memory (MB)",
         "elapsed (s)"], stats, "num")


def _mean(rows: list[dict], key: str):
    vals = [m[key] for m in rows if finite(m.get(key))]
    return sum(vals) / len(vals) if vals else None


def _max(rows: list[dict], key: str):
    vals = [m[key] for m in rows if finite(m.get(key))]
    return max(vals) if vals else None


register_section("overview", "Overview", overview, order=10)
register_section("leaderboard", "Leaderboard", leaderboard, order=40)
register_section("trials", "Trials", trials, order=45)
register_section("scores", "Scores by checkpoint", scores, order=50)
register_section("loss", "Loss curves", loss, order=60)
