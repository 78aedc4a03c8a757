"""The report in a real browser: headless Chromium (Debian's `chromium` package, installed by `make test`)
renders the page of a hand-made arena with hostile strings in it, with no console output at all (errors,
uncaught exceptions, blocked loads), the page's script runs to its end, and the plane shows one point per
scored checkpoint. A screenshot is kept in test-artifacts/ (gitignored).

Console messages come from Chromium's own log (`--enable-logging=stderr`: one `:CONSOLE` line per message,
whatever its level), so the test needs no DevTools client and no browser download. Each Chromium process
runs in its own session with a timeout and is killed as a group, so a hung browser cannot hang the suite.
Without Chromium the test skips, except under CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from report_fake import FULL_PATH, LORA_PATH, PAYLOADS, scored_points, write_arena
from sftlab.report import render_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\] (.*)")


def chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        why = "headless Chromium not found (Debian: apt-get install chromium; `make test` does it as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return exe


def run_chromium(page: Path, *args: str, fragment: str = "", timeout: float = 300) -> tuple[str, list[str]]:
    """(stdout, console messages) of one headless Chromium run on a local file (at `#fragment`)."""
    with tempfile.TemporaryDirectory(prefix="sftlab-chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri() + fragment]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # chromium forks helpers: end the whole group
            proc.communicate()
            pytest.fail(f"chromium did not finish within {timeout}s: {' '.join(cmd)}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    return out, [m.group(1) for m in map(CONSOLE.search, err.splitlines()) if m]


def test_the_console_check_sees_errors(tmp_path):
    """Keeps the main test honest: the same log parsing does see an error and an uncaught exception."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("planted-error"); notDefined();</script>'
                   "</body></html>", encoding="utf-8")
    _, console = run_chromium(bad, "--dump-dom")
    assert any("planted-error" in m for m in console), console
    assert any("notDefined" in m for m in console), console


def test_report_renders_in_chromium(tmp_path):
    folder = write_arena(tmp_path / "arena")
    page = render_report(folder)
    expected = scored_points(folder)
    assert expected == len(LORA_PATH) + len(FULL_PATH)

    dom, console = run_chromium(page, "--dump-dom")
    assert console == [], console
    assert f'data-report-ready="{expected}"' in dom  # the script parsed the embedded data and ran to its end
    assert len(re.findall(r"<circle [^>]*data-point=", dom)) == expected
    assert "<img" not in dom.lower() and dom.lower().count("<script") == 2  # no payload became an element
    for p in PAYLOADS:
        assert p not in dom

    # the inspector (the only place the script writes) shows a point's hostile run name as text
    dom, console = run_chromium(page, "--dump-dom", fragment="#point-0")
    assert console == [], console
    panel = re.search(r'<div id="inspector"[^>]*>(.*?)</div></section>', dom, re.S)
    assert panel and "lora-r4 &lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt; (lora), step 0" in panel.group(1)
    assert "heldout_loss [task]: 3" in panel.group(1)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_browser.png"
    shot.unlink(missing_ok=True)
    _, console = run_chromium(page, f"--screenshot={shot}", "--window-size=1200,1800")
    assert console == [], console
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
