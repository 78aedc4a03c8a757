"""A full disk or an unwritable folder while writing a checkpoint: one clear error naming the folder and
the free space, no partial checkpoint left as if complete, the lock released, and --resume goes on.

ENOSPC is simulated by monkeypatching the writers (always runs); where this process may mount a small
tmpfs (root in a privileged container), a real full disk is tried too.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from conftest import memorisable_chats, tiny_config, write_jsonl
from sftlab.errors import SftlabError
from sftlab.train import checkpoint as ckpt
from sftlab.train.checkpoint import append_jsonl, hash_files, read_trajectory
from sftlab.train.loop import Trainer


def config(tmp_path, model_dir, out=None, method=None, steps=6):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(12))
    return tiny_config(tmp_path, model_dir, data, method=method,
                       run={"name": "run", "output_dir": str(out or tmp_path / "runs")},
                       train={"steps": steps, "batch_size": 4, "threads": 1}, checkpoint={"every": 2})


def failing_at(step: int, error: BaseException, real=ckpt.save_weights):
    """save_weights that writes half a checkpoint at `step`, then fails like a full disk."""

    def save(model, peft, folder, *rest, **kw):
        if folder.name.startswith(f".tmp-step-{step:06d}"):
            (folder / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # a torn file
            raise error
        real(model, peft, folder, *rest, **kw)

    return save


def assert_only_complete_checkpoints(run, steps):
    entries = read_trajectory(run)
    assert [e["step"] for e in entries] == steps
    for e in entries:
        assert hash_files(run / e["path"]) == e["sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in steps]
    assert not list(run.glob(".tmp-*")) and not (run / ".lock").exists()


def assert_one_clear_line(msg, folder):
    assert "\n" not in msg
    assert msg.startswith(f"{folder}: cannot write ")
    assert "MiB free there" in msg and "nothing partial was kept" in msg
    assert "config.yaml --resume" in msg


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    ckpt.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors"])
def test_disk_full_during_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch, error):
    cfg = config(tmp_path, tiny_model_dir)
    monkeypatch.setattr(ckpt, "save_weights", failing_at(4, error))
    with pytest.raises(SftlabError) as e:
        Trainer(cfg).run()
    msg = str(e.value)
    assert_one_clear_line(msg, cfg.run_dir / "checkpoints")
    assert "checkpoint step-000004" in msg and "No space left on device" in msg
    assert_only_complete_checkpoints(cfg.run_dir, [2])
    monkeypatch.undo()  # space freed: the run goes on from its last resume state
    Trainer(cfg, resume=True).run()
    assert_only_complete_checkpoints(cfg.run_dir, [2, 4, 6])


def test_disk_full_during_the_resume_state_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch):
    cfg = config(tmp_path, tiny_model_dir)
    real = ckpt.torch.save
    calls = []

    def save(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # the resume state of step 4; torch reports a full disk like this
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(SftlabError) as e:
        Trainer(cfg).run()
    assert_one_clear_line(str(e.value), cfg.run_dir)
    assert "the resume state (torch.save failed" in str(e.value)
    assert ckpt.find_resume(cfg.run_dir) == cfg.run_dir / "resume"
    assert '"step": 2' in (cfg.run_dir / "resume" / "position.json").read_text()
    assert not list(cfg.run_dir.glob(".tmp-*"))


def test_unwritable_checkpoint_folder_simulated(tmp_path, tiny_model_dir, monkeypatch):
    """Permission denied where the checkpoint goes (simulated, so it also runs as root)."""
    cfg = config(tmp_path, tiny_model_dir)
    real_mkdir = type(tmp_path).mkdir

    def mkdir(self, *a, **kw):
        if self.name.startswith(".tmp-step-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir)
    with pytest.raises(SftlabError) as e:
        Trainer(cfg).run()
    assert_one_clear_line(str(e.value), cfg.run_dir / "checkpoints")
    assert "Permission denied" in str(e.value)
    assert not (cfg.run_dir / "trajectory.jsonl").exists() and not (cfg.run_dir / ".lock").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod does not stop root from writing (the simulated variant covers it)")
def test_unwritable_checkpoint_folder_by_chmod(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    folder = cfg.run_dir / "checkpoints"

    def lock_folder(trainer):
        folder.mkdir(parents=True)
        folder.chmod(0o500)

    try:
        with pytest.raises(SftlabError) as e:
            Trainer(cfg, hooks={"after_setup": lock_folder}).run()
        assert_one_clear_line(str(e.value), folder)
        assert "Permission denied" in str(e.value) and list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_append_closes_a_torn_line_and_rolls_back_a_failed_one(tmp_path, monkeypatch):
    path = tmp_path / "trajectory.jsonl"
    path.write_text('{"step": 2, "path": "checkpoints/step-000002", "sha256": "x"}\n{"step": 4, "pa')  # torn
    append_jsonl(path, {"step": 6, "path": "checkpoints/step-000006", "sha256": "y"})
    assert [e["step"] for e in read_trajectory(tmp_path)] == [2, 6]
    before = path.read_bytes()

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(OSError):
        append_jsonl(path, {"step": 8})
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    assert path.read_bytes() == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB filesystem, where this process may mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root in a privileged container)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_really_full_disk(tmp_path, tiny_model_dir, small_disk):
    """Full fine-tuning of the tiny model writes ~13 MB per checkpoint: it cannot fit in 8 MiB."""
    cfg = config(tmp_path, tiny_model_dir, out=small_disk, method={"name": "full"}, steps=2)
    with pytest.raises(SftlabError) as e:
        Trainer(cfg).run()
    assert_one_clear_line(str(e.value), cfg.run_dir / "checkpoints")
    assert "No space left on device" in str(e.value)
    assert not (cfg.run_dir / "trajectory.jsonl").exists()
    assert list((cfg.run_dir / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("where", ["metrics", "scores"])
def test_disk_full_writing_metrics_or_scores(tmp_path, tiny_model_dir, monkeypatch, where):
    """metrics.jsonl and the scores lines of trajectory.jsonl: a full disk stops the run with one clear line
    (not a raw OSError), nothing torn is left, and --resume goes on once there is space."""
    import sftlab.train.checkpoint as ck

    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(12))
    probes = [{"name": "heldout_loss", "path": str(data), "limit": 4}] if where == "scores" else []
    cfg = tiny_config(tmp_path, tiny_model_dir, data, run={"name": "run", "output_dir": str(tmp_path / "runs")},
                      train={"steps": 6, "batch_size": 4, "threads": 1}, checkpoint={"every": 2}, probes=probes)
    target = "metrics.jsonl" if where == "metrics" else "trajectory.jsonl"
    real = ck.append_jsonl

    def full(path, row, durable=True):
        if path.name == target and (row.get("step") == 3 if where == "metrics" else
                                    row.get("step") == 4 and "scores" in row):
            with open(path, "ab") as f:
                f.write(b'{"step": 3, "lo')  # what a full disk leaves: part of a line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, row, durable)

    monkeypatch.setattr(ck, "append_jsonl", full)
    with pytest.raises(SftlabError) as e:
        Trainer(cfg).run()
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "MiB free there" in msg
    assert (target if where == "metrics" else "scores of step 4") in msg and "--resume" in msg
    assert not (cfg.run_dir / ".lock").exists()
    monkeypatch.undo()
    Trainer(cfg, resume=True).run()
    entries = read_trajectory(cfg.run_dir)
    assert [e["step"] for e in entries if "path" in e] == [2, 4, 6]
    if where == "scores":  # the step whose scores failed is scored again on resume: every step has them
        assert [e["step"] for e in entries if "heldout_loss" in e.get("scores", {})] == [0, 2, 4, 6]
    for line in (cfg.run_dir / target).read_text().splitlines():  # resume dropped the torn line
        json.loads(line)


# ---- exports: `sftlab export` into a full disk or an unwritable folder ------------------------------------

def _error_line(stderr: str) -> str:
    """The one error line (transformers' loading bars may come before it; a traceback may not)."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _trained_run(tmp_path, model_dir, method=None):
    cfg = config(tmp_path, model_dir, method=method, steps=4)
    Trainer(cfg).run()
    return cfg.run_dir


@pytest.mark.parametrize("merge,error", [
    (False, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    (True, ckpt.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    (False, PermissionError(errno.EACCES, os.strerror(errno.EACCES))),
], ids=["adapter-enospc", "merged-enospc", "adapter-eacces"])
def test_export_into_a_full_disk_or_unwritable_folder(tmp_path, tiny_model_dir, monkeypatch, capsys, merge, error):
    """One line naming the folder and what to do; no output folder, no temp folder; the run's checkpoints are
    untouched; the same command works once there is space."""
    import sftlab.runs as runs
    from sftlab.cli import main

    run = _trained_run(tmp_path, tiny_model_dir)
    before = [(e["step"], hash_files(run / e["path"])) for e in read_trajectory(run)]
    real = runs.finish_export

    def failing(tmp, *a, **kw):
        (tmp / "model.safetensors").write_bytes(b"\0" * 100)  # what the failed write left
        raise error

    monkeypatch.setattr(runs, "finish_export", failing)
    out = tmp_path / "exported"
    argv = ["export", str(run), "-o", str(out)] + (["--merge"] if merge else [])
    capsys.readouterr()
    assert main(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith(f"error: {out}: cannot write the export"), err
    assert ("Permission denied" if isinstance(error, PermissionError) else "No space left on device") in err
    assert "MiB free there" in err and "nothing partial was kept" in err and "run the same command again" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    assert [(e["step"], hash_files(run / e["path"])) for e in read_trajectory(run)] == before
    monkeypatch.setattr(runs, "finish_export", real)
    assert main(argv) == 0 and (out / "sftlab_export.json").is_file()


def test_export_into_a_really_full_disk(tmp_path, tiny_model_dir, small_disk, capsys):
    """A merged export of the tiny model (~13 MB of weights) into a real 8 MiB filesystem."""
    from sftlab.cli import main

    run = _trained_run(tmp_path, tiny_model_dir)
    out = small_disk / "exported"
    capsys.readouterr()
    assert main(["export", str(run), "--merge", "-o", str(out)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "cannot write the export" in err and "No space left on device" in err, err
    assert not out.exists() and list(small_disk.iterdir()) == []
