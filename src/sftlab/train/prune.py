"""checkpoint.keep: frontier - delete the weights of trajectory checkpoints the probes show are dominated.

After each scored checkpoint, the scored points (task x retention, as `sftlab frontier` reads them) are split
into the Pareto frontier and the dominated rest. A dominated checkpoint's folder is deleted; never a frontier
point, never the checkpoint the run's `select:` rule picks, never the latest (its successors are not scored
yet), never an unscored one, never step 0 (the base, no folder) and never the rolling resume state (resume/, a
folder of its own). Domination is monotone along a run: a point dominated now stays dominated by some frontier
point, so nothing deleted would have been wanted later. Scores stay: the point is still on the plane (its line
says `"pruned": true` and its `path` is null), only its weights are gone. With a disk budget
(checkpoint.disk_budget_mb), dominated checkpoints are deleted only while the checkpoints exceed it, oldest first.

Crash consistency, the invariant every reader relies on: a trajectory entry with a `path` has its complete
folder. So the order is (1) append the pruned line (the entry no longer names a folder), (2) rename the folder to
checkpoints/.pruned-step-N, (3) delete it. A kill after (1) or (2) leaves a folder no entry names, which the next
prune (or `--resume`'s clean-up) removes; never an entry naming a missing or half-deleted folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..faults import fault
from ..rundir_format import TRAJECTORY, append_line, read_trajectory
from ..trajectory import pareto_front, select, select_params

PREFIX = ".pruned-"


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def sweep(run_dir: Path) -> list[str]:
    """Remove what an interrupted prune left: .pruned-* folders, and folders of entries marked pruned."""
    ckpts = run_dir / "checkpoints"
    removed = []
    pruned = {Path(e["pruned_path"]).name for e in read_trajectory(run_dir) if e.get("pruned") and not e.get("path")
              and e.get("pruned_path")}
    for p in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if p.name.startswith(PREFIX) or p.name in pruned:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def candidates(run_dir: Path, select_rule: dict | None) -> tuple[list[dict], set[int]]:
    """(dominated checkpoint entries that may go, oldest first; the steps that must stay)."""
    from ..rewinding import run_points

    entries = read_trajectory(run_dir)
    with_folder = [e for e in entries if e.get("path")]
    if not with_folder:
        return [], set()
    try:
        points, _, _ = run_points(run_dir)
    except Exception:  # no task or retention score yet: nothing is known to be dominated
        return [], set()
    keep = {p.step for p in pareto_front(points)} | {0, max(e["step"] for e in with_folder)}
    if points:
        keep.add(select(points, **select_params(select_rule)).point.step)
    scored = {p.step for p in points}
    return [e for e in with_folder if e["step"] in scored and e["step"] not in keep], keep


def prune(run_dir: str | Path, select_rule: dict | None = None, budget_mb: float = 0.0) -> list[int]:
    """Delete dominated checkpoints (all of them, or with a budget only while over it); the steps deleted."""
    run_dir = Path(run_dir)
    sweep(run_dir)
    doomed, _ = candidates(run_dir, select_rule)
    if budget_mb > 0:
        sizes = {e["step"]: _size_mb(run_dir / e["path"]) for e in read_trajectory(run_dir) if e.get("path")}
        total, chosen = sum(sizes.values()), []
        for e in doomed:  # oldest first
            if total <= budget_mb:
                break
            chosen.append(e)
            total -= sizes[e["step"]]
        doomed = chosen
    done = []
    for e in doomed:
        delete_checkpoint(run_dir, e)
        done.append(e["step"])
    return done


def delete_checkpoint(run_dir: Path, entry: dict) -> None:
    step, folder = entry["step"], run_dir / entry["path"]
    append_line(run_dir / TRAJECTORY, {"step": step, "path": None, "pruned": True, "pruned_path": entry["path"]})
    fault("prune_line", step)
    gone = folder.with_name(PREFIX + folder.name)
    os.replace(folder, gone)
    files = sorted(f for f in gone.rglob("*") if f.is_file())
    if files:  # the middle of a deletion: some files gone, some not
        files[0].unlink()
    fault("prune_delete", step)
    shutil.rmtree(gone, ignore_errors=True)
