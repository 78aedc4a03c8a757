"""Checkpoints: trajectory weights (atomic, hashed) and one rolling resume state.

A trajectory checkpoint is written to a temporary folder and renamed when complete, then recorded
in trajectory.jsonl with its sha256; a folder without a trajectory line is not a checkpoint.
Trajectory checkpoints hold weights only (PEFT adapter or HF safetensors). The resume state
(trainable weights, optimizer, scheduler, RNG, data position) is a single rolling folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..objectives import unwrap

RESUME = "resume"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def hash_files(folder: Path) -> str:
    """sha256 over the weight files of a checkpoint folder (names and contents, sorted)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".json") and p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def save_weights(model, peft: bool, folder: Path) -> None:
    """Weights only: a PEFT adapter folder, or a full HF safetensors model folder."""
    inner = getattr(model, "module", model)  # DDP
    if peft:
        inner.save_pretrained(str(folder), safe_serialization=True)
    else:
        unwrap(inner).save_pretrained(str(folder), safe_serialization=True)


def write_checkpoint(run_dir: Path, step: int, model, peft: bool, extra: dict | None = None,
                     before_rename=None) -> dict:
    """Write checkpoints/step-N atomically and append its line to trajectory.jsonl."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(model, peft, tmp)
        _fsync_tree(tmp)
        digest = hash_files(tmp)
        if before_rename is not None:  # test hook: a moment where the checkpoint is half-done
            before_rename(tmp)
        if final.exists():  # a rerun of a step after resume: replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = {"step": step, "path": str(final.relative_to(run_dir)), "sha256": digest, "time": time.time(),
             **(extra or {})}
    with open(run_dir / "trajectory.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of a step-keyed JSONL file with step <= max_step (atomic rewrite; torn lines dropped)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if int(row.get("step", 0)) <= max_step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def read_trajectory(run_dir: Path) -> list[dict]:
    """Complete checkpoints in step order (the last line per step wins; torn lines are ignored)."""
    path = Path(run_dir) / "trajectory.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        prev = by_step.get(entry["step"], {})
        merged = {**prev, **entry}
        if "scores" in prev or "scores" in entry:  # score lines add to a checkpoint's scores, by name
            merged["scores"] = {**prev.get("scores", {}), **entry.get("scores", {})}
        by_step[entry["step"]] = merged
    return [by_step[s] for s in sorted(by_step)]


def trainable_state(model) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {n: p.detach().contiguous().clone() for n, p in inner.named_parameters() if p.requires_grad}


def save_resume(run_dir: Path, model, optimizer, scheduler, position: dict) -> None:
    """Replace the rolling resume folder atomically: write new, swap, then delete old."""
    final = run_dir / RESUME
    tmp = run_dir / f".tmp-{RESUME}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps({**position, "python_rng": _py_rng_state()}))
        _fsync_tree(tmp)
        old = run_dir / f".old-{RESUME}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_resume(run_dir: Path) -> Path | None:
    """The complete resume folder; a crash between the two renames leaves it under .old-resume."""
    for name in (RESUME, f".old-{RESUME}"):
        p = run_dir / name
        if (p / "position.json").is_file() and (p / "state.pt").is_file():
            return p
    return None


def load_resume(folder: Path, model, optimizer, scheduler) -> dict:
    inner = getattr(model, "module", model)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(inner.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{folder}: resume state lacks {missing[:3]}...; was the config changed since?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = torch.load(folder / "state.pt", weights_only=True)  # never unpickle arbitrary objects
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    position = json.loads((folder / "position.json").read_text())
    _set_py_rng_state(position.pop("python_rng"))
    return position


def _py_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_rng_state(s) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))
