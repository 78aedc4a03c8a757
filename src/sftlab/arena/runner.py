"""Run an arena: each trial a normal run directory under ARENA/trials/, then the leaderboard.

Shared work: the base model's probe outputs (the KL-to-base cache and the step-0 scores) live in the
cache root and are computed by the first trial that needs them; tokenized data is memoised in the
process (sftlab.data.prepare), so trials run here one after another tokenize once.

Rerunning is resuming: a trial whose run directory has the same config hash and a final scored
checkpoint is skipped; one interrupted part-way is resumed from its last checkpoint; one whose config
changed is moved aside (NAME.stale-TIME) and run again. A failed trial is recorded with its error
(and ARENA/trials/NAME.error.txt holds the traceback) and the others go on.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from ..errors import SftlabError
from .leaderboard import TrialResult, build_leaderboard, format_leaderboard
from .plan import ArenaSection, Trial, arena_from_dict, load_arena, plan_trials, trial_hash, trials_table


def trial_state(trial: Trial) -> str:
    """'new' | 'done' | 'partial' (same config, not finished) | 'stale' (another config in the folder)."""
    from ..config import load_config
    from ..train.checkpoint import read_trajectory

    d = trial.cfg.run_dir
    if not (d / "config.yaml").is_file():
        return "stale" if d.exists() and any(d.iterdir()) else "new"
    try:
        same = trial_hash(load_config(d / "config.yaml")) == trial.hash
    except SftlabError:
        same = False
    if not same:
        return "stale"
    entries = read_trajectory(d)
    final = any(e.get("path") and e["step"] == trial.cfg.train.steps for e in entries)
    scoring = trial.cfg.probes and trial.cfg.scoring.during_training
    scored = not scoring or any("scoring_seconds" in e for e in _raw_lines(d))
    return "done" if final and scored else "partial"


def _raw_lines(d: Path) -> list[dict]:
    p = d / "trajectory.jsonl"
    out = []
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def run_trial(trial: Trial, state: str) -> dict:
    """Train (or resume) one trial in this process; returns its record (status, seconds, error)."""
    from ..train.loop import Trainer

    d = trial.cfg.run_dir
    if state == "stale":
        aside = d.with_name(f"{d.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        d.rename(aside)
        print(f"arena: {trial.name}: its folder held another config; moved to {aside.name}")
    resume = state == "partial" and (d / "resume").is_dir()
    if state == "partial" and not resume:
        shutil.rmtree(d)  # stopped before its first checkpoint: nothing to keep
    t0 = time.time()
    try:
        Trainer(trial.cfg, resume=resume).run()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed trial must not stop the others
        d.parent.mkdir(parents=True, exist_ok=True)
        (d.parent / f"{trial.name}.error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                "seconds": round(time.time() - t0, 1)}
    finally:
        _free_memory()
    return {"status": "done", "error": None, "seconds": round(time.time() - t0, 1), "resumed": resume}


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_arena(path: str | dict, overrides: list[str] = (), plan_only: bool = False) -> Path:
    """Run (or resume) the arena of a config file, or of a config dict (as read from YAML); returns its folder."""
    arena, base = arena_from_dict(path) if isinstance(path, dict) else load_arena(path, overrides)
    trials = plan_trials(arena, base)
    folder = arena.folder
    print(f"arena {arena.name}: {len(trials)} trials ({sum(t.refused for t in trials)} refused) -> {folder}")
    print(trials_table(trials))
    if plan_only:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    records = _load_records(folder)
    _write_arena(folder, arena, base, trials, records)
    runnable = [t for t in trials if not t.refused]
    states = {t.name: trial_state(t) for t in runnable}
    for t in trials:
        if t.refused:
            records[t.name] = {"status": "refused", "error": t.note}
        elif states[t.name] == "done":
            records[t.name] = {**records.get(t.name, {}), "status": "done", "skipped": True}
    todo = [t for t in runnable if states[t.name] != "done"]
    if todo and arena.backend == "ray":
        from .ray_backend import run_on_ray

        for name, rec in run_on_ray(todo, states, arena).items():
            records[name] = rec
    else:
        for i, t in enumerate(todo, 1):
            print(f"\narena: trial {i}/{len(todo)}: {t.name} ({t.setting}, lr {t.lr:g}, seed {t.seed})"
                  + (" - resuming" if states[t.name] == "partial" else ""), flush=True)
            records[t.name] = run_trial(t, states[t.name])
            _write_arena(folder, arena, base, trials, records)
            if records[t.name]["status"] == "failed":
                print(f"arena: {t.name} failed: {records[t.name]['error']} (traceback: trials/{t.name}.error.txt)")
    _write_arena(folder, arena, base, trials, records)
    board = leaderboard_for(folder)
    print("\n" + format_leaderboard(board))
    failed = [n for n, r in records.items() if r.get("status") == "failed"]
    if failed:
        print(f"\n{len(failed)} trial(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return folder


def _load_records(folder: Path) -> dict:
    p = folder / "arena.json"
    if not p.is_file():
        return {}
    try:
        return {t["name"]: {k: t.get(k) for k in ("status", "error", "seconds")} for t in json.loads(
            p.read_text(encoding="utf-8")).get("trials", [])}
    except (ValueError, KeyError, TypeError):
        return {}


def _write_arena(folder: Path, arena: ArenaSection, base: dict, trials: list[Trial], records: dict) -> None:
    from ..configtools import to_dict
    from ..scoring import write_json_atomic

    rows = [{**t.record(), "status": "pending", "error": None, **records.get(t.name, {})} for t in trials]
    write_json_atomic(folder / "arena.json", {"name": arena.name, "arena": to_dict(arena), "config": base,
                                              "trials": rows})


def leaderboard_for(folder: str | Path) -> dict:
    """Read an arena folder's trials and write leaderboard.json next to arena.json."""
    from ..rewinding import run_points
    from ..scoring import write_json_atomic

    folder = Path(folder)
    meta = json.loads((folder / "arena.json").read_text(encoding="utf-8"))
    arena = meta.get("arena", {})
    results = []
    for t in meta["trials"]:
        d = folder / t["run_dir"]
        if t.get("status") != "done" or not (d / "trajectory.jsonl").is_file():
            continue
        try:
            points, task, ret = run_points(d, arena.get("task") or None, arena.get("retention") or None)
        except SftlabError:
            continue
        results.append(TrialResult(t["name"], t["method"], t["budget"], t["lr"], t["seed"], points,
                                   t.get("trainable_params", 0), _run_stats(d, t.get("seconds"))))
    board = build_leaderboard(results, arena.get("lr_rule", "hypervolume"), arena.get("task", ""),
                              arena.get("retention", ""))
    write_json_atomic(folder / "leaderboard.json", board)
    return board


def _run_stats(d: Path, seconds) -> dict:
    """Mean tokens/s (first step excluded: warm-up), peak memory, wall time of the trial."""
    rows = []
    p = d / "metrics.jsonl"
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "tokens_per_s" in r:
            rows.append(r)
    steady = rows[1:] or rows
    tps = sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else float("nan")
    peak = max((r.get("peak_mem_mb", 0) for r in rows), default=float("nan"))
    return {"tokens_per_s": tps, "peak_mem_mb": peak, "wall_s": seconds if seconds is not None else float("nan")}
