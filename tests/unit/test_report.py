"""sftlab report: loading run and arena folders, escaping of hostile data, the plane's points, sections."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from report_fake import FULL_PATH, LORA_PATH, PAYLOADS, scored_points, write_arena, write_run
from sftlab.cli import main
from sftlab.errors import SftlabError
from sftlab.registry import RegistryError
from sftlab.report import SECTIONS, build_html, load, register_section, render_report
from sftlab.report.escape import esc, script_json

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "div", "nav", "ul",
                "li", "a", "section", "p", "b", "code", "pre", "table", "thead", "tbody", "tr", "th", "td", "span",
                "br", "details", "summary", "svg", "rect", "line", "text", "polyline", "circle", "g", "script"}


class Page(HTMLParser):
    """Every element, attribute, script body and the decoded visible text of a page."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.scripts, self.text = [], [], [], []
        self._in_script: dict | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append([self._in_script, ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            self.scripts[-1][1] += data
        else:
            self.text.append(data)


@pytest.fixture
def arena(tmp_path):
    return write_arena(tmp_path / "arena")


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", f"run {PAYLOADS[0]}", "lora", LORA_PATH, hostile=True)


def test_escaping_helpers():
    assert esc('"><img src=x onerror=alert(3)>') == "&quot;&gt;&lt;img src=x onerror=alert(3)&gt;"
    text = script_json({"a": "</script><script>alert(2)</script>", "nan": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in script_json("a&b")
    assert json.loads(text) == {"a": "</script><script>alert(2)</script>", "nan": None}


@pytest.mark.parametrize("which", ["run", "arena"])
def test_hostile_strings_never_reach_the_page_as_markup(which, run, arena):
    folder = run if which == "run" else arena
    html = build_html(load(folder))
    for p in PAYLOADS:
        assert p not in html
    assert "<img" not in html.lower() and "<script>alert" not in html.lower()
    page = Page(html)
    assert set(page.tags) <= ALLOWED_TAGS, set(page.tags) - ALLOWED_TAGS
    assert not [a for a, _ in page.attrs if a.lower().startswith("on")]  # no event-handler attribute anywhere
    # exactly our two script blocks: the escaped data and the fixed script
    assert [s[0].get("type") for s in page.scripts] == ["application/json", None]
    from sftlab.report.page import SCRIPT

    assert page.scripts[1][1] == SCRIPT
    data = json.loads(page.scripts[0][1])
    names = {p["run"] for p in data["points"]} | {p["method"] for p in data["points"]}
    assert any(PAYLOADS[1] in n for n in names) or any(PAYLOADS[0] in n for n in names)  # round-trips intact
    # the payloads are shown to the reader as text (escaped), not dropped
    visible = "".join(page.text)
    for p in PAYLOADS:
        assert p in visible


def test_plane_has_one_point_per_scored_checkpoint(arena, run):
    for folder, expected in ((arena, len(LORA_PATH) + len(FULL_PATH)), (run, len(LORA_PATH))):
        html = build_html(load(folder))
        assert scored_points(folder) == expected  # the unscored checkpoint and the torn line are not points
        assert len(re.findall(r"<circle [^>]*data-point=", html)) == expected
        data = json.loads(Page(html).scripts[0][1])
        assert len(data["points"]) == expected and {p["step"] for p in data["points"]} >= {0, 2}


def test_arena_sections(arena):
    data = load(arena)
    assert data.kind == "arena" and len(data.runs) == 2
    assert (data.task, data.retention) == ("heldout_loss", "kl_to_base")  # from leaderboard.json
    html = build_html(data)
    for sid in ("overview", "plane", "rewind", "leaderboard", "trials", "scores", "loss", "samples"):
        assert f'<section id="{sid}">' in html
    assert html.count('class="frontier"') == 2  # one frontier per method
    assert "hypervolume" in html and "0.6123" in html and "best_task" in html  # every column, floats shortened
    assert "status-failed" in html and "oft-1" in html  # the failed trial is listed though it has no folder
    # the full run's final point (0.9, 0.20) is beaten by nothing; lora's knee is an interior point
    assert "Across all 9 points of 2 trials" in html


def test_run_sections_and_recommendation(run):
    html = build_html(load(run))
    assert "Recommended: <b>step" in html and "knee" in html
    assert "leaderboard" not in html.split("<nav>")[1].split("</nav>")[0]  # no arena sections for a run
    # samples are grouped by prompt, one output per checkpoint
    assert html.count('class="sample"') == 2 and "step 8 says" in html


def test_self_contained(arena):
    page = Page(build_html(load(arena)))
    assert not {"link", "img", "iframe", "object", "embed"} & set(page.tags)
    assert not [a for a, _ in page.attrs if a in ("src", "srcset", "action", "formaction")]
    assert all(v.startswith("#") for a, v in page.attrs if a == "href")  # only in-page anchors
    style = "".join(page.text)
    assert "@import" not in style and "url(" not in style and "@font-face" not in style


def test_overshoot_is_reported(tmp_path):
    # the task gets worse and retention keeps falling after step 4: step 4 dominates the final point
    folder = write_run(tmp_path / "r", "r", "lora", [(3.0, 0.0), (2.0, 0.01), (1.0, 0.02), (1.6, 0.30)])
    html = build_html(load(folder))
    assert "Overshoot: the final checkpoint (step 6)" in html and "step(s) 4" in html


def test_nan_scores_keep_the_embedded_json_strict(tmp_path):
    folder = write_run(tmp_path / "r", "r", "lora", LORA_PATH)
    traj = folder / "trajectory.jsonl"
    traj.write_text(traj.read_text().replace('"ci_low": 0.95', '"ci_low": NaN'), encoding="utf-8")
    text = Page(build_html(load(folder))).scripts[0][1]

    def refuse(c):
        raise ValueError(c)

    json.loads(text, parse_constant=refuse)  # JSON.parse in a browser rejects NaN too


def test_loader_errors_and_cli(tmp_path, run, capsys):
    with pytest.raises(SftlabError, match="neither a run folder"):
        load(tmp_path)
    with pytest.raises(SftlabError, match="no such folder"):
        load(tmp_path / "missing")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    out = render_report(run, tmp_path / "sub" / "r.html")
    assert out.is_file() and not (tmp_path / "sub" / "r.html.tmp").exists()


def test_a_registered_section_appears_in_order(run):
    with pytest.raises(RegistryError, match="already registered"):
        register_section("plane", "again", lambda d: "x")
    register_section("zz_test_extra", "Extra <b>", lambda d: f"<p>{esc(len(d.runs))} run</p>", order=25)
    try:
        html = build_html(load(run))
    finally:
        SECTIONS._items.pop("zz_test_extra")
    assert '<a href="#zz_test_extra">Extra &lt;b&gt;</a>' in html
    assert html.index('id="plane"') < html.index('id="zz_test_extra"') < html.index('id="rewind"')


def test_report_imports_neither_torch_nor_training(run):
    code = (f"import sys; from sftlab.report import render_report; render_report({str(run)!r}); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('sftlab.train', 'transformers'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_symlog_axis_for_values_spanning_decades():
    """KLs of 0.03 and 8 on one axis: a symmetric log scale (order kept, 0 placed, ticks in the metric's own
    units, the widest gap compressed); values within two decades stay linear."""
    from sftlab.report.svg import Frame, symlog_axis

    kl = [0.0, -0.03, -0.1, -0.45, -0.9, -8.5]  # plotted: a lower-is-better KL, negated
    ax = symlog_axis("kl", kl, flip=True)
    assert ax.scale > 0 and "log scale" in ax.label
    fr = Frame(symlog_axis("x", [0.0, 1.0]), ax)
    ys = [fr.y(v) for v in kl]
    assert ys == sorted(ys)  # SVG y grows downwards: larger KL (more negative) lower on the page
    assert ys[4] - ys[0] > (ys[5] - ys[0]) / 3  # 0..0.9 takes a real share of the height, not a sliver
    labels = [lab for _, lab in ax.ticks()]
    assert "0" in labels and any(lab in ("1", "2", "5") for lab in labels) and any(lab.startswith("0.") for lab in labels)
    for v, lab in ax.ticks():
        assert v == -float(lab)  # flipped: plotted = minus the shown value
    lin = symlog_axis("acc", [0.1, 0.5, 0.9])
    assert lin.scale == 0 and "log" not in lin.label


def test_writing_quality_table_beside_the_plane(tmp_path):
    """The quality probe's dimensions: one row per dimension (secondaries under theirs), a column per checkpoint,
    mean [CI] (n), placed right after the plane."""
    folder = write_run(tmp_path / "r", "r", "lora", LORA_PATH[:3])
    html = build_html(load(folder))
    assert html.index('id="plane"') < html.index('id="writing"') < html.index('id="rewind"')
    section = html.split('<section id="writing">')[1].split("</section>")[0]
    assert section.count("<tr>") == 1 + 4  # header + readability, grade_level, empathy, safety
    assert "<th>base</th><th>step 2</th><th>step 4</th>" in section
    assert "61 [60.9, 61.1] (n=2)" in section and "0.2 [0.1, 0.3] (n=2)" in section
    assert "grade_level <span class=\"dim\">(readability)</span>" in section and "Flesch reading ease" in section
    plain = write_run(tmp_path / "p", "p", "lora", LORA_PATH[:2])
    traj = plain / "trajectory.jsonl"
    traj.write_text(re.sub(r', "dimensions": \{.*?\}\}\}', "}}", traj.read_text()), encoding="utf-8")
    assert '<section id="writing">' not in build_html(load(plain))  # no dimensions, no section
