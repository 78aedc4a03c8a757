"""The HTML page around the sections: header, contents, inline style, embedded data and a small script.

Self-contained by construction: no <link>, no external src, no web fonts (system font stacks), plots are
inline SVG. The script only adds a click-to-inspect panel for plane points; everything is readable without
it. It reads the embedded JSON (escaped by `script_json`) and writes with textContent, never innerHTML, so
data cannot become markup on this path either.
"""

from __future__ import annotations

from .escape import esc, script_json
from .load import ReportData
from .sections import render_sections

STYLE = """
:root{color-scheme:light;--fg:#1d2430;--dim:#667085;--line:#d0d5dd;--bg:#fff;--soft:#f5f7fa}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
margin:0 auto;max-width:1100px;padding:0 20px 60px}
header{border-bottom:1px solid var(--line);margin-bottom:8px}h1{font-size:22px;margin:18px 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:15px}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:14px}a{color:#1f5fa8}
.dim{color:var(--dim);font-size:12px}.note{color:#8a4b08}.verdict{font-size:16px}
table{border-collapse:collapse;margin:6px 0}th,td{border-bottom:1px solid var(--line);padding:4px 8px;
text-align:left;vertical-align:top}thead th{background:var(--soft)}table.num td{font-variant-numeric:tabular-nums}
table.facts th{font-weight:500;color:var(--dim)}.scroll{overflow-x:auto}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre.prompt{background:var(--soft);padding:6px;border-radius:4px;max-height:12em;overflow:auto}
.sample{margin:10px 0 18px}.ref{margin:4px 0}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
svg.chart{width:100%;height:auto;max-width:900px;display:block}
.plotbox{fill:#fff;stroke:var(--line)}.grid{stroke:#eef0f3}.tick{font-size:11px;fill:var(--dim)}
.axis-title{font-size:12px;fill:var(--fg)}.curve{fill:none;stroke-width:1.6}
.path{fill:none;stroke-width:1.2;opacity:.45}.frontier{fill:none;stroke-width:3;opacity:.85}
.front-ring{fill:none;stroke-width:1.5}.ci line{stroke-width:1;opacity:.5}
.pt{stroke:#fff;stroke-width:1;cursor:pointer}.pt:hover,.pt.sel{stroke:#000;stroke-width:2}
.steplabel{font-size:10px;fill:var(--dim)}.choice{fill:none;stroke:#000;stroke-width:1.5;stroke-dasharray:4 3}
ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:14px;margin:4px 0}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.inspector:empty{display:none}.inspector{background:var(--soft);padding:8px;border-radius:4px;margin-top:6px}
.status-failed{color:#b42318}.status-done{color:#067647}
"""

# Clicking (or focusing and pressing Enter on) a plane point, or opening the page at #point-N, shows that
# point's record from the embedded data.
SCRIPT = r"""
(function () {
  var el = document.getElementById("report-data");
  var box = document.getElementById("inspector");
  if (!el || !box) return;
  var data = JSON.parse(el.textContent);
  function fmt(x) { return (typeof x === "number") ? String(Number(x.toPrecision(4))) : (x == null ? "-" : String(x)); }
  function show(node) {
    var p = data.points[Number(node.getAttribute("data-point"))];
    if (!p) return;
    document.querySelectorAll(".pt.sel").forEach(function (n) { n.classList.remove("sel"); });
    node.classList.add("sel");
    box.textContent = "";
    var head = document.createElement("div");
    head.textContent = p.run + " (" + p.method + "), step " + p.step + (p.path ? ", " + p.path : " (base model)");
    box.appendChild(head);
    Object.keys(p.scores).forEach(function (name) {
      var s = p.scores[name], line = document.createElement("div");
      line.textContent = name + " [" + fmt(s.kind) + "]: " + fmt(s.value) +
        (s.ci_low != null ? "  (95% CI " + fmt(s.ci_low) + " to " + fmt(s.ci_high) + ")" : "") + ", n=" + fmt(s.n);
      box.appendChild(line);
    });
  }
  document.querySelectorAll("[data-point]").forEach(function (node) {
    node.addEventListener("click", function () { show(node); });
    node.addEventListener("keydown", function (e) { if (e.key === "Enter") show(node); });
  });
  // a link to report.html#point-N opens with point N inspected
  var m = /^#point-(\d+)$/.exec(window.location.hash);
  var linked = m && document.querySelector('[data-point="' + m[1] + '"]');
  if (linked) show(linked);
  // a marker for tests and tools: the script ran to the end
  document.documentElement.setAttribute("data-report-ready", String(data.points.length));
})();
"""


def build_html(data: ReportData) -> str:
    """The whole page as one string."""
    from .plane import payload

    sections = render_sections(data)
    nav = "".join(f'<li><a href="#{s.name}">{esc(s.title)}</a></li>' for s, _ in sections)
    body = "".join(f'<section id="{s.name}"><h2>{esc(s.title)}</h2>{html}</section>' for s, html in sections)
    kind = "arena" if data.kind == "arena" else "run"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>sftlab report: {esc(data.title)}</title><style>{STYLE}</style></head><body>"
            f'<header><h1>sftlab report: {esc(data.title)}</h1><div class="dim">{kind} folder '
            f"{esc(data.path)}</div><nav><ul>{nav}</ul></nav></header>{body}"
            f'<script type="application/json" id="report-data">{script_json(payload(data))}</script>'
            f"<script>{SCRIPT}</script></body></html>\n")
