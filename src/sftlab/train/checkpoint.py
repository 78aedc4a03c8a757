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
import pickle
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import tokens
from ..errors import SftlabError
from ..faults import fault
from ..objectives import unwrap
# the line formats and their reader live in sftlab.rundir_format (torch-free); the names stay importable here
from ..rundir_format import TRAJECTORY, read_trajectory
from ..rundir_format import append_line as append_jsonl
from ..rundir_format import truncate_lines as truncate_jsonl

RESUME = "resume"
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports ENOSPC/EACCES as its own error type


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def hash_files(folder: Path) -> str:
    """sha256 over the weight files of a checkpoint folder (relative names and contents, sorted), subfolders
    included (ADAPTER/tokens: the new-token rows of a non-LoRA adapter, tokens.py)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.suffix in (".safetensors", ".json") and p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
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
        if p.is_dir():
            _fsync_tree(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def save_weights(model, peft: bool, folder: Path, state: dict | None = None) -> None:
    """Weights only: a PEFT adapter folder, or a full HF safetensors model folder. `state`: the weights as full
    tensors when the model is sharded (FSDP; train/sharding.py), so the folder is the one one process writes."""
    inner = getattr(model, "module", model)  # DDP, FSDP
    kw = {} if state is None else {"state_dict": state}
    if peft:
        # No base matrices in an adapter: under an adapter they never change, and new-token rows are the
        # adapter's own trainable tokens (tokens.py). PEFT would otherwise save the whole resized embedding.
        inner.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False, **kw)
        _canonical_adapter_config(folder / "adapter_config.json")
        # a method without trainable tokens in its config (all but LoRA): the rows go to FOLDER/tokens
        if tokens.split_token_adapter(inner, folder):
            _canonical_adapter_config(folder / tokens.TOKEN_ADAPTER_DIR / "adapter_config.json")
    else:
        unwrap(inner).save_pretrained(str(folder), safe_serialization=True, **kw)


def _canonical_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes with each process's hash seed; sorted,
    the same weights give the same checkpoint sha256 in any process (a resumed run matches an uninterrupted one)."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def write_checkpoint(run_dir: Path, step: int, model, peft: bool, extra: dict | None = None,
                     before_rename=None, state: dict | None = None) -> dict:
    """Write checkpoints/step-N atomically and append its line to trajectory.jsonl.

    The folder appears only complete (rename), and the line only after it; a failed write (disk full,
    unwritable folder) leaves neither and raises a SftlabError that names the folder and the free space."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model, peft, tmp, state)
        fault("checkpoint_write", step, half_written=tmp)
        _fsync_tree(tmp)
        digest = hash_files(tmp)
        if before_rename is not None:  # test hook: a moment where the checkpoint is half-done
            before_rename(tmp)
        fault("checkpoint_rename", step)
        if final.exists():  # a rerun of a step after resume: replace the old copy (it has no line any more)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_error(final.parent, f"checkpoint {final.name}", e, run_dir) from e
        raise
    entry = {"step": step, "path": str(final.relative_to(run_dir)), "sha256": digest, "time": time.time(),
             **(extra or {})}
    fault("checkpoint_line", step)
    try:
        append_jsonl(run_dir / TRAJECTORY, entry)
    except OSError as e:  # no line, no checkpoint: do not leave a folder that looks complete
        shutil.rmtree(final, ignore_errors=True)
        raise write_error(run_dir, f"the trajectory line of {final.name}", e, run_dir) from e
    return entry


def write_error(folder: Path, what: str, e: BaseException, run_dir: Path, then: str = "") -> SftlabError:
    """One line: where, why (disk full, permission, ...), free space, and how to go on (`then`: the command to
    continue with; default: resume the run)."""
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    try:
        free = f"{shutil.disk_usage(folder if folder.exists() else run_dir.parent).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return SftlabError(f"{folder}: cannot write {what} ({reason}; {free} there); nothing partial was kept. Free "
                       "disk space or make the folder writable (or move run.output_dir), then continue with: "
                       + (then or f"sftlab train {run_dir / 'config.yaml'} --resume"))


def clean_incomplete(run_dir: Path, keep_until: int) -> list[str]:
    """Before a resumed run goes on from step `keep_until`: drop trajectory lines of later steps (those
    steps are trained again), then every folder that is not a recorded checkpoint (temp folders of a
    killed writer, a step folder renamed but never recorded, later steps). Lines go first, so a kill
    in between leaves extra folders, never a line without its folder. Returns the names removed."""
    truncate_jsonl(run_dir / TRAJECTORY, keep_until)
    recorded = {Path(e["path"]).name for e in read_trajectory(run_dir) if e.get("path")}  # pruned: path null
    removed = []
    for parent, pattern in ((run_dir / "checkpoints", "*"), (run_dir, ".tmp-*"), (run_dir, ".*.tmp")):
        for p in sorted(parent.glob(pattern)) if parent.is_dir() else []:
            if parent.name == "checkpoints" and p.name in recorded:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(run_dir)))
    return removed


def trainable_state(model) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {n: p.detach().contiguous().clone() for n, p in inner.named_parameters() if p.requires_grad}


def save_resume(run_dir: Path, model, optimizer, scheduler, position: dict, trainable: dict | None = None,
                optim_state: dict | None = None) -> None:
    """Replace the rolling resume folder atomically: write new, swap, then delete old. A sharded model passes
    its trainable weights and optimizer state gathered to full tensors (optimizer keyed by parameter name)."""
    final = run_dir / RESUME
    tmp = run_dir / f".tmp-{RESUME}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable if trainable is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
        fault("resume_write", position.get("step"), half_written=tmp / "trainable.safetensors")
        _torch_save({"optimizer": optim_state if optim_state is not None else optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                    tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps({**position, "python_rng": _py_rng_state()}))
        _fsync_tree(tmp)
        old = run_dir / f".old-{RESUME}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        fault("resume_swap", position.get("step"))
        os.replace(tmp, final)  # a crash before this leaves .old-resume, which find_resume falls back to
        _fsync_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_error(run_dir, "the resume state", e, run_dir) from e
        raise


def _torch_save(obj, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        # torch's zip writer reports a failed write (disk full, I/O error) as a RuntimeError without an
        # errno ("[enforce fail at inline_container.cc] unexpected pos ..."); it is a write error.
        raise OSError(f"torch.save failed: {str(e).strip().splitlines()[0]}") from e


def find_resume(run_dir: Path) -> Path | None:
    """The complete resume folder; a crash between the two renames leaves it under .old-resume."""
    for name in (RESUME, f".old-{RESUME}"):
        p = run_dir / name
        if (p / "position.json").is_file() and (p / "state.pt").is_file():
            return p
    return None


def load_resume(folder: Path, model, optimizer, scheduler) -> dict:
    from .sharding import is_sharded, load_optimizer, load_trainable

    inner = getattr(model, "module", model)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(inner.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{folder}: resume state lacks {missing[:3]}...; was the config changed since?")
    try:
        state = torch.load(folder / "state.pt", weights_only=True)  # never unpickle arbitrary objects
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise SftlabError(f"{folder / 'state.pt'}: refused to load the resume state ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); it is damaged or holds more than tensors. Resume "
                          f"from a copy you trust, or start the run again in a new folder") from None
    if is_sharded(model):  # each process keeps its shard of the full tensors
        load_trainable(model, weights)
        load_optimizer(model, optimizer, state["optimizer"])
    else:
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
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
