"""The run directory: config, provenance, lock. Everything downstream reads it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..errors import SftlabError
from ..models import file_sha256
from ..rundir_format import PROVENANCE, format_fields

PACKAGES = ("sftlab", "torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "gguf")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def sftlab_commit() -> str | None:
    src = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # a huge work tree must not stop a training run
        return out.stdout.strip() + "+unknown"
    return out.stdout.strip() + ("+dirty" if dirty else "")


def data_hashes(sources) -> list[dict]:
    rows = []
    for s in sources:
        p = Path(s.path)
        rows.append({"path": s.path, "sha256": file_sha256(p) if p.is_file() else None,
                     "kind": "file" if p.is_file() else "datasets"})
    return rows


def write_provenance(run_dir: Path, cfg, model_ref, data_stats: dict, params: dict | None = None) -> None:
    """`params`: trainable_params, total_params, trainable_share of the method-wrapped model."""
    prov = {
        **format_fields(),  # the run-directory format its lines follow (sftlab.rundir_format)
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config_hash": cfg.hash(),
        "base_model": model_ref.identity(),
        "packages": package_versions(),
        "sftlab_commit": sftlab_commit(),
        **(params or {}),
        "data": {"train": data_hashes(cfg.data.train), "eval": data_hashes(cfg.data.eval), **data_stats},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    (run_dir / PROVENANCE).write_text(json.dumps(prov, indent=2))


def write_config(run_dir: Path, cfg) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def write_error(run_dir: Path, message: str) -> None:
    """Bad input: the run directory holds nothing but the error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(message + "\n")


def check_fresh(run_dir: Path, resume: bool) -> None:
    if resume:
        if not run_dir.is_dir():
            raise SftlabError(f"{run_dir}: nothing to resume (no such run); drop --resume to start it")
        return
    if run_dir.exists() and any(p.name != "error.txt" for p in run_dir.iterdir()):
        raise SftlabError(f"{run_dir}: run directory already exists; pass --resume to continue it, or pick "
                          "another run.name")


class RunLock:
    """One training per run directory. A lock left by a killed process is reported, not silently taken."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = self._owner()
            if pid is not None and _alive(pid):
                raise SftlabError(f"{self.path.parent}: another training (pid {pid}) is using this run "
                                  "directory; wait for it or pick another run.name") from None
            raise SftlabError(f"{self.path.parent}: stale lock from a process that is gone (pid {pid}); if no "
                              f"training is running, remove it with: rm {self.path}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "time": time.time()}))
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _owner(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Changing these does not change what the resumed steps compute.
RESUME_MAY_CHANGE = ("train.steps", "train.epochs", "train.eval_every", "train.log_every", "train.threads",
                     "train.max_bad_steps", "logging.", "checkpoint.")


def check_resume_config(run_dir: Path, cfg) -> None:
    """--resume must continue the same computation: refuse a config that changes it."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    raw = yaml.safe_load(path.read_text()) or {}
    try:  # read with today's fields: one added since the run started takes its default, not "changed"
        from ..config import config_from_dict

        old = _flatten(config_from_dict(raw).to_dict())
    except Exception:  # a field since removed or renamed: compare the file as written
        old = _flatten(raw)
    new = _flatten(cfg.to_dict())
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        raise SftlabError(f"{run_dir}: --resume with a changed config ({', '.join(changed[:5])}); the resumed "
                          f"steps would not continue the same run. Resume with its own config: sftlab train {path} "
                          "--resume (train.steps may be raised)")
