"""Paths from configs, data and run files cannot make sftlab write outside the run or output folder the
user named, or the cache root.

A Python audit hook records every file-system write (open for writing, mkdir, rename/replace, remove,
rmtree) while sftlab trains, resumes over a tampered trajectory.jsonl and exports; every one must fall
under the output folder, the export folder or the cache root. (Writes made inside C extensions, e.g.
safetensors, go into folders whose creation the hook did see.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.cli import main
from sftlab.config import RunSection
from sftlab.configtools import ConfigError

WRITES: list[str] = []
ACTIVE: list[bool] = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# event -> [(index of a path argument, index of its dir_fd argument or None)]
EVENTS = {"os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)],
          "shutil.rmtree": [(0, 1)], "os.truncate": [(0, None)], "os.symlink": [(1, 2)], "os.link": [(1, 3)],
          "os.chmod": [(0, 2)]}


def _resolve(path, dir_fd) -> str:
    path = os.fsdecode(path)
    if isinstance(dir_fd, int) and not os.path.isabs(path):  # rmtree removes entries relative to a dir fd
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def _audit(event: str, args) -> None:
    if not ACTIVE:
        return
    if event == "open":
        path, mode, flags = (list(args) + [None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        paths = [(path, None)] if writing else []
    elif event in EVENTS:
        paths = [(args[i], args[j] if j is not None and j < len(args) else None)
                 for i, j in EVENTS[event] if i < len(args)]
    else:
        return
    for p, dir_fd in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            WRITES.append(("mkdir" if event == "os.mkdir" else "write", _resolve(p, dir_fd)))


sys.addaudithook(_audit)  # hooks cannot be removed; ACTIVE keeps it silent outside this test


@pytest.mark.parametrize("name", ["../../etc", "/etc/cron.d", "..", ".", "a/../../b", "..\\..\\x", "x\0y", ""])
def test_run_names_that_leave_the_output_folder_are_refused(name):
    with pytest.raises(ConfigError, match=r"^run\.name: .*put the parent folder in run\.output_dir"):
        RunSection(name=name)


def test_train_resume_and_export_write_only_where_the_user_said(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cwd, out, export, cache = tmp_path / "cwd", tmp_path / "out", tmp_path / "export", tmp_path / "cache"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SFTLAB_CACHE", str(cache))
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    cfg = {"run": {"name": "r", "output_dir": str(out)}, "model": {"path": str(tiny_model_dir)},
           "data": {"train": [{"path": str(data)}], "max_length": 64, "eval_fraction": 0.25},
           "train": {"steps": 2, "batch_size": 2, "eval_every": 1, "threads": 1},
           "checkpoint": {"every": 1}, "logging": {"progress": False, "tensorboard": True},
           "probes": [{"name": "heldout_loss", "path": str(data)}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = out / "r"
    WRITES.clear()
    ACTIVE.append(True)
    try:
        assert main(["train", str(path)]) == 0
        # a tampered trajectory line pointing outside the run must not lead anywhere on resume
        with open(run / "trajectory.jsonl", "a") as f:
            f.write(json.dumps({"step": 1, "path": "../../../escape", "sha256": "0" * 64}) + "\n")
        assert main(["train", str(path), "train.steps=3", "--resume"]) == 0
        assert main(["export", str(run), "-o", str(export)]) == 0
    finally:
        ACTIVE.clear()
    captured = capsys.readouterr()
    assert "error" not in captured.err, captured.err
    # Allowed: the output folder, the export folder and its staging sibling (.tmp-export, renamed into place
    # when complete, so a failed export leaves no half-written folder), the cache root; mkdir of a folder
    # above them (`mkdir -p` of the path the user gave, a no-op where it exists); /dev/null.
    roots = [str(out), str(export), str(export.with_name(".tmp-" + export.name)), str(cache)]

    def allowed(kind, w):
        return (any(w == r or w.startswith(r + os.sep) for r in roots) or w == os.devnull or "__pycache__" in w
                or (kind == "mkdir" and any(r.startswith(w + os.sep) for r in roots)))

    outside = sorted({w for kind, w in WRITES if not allowed(kind, w)})
    assert outside == [], "\n".join(outside)
    assert any(w.startswith(str(run / "checkpoints")) for _, w in WRITES)  # the hook did see the writes
    assert not (tmp_path / "escape").exists() and not Path("/escape").exists()
    assert (export / "adapter_model.safetensors").is_file()
