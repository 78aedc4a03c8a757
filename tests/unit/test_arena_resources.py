"""Per-trial resources in the arena: each trial's own peak memory (not the largest trial so far), its wall and
CPU seconds and its tokens, on the leaderboard and in the report, with their units."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from report_fake import write_arena
from sftlab import resources
from sftlab.arena.leaderboard import TrialResult, build_leaderboard, format_leaderboard
from sftlab.arena.runner import describe_usage, run_stats, run_trial
from sftlab.report import render_report
from sftlab.trajectory import point_from_scores

resettable = pytest.mark.skipif(not resources.reset_peak_rss(), reason="needs Linux /proc/self/clear_refs")


class Allocating:
    """Stands in for sftlab.train.loop.Trainer: a 'run' that touches `mb` MB and spins the CPU a little."""

    sizes: dict = {}

    def __init__(self, cfg, resume=False):
        self.mb = self.sizes[cfg.name]

    def run(self):
        block = bytearray(self.mb * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
        sum(range(200_000))
        del block


def trial(tmp_path, name):
    return SimpleNamespace(name=name, cfg=SimpleNamespace(name=name, run_dir=tmp_path / name))


@resettable
def test_a_trial_does_not_inherit_an_earlier_trials_peak(tmp_path, monkeypatch):
    import sftlab.train.loop as loop

    monkeypatch.setattr(loop, "Trainer", Allocating)
    Allocating.sizes = {"big": 400, "small": 10}
    big = run_trial(trial(tmp_path, "big"), "new")
    small = run_trial(trial(tmp_path, "small"), "new")
    assert big["status"] == small["status"] == "done"
    assert big["peak_scope"] == small["peak_scope"] == "trial"
    # the big trial's peak holds its 400 MB; the small one's is its own baseline + 10 MB, not the big one's
    assert big["peak_mem_mb"] - small["peak_mem_mb"] > 300, (big, small)
    assert small["peak_mem_mb"] < resources.peak_rss_mb() + 50
    assert big["peak_mem_mb"] - big["start_mem_mb"] > 350 and small["peak_mem_mb"] - small["start_mem_mb"] < 100
    assert "peak resident memory" in describe_usage(small) and "process-wide" not in describe_usage(small)
    for rec in (big, small):
        assert rec["seconds"] >= 0 and rec["cpu_s"] > 0


def test_without_a_reset_the_peak_is_marked_process_wide(tmp_path, monkeypatch):
    import sftlab.train.loop as loop

    monkeypatch.setattr(loop, "Trainer", Allocating)
    monkeypatch.setattr(resources, "CLEAR_REFS", tmp_path / "no-such-dir" / "clear_refs")
    Allocating.sizes = {"t": 1}
    rec = run_trial(trial(tmp_path, "t"), "new")
    assert rec["peak_scope"] == "process" and rec["peak_mem_mb"] > 0
    board = build_leaderboard([result("t", run_stats(tmp_path / "t", rec))])
    text = format_leaderboard(board)
    assert board["rows"][0]["peak_scope"] == "process"
    assert "*" in text.splitlines()[2] and "process-wide peak" in text


def write_metrics(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def result(name, stats):
    pts = [point_from_scores(s, {"name": "acc", "value": v, "higher_is_better": True},
                             {"name": "kl", "value": k, "higher_is_better": False})
           for s, v, k in ((0, 0.2, 0.0), (4, 0.8, 0.3))]
    return TrialResult(name, "lora", 1000, 1e-3, 0, pts, 1000, stats)


def test_run_stats_tokens_once_per_step_and_the_records_peak(tmp_path):
    d = tmp_path / "t"
    step = {"tokens_per_s": 100.0, "tokens": 50, "trained_tokens": 20, "peak_mem_mb": 4080.0}
    # step 2 logged twice: a run resumed from its step-1 checkpoint repeats it
    write_metrics(d, [{"step": 1, **step}, {"step": 2, **step}, {"step": 2, **step}, {"step": 2, "eval_loss": 1.0}])
    stats = run_stats(d, {"seconds": 12.5, "cpu_s": 20.0, "peak_mem_mb": 812.4, "peak_scope": "trial"})
    assert stats["tokens"] == 100 and stats["trained_tokens"] == 40
    assert (stats["peak_mem_mb"], stats["peak_scope"], stats["wall_s"], stats["cpu_s"]) == (812.4, "trial", 12.5, 20.0)
    old = run_stats(d, {"seconds": 12.5})  # a record from before per-trial measurement: metrics' peak, marked
    assert (old["peak_mem_mb"], old["peak_scope"]) == (4080.0, "process")


def test_columns_render_with_units_on_the_leaderboard_and_in_the_report(tmp_path):
    stats = {"tokens_per_s": 350.0, "tokens": 12_345, "trained_tokens": 5000, "peak_mem_mb": 812.4,
             "peak_scope": "trial", "wall_s": 31.0, "cpu_s": 57.0}
    text = format_leaderboard(build_leaderboard([result("t", stats)]))
    head, _, row = text.splitlines()[:3]
    for col in ("peak MB", "wall s", "CPU s", "tokens"):
        assert col in head
    assert "GPU MB" not in head  # no GPU figure: no column
    assert row.split()[-4:] == ["812", "31", "57", "12,345"]
    assert "MB = 2^20 bytes" in text and "*" not in row

    folder = write_arena(tmp_path / "arena", hostile=False)
    meta = json.loads((folder / "arena.json").read_text())
    meta["trials"][0].update(seconds=31.0, cpu_s=57.0, peak_mem_mb=812.4, peak_scope="trial")
    meta["trials"][2].update(seconds=2.0, cpu_s=1.5, peak_mem_mb=640.0, peak_scope="trial")  # failed: record only
    (folder / "arena.json").write_text(json.dumps(meta))
    board = json.loads((folder / "leaderboard.json").read_text())
    board["rows"][0].update(stats)
    board["trials"] = [{"trial": "lora-r4", **stats}]
    (folder / "leaderboard.json").write_text(json.dumps(board))
    html = render_report(folder).read_text()
    board_html = html.split('id="leaderboard"')[1].split("<section")[0]
    trials_html = html.split('id="trials"')[1].split("<section")[0]
    for label in ("peak memory (MB)", "wall (s)", "CPU (s)", "tokens", "mean tokens/s"):
        assert f"<th>{label}</th>" in board_html
    for label in ("peak memory (MB)", "peak measured over", "wall (s)", "CPU (s)", "tokens"):
        assert f"<th>{label}</th>" in trials_html
    assert "812.4" in trials_html and "12,345" in trials_html and "640" in trials_html
    assert "peak_mem_mb" not in board_html  # the raw key is not a column heading
