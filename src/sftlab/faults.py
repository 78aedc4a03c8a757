"""Fault injection for crash tests: SIGKILL this process at a named point, deterministically.

    SFTLAB_FAULT=POINT[@N][,POINT[@N]...]

kills the process with SIGKILL (no cleanup, no `finally`, no atexit: what a power cut or the kernel's OOM
killer does to a process) the first time it reaches POINT, or when it reaches POINT at step N (for the
training points N is the optimizer step; for exports the checkpoint step; for a pipeline the number of
stages finished). Off by default, and free when off (one environment lookup at each point). For tests and
for people who want to see for themselves what a crash leaves behind; never set it in a real run.

A point "in the middle of writing a file" cannot stop a Rust or C writer half-way; the fault leaves on disk
exactly what such a kill leaves: the first half of the file's bytes (everything the writer had written
so far), then kills the process. `sftlab-fault: ...` goes to stderr first, so a test can tell an injected
kill from a real one.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FAULT_ENV = "SFTLAB_FAULT"

POINTS = {
    "after_update": "an optimizer update was applied; the step is neither logged nor checkpointed yet",
    "checkpoint_write": "half of a trajectory checkpoint's safetensors file is on disk (its temp folder)",
    "checkpoint_rename": "a trajectory checkpoint's files are complete and synced; not yet renamed",
    "checkpoint_line": "a trajectory checkpoint was renamed into place; its trajectory.jsonl line is not written",
    "resume_write": "half of the rolling resume state's weights file is on disk (its temp folder)",
    "resume_swap": "between the two renames that replace the resume state (the old one is .old-resume)",
    "export": "half of an exported folder's weights file is on disk (sftlab export)",
    "rewind_export": "half of an exported folder's weights file is on disk (an export at a rewind alpha)",
    "pipeline_stage": "a pipeline stage finished training; pipeline.json does not record it yet",
    "prune_line": "checkpoint.keep: frontier wrote a pruned line; the dominated checkpoint's folder is still there",
    "prune_delete": "checkpoint.keep: frontier is half-way through deleting a dominated checkpoint's folder",
    "dpo_reference": "half of the DPO reference cache file is on disk (its temp file)",
}


def _wanted(point: str, step: int | None) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name not in POINTS:
            raise ValueError(f"{FAULT_ENV}={spec!r}: unknown point {name!r}; known: {', '.join(POINTS)}")
        if name == point and (not at or (step is not None and int(at) == step)):
            return True
    return False


def fault(point: str, step: int | None = None, half_written: str | Path | None = None) -> None:
    """SIGKILL here when SFTLAB_FAULT asks for `point` (at `step`). `half_written`: a file that a writer killed
    at this moment would have left incomplete (a folder: its largest safetensors file); it is cut to half its
    bytes first."""
    assert point in POINTS, point
    if not _wanted(point, step):
        return
    if half_written is not None:
        path = Path(half_written)
        if path.is_dir():
            path = _weights_file(path)
            half_written = path
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
            f.flush()
            os.fsync(f.fileno())
    where = f" at step {step}" if step is not None else ""
    print(f"sftlab-fault: SIGKILL at {point}{where}" + (f" ({half_written} cut to half)" if half_written else ""),
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _weights_file(folder: Path) -> Path:
    """The largest safetensors file in a folder written by save_pretrained (the one a kill would tear)."""
    files = sorted(Path(folder).rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors file to tear")
    return files[-1]
