"""Read a run folder or an arena folder into plain data for the report: json and yaml only, no torch.

A run folder holds trajectory.jsonl and metrics.jsonl (read by sftlab.rundir_format, which owns their formats),
config.yaml, provenance.json and optionally analysis/*.json. An arena folder holds arena.json (the trials, each
naming its run folder) and leaderboard.json. Missing or torn files are noted, not fatal: a report of a
half-finished run is useful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SftlabError
from ..rundir_format import ARENA, CONFIG, LEADERBOARD, METRICS, PROVENANCE, TRAJECTORY, check_format, read_arena
from ..rundir_format import read_metrics, read_trajectory


@dataclass
class RunData:
    """One run folder, as read from disk."""

    path: Path
    name: str
    method: str
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)  # trajectory, one merged dict per step, step order
    train: list[dict] = field(default_factory=list)  # metrics.jsonl training lines
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl eval lines
    analysis: dict[str, Any] = field(default_factory=dict)  # analysis/NAME.json -> parsed content, by NAME
    trial: dict | None = None  # the arena's record for this run, if any


@dataclass
class ReportData:
    """Everything a section may draw on. `task` / `retention` are the score names on the plane's axes."""

    kind: str  # "run" or "arena"
    path: Path
    title: str
    runs: list[RunData]
    arena: dict | None = None
    leaderboard: dict | None = None
    task: str | None = None
    retention: str | None = None
    notes: list[str] = field(default_factory=list)  # what was missing or unreadable while loading


def read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        notes.append(f"{path.name}: not valid JSON ({e})")
        return None


def read_yaml(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        notes.append(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
        return {}
    return data if isinstance(data, dict) else {}


def load_run(path: Path, notes: list[str], name: str | None = None, trial: dict | None = None) -> RunData:
    cfg = read_yaml(path / CONFIG, notes)
    try:  # a newer format is noted, and read as far as this sftlab can
        check_format(path)
    except SftlabError as e:
        notes.append(str(e))
    train, evals = read_metrics(path, check=False)
    analysis = {}
    for f in sorted((path / "analysis").glob("*.json")) if (path / "analysis").is_dir() else []:
        content = read_json(f, notes)
        if content is not None:
            analysis[f.stem] = content
    t = trial or {}  # an arena trial's label keeps a quantized base apart (lora@nf4)
    method = t.get("label") or t.get("method") or (cfg.get("method") or {}).get("name") or "run"
    run_name = name or (cfg.get("run") or {}).get("name") or path.name
    return RunData(path=path, name=str(run_name), method=str(method), config=cfg,
                   provenance=read_json(path / PROVENANCE, notes) or {},
                   entries=read_trajectory(path, check=False), train=train, evals=evals,
                   analysis=analysis, trial=trial)


def load_arena(path: Path, notes: list[str]) -> ReportData:
    arena = read_arena(path)
    trials = arena["trials"]
    runs = []
    for t in trials:
        if not isinstance(t, dict):
            continue
        run_dir = path / str(t.get("run_dir") or "")
        if not t.get("run_dir") or not run_dir.is_dir():
            if t.get("status") == "done":
                notes.append(f"trial {t.get('name')!s}: run folder {t.get('run_dir')!s} is missing")
            continue
        runs.append(load_run(run_dir, notes, name=str(t.get("name") or run_dir.name), trial=t))
    board = read_json(path / LEADERBOARD, notes)
    return ReportData(kind="arena", path=path, title=str(arena.get("name") or path.name), runs=runs,
                      arena=arena, leaderboard=board if isinstance(board, dict) else None, notes=notes)


RUN_FILES = (TRAJECTORY, METRICS, CONFIG)


def load(path: str | Path) -> ReportData:
    """A run folder or an arena folder (told apart by arena.json), with the plane's axes chosen."""
    path = Path(path)
    if not path.is_dir():
        raise SftlabError(f"{path}: no such folder; pass a run folder or an arena folder")
    notes: list[str] = []
    if (path / ARENA).is_file():
        data = load_arena(path, notes)
    elif any((path / f).is_file() for f in RUN_FILES):
        run = load_run(path, notes)
        data = ReportData(kind="run", path=path, title=run.name, runs=[run], notes=notes)
    else:
        raise SftlabError(f"{path}: neither a run folder (no {', '.join(RUN_FILES)}) nor an arena folder "
                          "(no arena.json)")
    data.task, data.retention = choose_axes(data)
    return data


def choose_axes(data: ReportData) -> tuple[str | None, str | None]:
    """The leaderboard's task/retention names when scores carry them, else the first task and retention score
    (the same default as `sftlab frontier`)."""
    from ..rewinding import pick_scores

    entries = [e for r in data.runs for e in r.entries]
    seen = {name for e in entries for name in (e.get("scores") or {})}
    board = data.leaderboard or {}
    wanted = (board.get("task"), board.get("retention"))
    if all(isinstance(w, str) and w in seen for w in wanted):
        return wanted  # type: ignore[return-value]
    if any(wanted):
        data.notes.append(f"leaderboard axes {wanted} not found among the scores; using the first task and "
                          "retention scores")
    try:
        return pick_scores(entries, None, None)
    except SftlabError as e:
        data.notes.append(str(e))
        return None, None
