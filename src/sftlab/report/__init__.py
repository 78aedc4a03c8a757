"""`sftlab report PATH`: a run folder or an arena folder -> one self-contained report.html.

Pure json/yaml reading and string building: nothing here imports torch or sftlab.train, so a report of a
run made elsewhere renders in well under a second. Layout:

  load.py      the folder -> ReportData (runs, trajectories, metrics, config, arena trials, leaderboard)
  sections.py  the section registry (how to add one is documented there) + overview, tables, loss curves
  plane.py     task-vs-retention plane (one `data-point` per scored checkpoint) + rewinding recommendation
  samples.py   sample generations per checkpoint
  writing.py   the quality probe's writing dimensions per checkpoint (a table beside the plane)
  geometry.py  plots of RUN/analysis/*.json (`sftlab analyze`): spectra, drift per layer and step
  svg.py       inline SVG charts; escape.py  escaping for HTML and embedded JSON; page.py  the page shell
"""

from __future__ import annotations

from pathlib import Path

from . import geometry, plane, samples, sections, writing  # noqa: F401  (importing registers their sections)
from .load import ReportData, load
from .page import build_html
from .sections import SECTIONS, register_section

__all__ = ["ReportData", "SECTIONS", "build_html", "load", "register_section", "render_report"]


def render_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run or arena folder at `path` to `out` (default PATH/report.html)."""
    data = load(path)
    target = Path(out) if out else Path(path) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(build_html(data), encoding="utf-8")
    tmp.replace(target)  # a reader never sees half a page
    return target
