"""docs/ cannot drift from the code: the generated reference pages (config fields, commands) are regenerated
into a temporary folder and must equal docs/ byte for byte; every relative link of README.md and docs/*.md
resolves (file and #heading); the numbers the pages state about the demo are the demo's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sftlab import demo
from sftlab.docs import GENERATED, REGENERATE, anchors, broken_links, generate, relative_links, slug

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    generate(out)
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generated_page_matches_the_code(fresh, name):
    committed = DOCS / name
    assert committed.exists(), f"docs/{name} is missing; regenerate it with: {REGENERATE}"
    if committed.read_bytes() != (fresh / name).read_bytes():
        old, new = committed.read_text(encoding="utf-8").splitlines(), (fresh / name).read_text(
            encoding="utf-8").splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/{name} differs from the code (first at line {first + 1}: "
                    f"{(old[first:first + 1] or ['<end>'])[0][:120]!r} vs {(new[first:first + 1] or ['<end>'])[0][:120]!r}); "
                    f"regenerate it with: {REGENERATE}")


def test_every_config_section_and_command_is_documented(fresh):
    import dataclasses

    from sftlab.cli import build_parser
    from sftlab.config import RunConfig

    config = (fresh / "config.md").read_text(encoding="utf-8")
    heads = anchors(config)
    for f in dataclasses.fields(RunConfig):
        assert f.name in heads, f"config.md has no section for {f.name}"
    assert {"arena", "study"} <= heads
    cli = (fresh / "cli.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"sftlab-{name}" in anchors(cli), f"cli.md has no section for sftlab {name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_sees_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# The arena (`sftlab arena`)\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-arena-sftlab-arena) [ok2](other.md#twice-1) ![pic](img.png) "
                    "[web](https://example.org/x) [self](#top)\n\n# Top\n\n[gone](missing.md) "
                    "[no heading](other.md#nowhere) `[in code](missing2.md)`\n\n```\n[fenced](missing3.md)\n```\n",
                    encoding="utf-8")
    assert relative_links(page.read_text()) == ["other.md#the-arena-sftlab-arena", "other.md#twice-1", "img.png",
                                                "#top", "missing.md", "other.md#nowhere"]
    assert broken_links(page) == ["page.md: missing.md: no such file",
                                  "page.md: other.md#nowhere: no heading #nowhere in other.md"]


def test_slugs_follow_github():
    assert slug("The arena (`sftlab arena`)") == "the-arena-sftlab-arena"
    assert slug("Scoring the path: probes, frontier, rewinding") == "scoring-the-path-probes-frontier-rewinding"
    assert slug("sftlab data inspect") == "sftlab-data-inspect"
    assert slug("Worked example (SmolLM2-135M, 2 CPU cores)") == "worked-example-smollm2-135m-2-cpu-cores"


def test_readme_first_screen():
    """What a newcomer needs, on the first screen: the questions, the two commands, how to call sftlab after
    set-up, the picture, a config for one's own data; the reference material lives in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for needle in ("make demo", "make test", ".venv/bin/sftlab", ". .venv/bin/activate", "docs/img/plane.png",
                   "sftlab arena", "sftlab report"):
        assert needle in text, needle
    assert (DOCS / "img" / "plane.png").stat().st_size > 10_000
    lines = text.count("\n")
    assert lines <= 120, f"README.md has {lines} lines: keep it a first screen, move reference material to docs/"


def test_demo_numbers_match_the_code():
    """Every 'N steps' said of the quick demo (and of the full demo's trials) is what demo.py runs."""
    said = []
    for page in PAGES:
        text = " ".join(page.read_text(encoding="utf-8").split())
        for sentence in re.split(r"(?<=[.;:])\s", text):
            if "QUICK=1" in sentence or "quick demo" in sentence.lower():
                for n in re.findall(r"(\d+) steps", sentence):
                    said.append((page.name, "quick", int(n)))
    assert said, "no page says how many steps the quick demo runs"
    assert all(n == demo.QUICK.steps for _, _, n in said), (said, demo.QUICK.steps)
    demo_page = " ".join((DOCS / "demo.md").read_text(encoding="utf-8").split())
    assert f"{demo.FULL.steps} steps of {demo.FULL.batch_size} examples" in demo_page
    assert f"every {demo.FULL.checkpoint_every} steps after it (ten checkpoints)" in demo_page
    assert demo.FULL.steps // demo.FULL.checkpoint_every == 10


def test_readme_links_every_docs_page():
    """The README's index reaches every page in docs/ (findings.md is written by `sftlab study` and may be
    absent; it is linked from the study page's text when present)."""
    linked = {Path(t.partition("#")[0]).name for t in relative_links((ROOT / "README.md").read_text(encoding="utf-8"))}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name not in linked and p.name != "findings.md"]
    assert missing == [], f"docs pages the README does not link: {missing}"
