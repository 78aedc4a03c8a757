"""Run an arena: each trial a normal run directory under ARENA/trials/, then the leaderboard.

Shared work: the base model's probe outputs (the KL-to-base cache and the step-0 scores) live in the
cache root and are computed by the first trial that needs them; tokenized data is memoised in the
process (sftlab.data.prepare), so trials run here one after another tokenize once.

Rerunning is resuming: a trial whose run directory has the same config hash and a final scored
checkpoint is skipped; one interrupted part-way is resumed from its last checkpoint; one whose config
changed is moved aside (NAME.stale-TIME) and run again. A failed trial is recorded with its error
(and ARENA/trials/NAME.error.txt holds the traceback) and the others go on.

Each trial's own resources (sftlab.resources.Meter) go into its arena.json record: its peak resident
memory (the high-water mark is reset before the trial, so it is the process's baseline plus what the
trial added, not the largest trial so far), wall and CPU seconds; the leaderboard adds its tokens.
"""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

from ..errors import SftlabError
from ..resources import Meter, release_free_memory
from ..rundir_format import ARENA, LEADERBOARD, TRAJECTORY, read_arena, read_trajectory, step_metrics
from .leaderboard import TrialResult, build_leaderboard, format_leaderboard
from .plan import ArenaSection, Trial, arena_from_dict, load_arena, plan_trials, trial_hash, trials_table


def trial_state(trial: Trial) -> str:
    """'new' | 'done' | 'partial' (same config, not finished) | 'stale' (another config in the folder)."""
    from ..config import load_config

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
    scored = not scoring or any("scoring_seconds" in e for e in entries)  # merged: any line of a step carries it
    return "done" if final and scored else "partial"


def run_trial(trial: Trial, state: str) -> dict:
    """Train (or resume) one trial in this process; returns its record: status, error, and what the trial cost
    (seconds: wall, cpu_s, peak_mem_mb: resident peak in MB, start_mem_mb: the resident baseline it started
    from, peak_scope: "trial" or "process", peak_gpu_mb)."""
    from ..train.loop import Trainer

    d = trial.cfg.run_dir
    if state == "stale":
        aside = d.with_name(f"{d.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        d.rename(aside)
        print(f"arena: {trial.name}: its folder held another config; moved to {aside.name}")
    resume = state == "partial" and (d / "resume").is_dir()
    if state == "partial" and not resume:
        shutil.rmtree(d)  # stopped before its first checkpoint: nothing to keep
    _free_memory()  # what an earlier trial (or the planning) left behind is not this trial's
    meter, error = Meter().start(), None
    try:
        Trainer(trial.cfg, resume=resume).run()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed trial must not stop the others
        d.parent.mkdir(parents=True, exist_ok=True)
        (d.parent / f"{trial.name}.error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    finally:
        used = _usage(meter)
        _free_memory()
    if error:
        return {"status": "failed", "error": error, **used}
    return {"status": "done", "error": None, **used, "resumed": resume}


USAGE_KEYS = ("seconds", "cpu_s", "peak_mem_mb", "start_mem_mb", "peak_gpu_mb", "peak_scope")


def _usage(meter: Meter) -> dict:
    u = meter.stop()
    return {"seconds": round(u.pop("wall_s"), 1), **u}


def _free_memory() -> None:
    import gc

    gc.collect()
    release_free_memory()
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
            print(f"arena: {t.name}: {describe_usage(records[t.name])}", flush=True)
    _write_arena(folder, arena, base, trials, records)
    board = leaderboard_for(folder)
    print("\n" + format_leaderboard(board))
    failed = [n for n, r in records.items() if r.get("status") == "failed"]
    if failed:
        print(f"\n{len(failed)} trial(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return folder


def _load_records(folder: Path) -> dict:
    try:
        return {t["name"]: {k: t.get(k) for k in ("status", "error", *USAGE_KEYS) if k in t}
                for t in read_arena(folder)["trials"]}
    except (SftlabError, KeyError, TypeError):  # none yet, or unreadable: every trial starts as new
        return {}


def _write_arena(folder: Path, arena: ArenaSection, base: dict, trials: list[Trial], records: dict) -> None:
    from ..configtools import to_dict
    from ..scoring import write_json_atomic

    rows = [{**t.record(), "status": "pending", "error": None, **records.get(t.name, {})} for t in trials]
    write_json_atomic(folder / ARENA, {"name": arena.name, "arena": to_dict(arena), "config": base,
                                              "trials": rows})


def leaderboard_for(folder: str | Path) -> dict:
    """Read an arena folder's trials and write leaderboard.json next to arena.json."""
    from ..rewinding import run_points
    from ..scoring import write_json_atomic

    folder = Path(folder)
    meta = read_arena(folder)
    arena = meta.get("arena", {})
    results = []
    for t in meta["trials"]:
        d = folder / t["run_dir"]
        scored = folder / t.get("scores_dir", t["run_dir"])  # a remedy's own trajectory (ema: RUN/ema)
        if t.get("status") != "done" or not (scored / TRAJECTORY).is_file():
            continue
        try:
            points, task, ret = run_points(scored, arena.get("task") or None, arena.get("retention") or None)
        except SftlabError:
            continue
        if t.get("extra_points"):  # WiSE-FT: the final checkpoint moved towards the base, scored at each alpha
            points = points + interpolated_points(folder / t["extra_points"], task, ret)
        # the label keeps a quantized base apart (lora@nf4): its own row and frontier, like another method
        label = t.get("label") or t["method"]
        results.append(TrialResult(t["name"], label, t["budget"], t["lr"], t["seed"], points,
                                   t.get("trainable_params", 0), run_stats(d, t)))
    board = build_leaderboard(results, arena.get("lr_rule", "hypervolume"), arena.get("task", ""),
                              arena.get("retention", ""), (meta.get("config") or {}).get("select"))
    write_json_atomic(folder / LEADERBOARD, board)
    return board


def interpolated_points(path: Path, task: str, ret: str) -> list:
    """The points of a wise.json (remedies/wise.py) below alpha 1 (alpha 1 is the final checkpoint, already in)."""
    import json

    from ..trajectory import point_from_scores

    if not path.is_file():
        return []
    w = json.loads(path.read_text(encoding="utf-8"))
    return [point_from_scores(w["step"], p["scores"][task], p["scores"][ret], alpha=p["alpha"])
            for p in w.get("points", []) if p["alpha"] < 1 and task in p["scores"] and ret in p["scores"]]


def describe_usage(rec: dict) -> str:
    """One line: wall and CPU seconds, peak memory with its scope."""
    gpu = f", GPU peak {rec['peak_gpu_mb']:.0f} MB" if rec.get("peak_gpu_mb") is not None else ""
    scope = "" if rec.get("peak_scope") == "trial" else " (process-wide: the peak could not be reset per trial)"
    start = f" (resident at its start: {rec['start_mem_mb']:.0f} MB)" if rec.get("start_mem_mb") is not None else ""
    return (f"{rec.get('seconds', 0):.1f} s wall, {rec.get('cpu_s', 0):.1f} CPU s, peak resident memory "
            f"{rec.get('peak_mem_mb', 0):.0f} MB{start}{scope}{gpu}")


def run_stats(d: Path, record: dict) -> dict:
    """A trial's mean tokens/s (first step excluded: warm-up), tokens, peak memory, wall and CPU seconds.

    Peaks, wall and CPU seconds come from its arena.json record (measured around the trial); a record
    without them (written by an older sftlab) falls back to metrics.jsonl's peak, marked process-wide.
    Tokens: non-padding tokens of the logged steps (each step once, a resumed run's repeats not counted
    twice); trained_tokens: those with a label (the completion)."""
    rows = step_metrics(d)
    steady = rows[1:] or rows
    nan = float("nan")
    out = {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else nan,
           "tokens": sum(r.get("tokens", 0) for r in rows) if rows else nan,
           "trained_tokens": sum(r.get("trained_tokens", 0) for r in rows) if rows else nan,
           "wall_s": _finite(record.get("seconds")), "cpu_s": _finite(record.get("cpu_s"))}
    if record.get("peak_mem_mb") is not None:
        out.update(peak_mem_mb=record["peak_mem_mb"], peak_scope=record.get("peak_scope", "process"))
        if record.get("peak_gpu_mb") is not None:
            out["peak_gpu_mb"] = record["peak_gpu_mb"]
    else:
        out.update(peak_mem_mb=max((r.get("peak_mem_mb", 0) for r in rows), default=nan), peak_scope="process")
    return out


def _finite(v) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")
