"""Writing quality per checkpoint: the quality probe's dimensions (readability, empathy, safety, actionability,
connection, judge) as a small table beside the plane.

The quality probe stores them in `scores[name]["extra"]["dimensions"]`, a mapping dimension -> {mean, ci_low,
ci_high, n, scale, source, counts} (secondary values such as the grade level carry `of`, the dimension they belong
to). Generation probes run on chosen checkpoints only (the base, the final one, the frontier), so the table has a
column per checkpoint that has them and a row per dimension.
"""

from __future__ import annotations

from .escape import esc, fmt, fmt_ci
from .load import ReportData, RunData
from .sections import per_run, register_section, table

NOTE = ('<p class="dim">Mean [95% bootstrap interval] over the probe\'s generations at each checkpoint where it ran; '
        "n answers scored. Scales, sources and limits of each scorer: docs/writing-quality.md. Rule-based scores "
        "read the surface of the text, not whether it is right.</p>")


def collect(r: RunData) -> dict[str, list[tuple[object, dict]]]:
    """probe name -> [(step, dimensions)] in step order, for scores that carry dimensions."""
    out: dict[str, list[tuple[object, dict]]] = {}
    for e in r.entries:
        for name, s in (e.get("scores") or {}).items():
            dims = ((s.get("extra") or {}) if isinstance(s, dict) else {}).get("dimensions")
            if isinstance(dims, dict) and dims:
                out.setdefault(str(name), []).append((e.get("step"), dims))
    return out


def _cell(d) -> str:
    if not isinstance(d, dict):
        return ""
    n = d.get("n")
    return fmt_ci(d.get("mean"), d.get("ci_low"), d.get("ci_high")) + (f" (n={fmt(n)})" if n is not None else "")


def probe_table(points: list[tuple[object, dict]]) -> str:
    names: list[str] = []
    for _, dims in points:
        names.extend(str(k) for k in dims if str(k) not in names)
    first = {n: next(d[n] for _, d in points if isinstance(d.get(n), dict)) if any(
        isinstance(d.get(n), dict) for _, d in points) else {} for n in names}
    head = ["dimension", "scale"] + [esc("base" if step == 0 else f"step {fmt(step)}") for step, _ in points]
    rows = []
    for n in names:
        meta = first[n] if isinstance(first[n], dict) else {}
        of = meta.get("of")
        label = f"&nbsp;&nbsp;{esc(n)} <span class=\"dim\">({esc(of)})</span>" if of else f"<b>{esc(n)}</b>"
        rows.append([label, f'<span class="dim">{esc(meta.get("scale") or "")}</span>']
                    + [esc(_cell(dims.get(n))) for _, dims in points])
    return table(head, rows, "num")


def run_writing(r: RunData) -> str | None:
    probes = collect(r)
    if not probes:
        return None
    parts = []
    for name, points in probes.items():
        if len(probes) > 1:
            parts.append(f"<h3>{esc(name)}</h3>")
        parts.append(probe_table(points))
    return "".join(parts) + NOTE


def writing(data: ReportData) -> str | None:
    return per_run(data, run_writing)


register_section("writing", "Writing quality", writing, order=25)
