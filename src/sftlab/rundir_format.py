"""The run directory's files and line formats, with their one reader and writer. Standard library only (no torch),
so the report, `sftlab frontier` and the arena read runs without loading the training stack.

Lines (JSON Lines, one object per line, appended durably by `append_line`):

- trajectory.jsonl: a checkpoint line `{"step", "path", "sha256", "time", ...}` once its folder is complete, and
  score lines `{"step", "scores": {name: score}, ...}` added by scoring (during training or `sftlab eval`); step 0
  is the starting model. Merge rule (`merge_trajectory`): lines are taken per step in file order, a later line's
  keys win, and `scores` merge by name (a later line's score of the same name wins).
- metrics.jsonl: one line per logged step (`{"step", "loss", "lr", ...}`), and eval lines with `"eval": true`.
- arena.json: `{"name", "arena", "config", "trials": [{"name", "method", "run_dir", "status", ...}]}`;
  leaderboard.json next to it.

A line that is not a JSON object with an integer `step` is a bad line: a torn last line (a crash or a full disk
mid-write), garbage, a line from some other tool. Readers skip it and truncation drops it, never fatal.

Format version: provenance.json carries `"format": FORMAT_VERSION` from the run's start. A run without it was
written before the version was recorded; it is version 1, the same lines as today. A run of a newer version than
this sftlab knows is refused with a message, not misread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import SftlabError

FORMAT_VERSION = 1  # bump when a line's meaning changes; teach the readers the old version at the same time
FORMAT_KEY = "format"  # in provenance.json; absent means version 1

TRAJECTORY = "trajectory.jsonl"
METRICS = "metrics.jsonl"
PROVENANCE = "provenance.json"
CONFIG = "config.yaml"
ARENA = "arena.json"
LEADERBOARD = "leaderboard.json"


# ---- lines ----------------------------------------------------------------------------------------------------

def parse_line(line: str | bytes) -> dict | None:
    """One line as a dict with an integer step, or None for a bad line (torn, not an object, no step)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")  # a torn multi-byte character makes one bad line
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not _is_step(row.get("step")):
        return None
    return row


def _is_step(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_lines(path: str | Path) -> list[dict]:
    """The good lines of a step-keyed JSON Lines file, in file order; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    return [row for row in map(parse_line, path.read_bytes().splitlines()) if row is not None]


def append_line(path: str | Path, row: dict, durable: bool = True) -> None:
    """Append one line (durably: fsync'ed). A torn last line (a crash or a full disk mid-write) is closed first,
    so it stays one bad line that readers skip instead of swallowing this one; a failed append is rolled back."""
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        prefix = b""
        if size:
            f.seek(size - 1)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
        try:
            f.write(prefix + (json.dumps(row) + "\n").encode("utf-8"))
            f.flush()
            if durable:
                os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def truncate_lines(path: str | Path, max_step: int) -> None:
    """Keep the good lines with step <= max_step, as written (atomic rewrite; bad lines dropped)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for raw in path.read_bytes().splitlines():
        row = parse_line(raw)
        if row is not None and row["step"] <= max_step:
            keep.append(raw + b"\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"".join(keep))
    os.replace(tmp, path)


# ---- trajectory ---------------------------------------------------------------------------------------------

def merge_trajectory(lines: list[dict]) -> list[dict]:
    """One dict per step, in step order: a later line's keys win, `scores` merge by name. Bad lines (no integer
    step, not a dict) are skipped, and a `scores` that is not a dict counts as none."""
    by_step: dict[int, dict] = {}
    for entry in lines:
        if not isinstance(entry, dict) or not _is_step(entry.get("step")):
            continue
        prev = by_step.get(entry["step"], {})
        merged = {**prev, **entry}
        if "scores" in prev or "scores" in entry:
            merged["scores"] = {**_scores(prev), **_scores(entry)}
        by_step[entry["step"]] = merged
    return [by_step[s] for s in sorted(by_step)]


def _scores(entry: dict) -> dict:
    s = entry.get("scores")
    return s if isinstance(s, dict) else {}


def trajectory_lines(run_dir: str | Path, check: bool = True) -> list[dict]:
    """trajectory.jsonl's good lines as written, in order (what `read_trajectory` merges)."""
    if check:
        check_format(run_dir)
    return read_lines(Path(run_dir) / TRAJECTORY)


def read_trajectory(run_dir: str | Path, check: bool = True) -> list[dict]:
    """The run's points in step order, checkpoint and score lines merged (`merge_trajectory`). `check`: refuse a
    run of a newer format than this sftlab reads."""
    return merge_trajectory(trajectory_lines(run_dir, check))


# ---- metrics ------------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path, check: bool = True) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (training lines, eval lines), each in file order."""
    if check:
        check_format(run_dir)
    rows = read_lines(Path(run_dir) / METRICS)
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]


def step_metrics(run_dir: str | Path) -> list[dict]:
    """The training lines of timed steps (with tokens_per_s), one per step (the last line of a step wins: a
    resumed run's repeat counts once), in step order."""
    by_step = {r["step"]: r for r in read_metrics(run_dir)[0] if "tokens_per_s" in r}
    return [by_step[s] for s in sorted(by_step)]


# ---- provenance and the format version ------------------------------------------------------------------------

def read_provenance(run_dir: str | Path) -> dict:
    """provenance.json, or {} when there is none (a run killed before it started writing)."""
    path = Path(run_dir) / PROVENANCE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SftlabError(f"{path}: not valid JSON ({e}); restore it from a copy, or delete it to read the run "
                          "without its provenance") from None
    if not isinstance(data, dict):
        raise SftlabError(f"{path}: expected a JSON object")
    return data


def format_fields() -> dict:
    """What a run's provenance.json records about its format (written when the run starts)."""
    return {FORMAT_KEY: FORMAT_VERSION}


def run_format(run_dir: str | Path) -> int:
    """The run's format version: provenance.json's `format`; 1 when absent (written before it was recorded) or
    when provenance.json cannot be read (its lines are still readable)."""
    try:
        v = read_provenance(run_dir).get(FORMAT_KEY, 1)
    except SftlabError:
        return 1
    return v if _is_step(v) and v >= 1 else 1


def check_format(run_dir: str | Path) -> None:
    """Refuse a run written by a newer sftlab in a format this one does not know."""
    v = run_format(run_dir)
    if v > FORMAT_VERSION:
        raise SftlabError(f"{run_dir}: written in run-directory format {v}; this sftlab reads formats up to "
                          f"{FORMAT_VERSION}. Upgrade sftlab to read it")


# ---- arena --------------------------------------------------------------------------------------------------

def read_arena(folder: str | Path) -> dict:
    """arena.json: the arena's name, section, base config and trial records (each names its run_dir)."""
    path = Path(folder) / ARENA
    if not path.is_file():
        raise SftlabError(f"{path}: no such file; pass the folder `sftlab arena` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SftlabError(f"{path}: not valid JSON ({e}); rerun the arena (sftlab arena ARENA.yaml) to rewrite "
                          "it") from None
    if not isinstance(data, dict) or not isinstance(data.get("trials", []), list):
        raise SftlabError(f"{path}: expected a JSON object with a 'trials' list")
    data.setdefault("trials", [])
    return data
