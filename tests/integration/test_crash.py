"""SIGKILL at random moments: every completed result survives, --resume continues, and the final weights
equal an uninterrupted run's.

One run chain on a tiny model with everything that carries hidden state (dropout, shuffled epochs,
gradient accumulation, a cosine schedule) is killed 10 times at seeded random moments while it trains
(one kill is made certain to land inside a checkpoint write with the test-only pause
SFTLAB_TEST_PAUSE_CHECKPOINT). After each kill: trajectory.jsonl lists only complete checkpoints whose
sha256 matches, the resume state is loadable, the stale lock is reported with the command that clears it.
Then the chain runs to the end with `python -m sftlab.cli train --resume` and is compared with an
uninterrupted run, checkpoint by checkpoint.

Each training is a real process killed with SIGKILL. To keep 12 processes affordable on 2 cores, they are
forked from one "zygote" process that has already imported torch and transformers (~6 s of CPU each
otherwise); the child then runs `sftlab.cli.main(argv)` exactly as the console script does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, memorisable_chats, write_jsonl
import sftlab.train.loop  # noqa: F401  (import torch/transformers now, not first under capsys in a test)
from sftlab.cli import main
from sftlab.train.checkpoint import PAUSE_ENV, find_resume, hash_files, read_trajectory

pytestmark = pytest.mark.slow

STEPS, EVERY, KILLS, PAUSED_TRIAL = 36, 2, 10, 4

ZYGOTE = r"""
import json, os, sys, traceback
import torch, transformers, peft  # the slow imports, paid once
import sftlab.cli, sftlab.train.loop
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout.reconfigure(line_buffering=True)
                os.environ.update(req["env"])
                rc = sftlab.cli.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def start(self, argv: list[str], log: Path, env: dict | None = None) -> int:
        log.touch()  # the child truncates it; readers may look before the child opened it
        return self._ask({"op": "run", "argv": argv, "log": str(log), "env": env or {}})["pid"]

    def wait(self, pid: int) -> dict:
        return self._ask({"op": "wait", "pid": pid})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def wait_for(cond, timeout: float, what: str, log: Path | None = None):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log:\n{log.read_text()}" if log else ""))


def last_metric_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for ln in lines:
        try:
            steps.append(json.loads(ln)["step"])
        except (ValueError, KeyError):
            pass  # a torn last line
    return max(steps, default=0)


def check_after_kill(run: Path) -> dict:
    """What must hold at any moment a training can die. Returns counts for the report."""
    entries = read_trajectory(run)
    recorded = {Path(e["path"]).name for e in entries}
    for e in entries:
        assert (run / e["path"]).is_dir(), f"trajectory lists {e['path']}, which does not exist"
        assert hash_files(run / e["path"]) == e["sha256"], f"{e['path']}: sha256 does not match trajectory.jsonl"
    folders = [p for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").is_dir() else []
    stray = [p.name for p in folders if p.name not in recorded]
    # Unrecorded folders are not checkpoints: temp folders of the killed writer, or at most one step folder
    # renamed in the instant before its line was appended (resume removes both).
    assert all(n.startswith(".tmp-") for n in stray) or len([n for n in stray if not n.startswith(".")]) <= 1, stray
    resume = find_resume(run)
    if resume is not None:
        import torch
        from safetensors.torch import load_file

        pos = json.loads((resume / "position.json").read_text())
        assert pos["step"] % EVERY == 0
        load_file(str(resume / "trainable.safetensors"))
        torch.load(resume / "state.pt", weights_only=True)
    return {"in_checkpoint_write": any(n.startswith(".tmp-") for n in stray) or bool(list(run.glob(".tmp-*")))}


def stale_lock_is_reported_then_cleared(cfg: Path, run: Path, capsys):
    lock = run / ".lock"
    assert lock.exists(), "a SIGKILLed training cannot remove its lock"
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stale lock" in err and f"rm {lock}" in err, err
    os.remove(err.split("rm ", 1)[1].strip())  # do what the message says


def write_config(tmp: Path, model_dir: Path, name: str) -> Path:
    data = write_jsonl(tmp / "chats.jsonl", memorisable_chats(12))  # 3 steps per epoch: 12 shuffled epochs
    cfg = {"run": {"name": name, "output_dir": str(tmp / "runs"), "seed": 3},
           "model": {"path": str(model_dir)}, "method": {"name": "lora", "r": 4, "dropout": 0.1},
           "data": {"train": [{"path": str(data)}], "max_length": 64},
           "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "schedule": "cosine",
                     "warmup": 2, "threads": 1},
           "checkpoint": {"every": EVERY}, "logging": {"progress": False, "tensorboard": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def adapter(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"))


def kill_once(zygote: Zygote, cfg: Path, run: Path, trial: int, target: int, rng: random.Random, capsys) -> bool:
    """Start (or resume) the chain, SIGKILL it at a random moment, check what it left. True when the kill
    left a checkpoint or resume write half-done."""
    log = cfg.parent / f"trial-{trial}.log"
    argv = ["train", str(cfg)] + (["--resume"] if trial else [])
    paused = trial == PAUSED_TRIAL
    pid = zygote.start(argv, log, {PAUSE_ENV: "60"} if paused else {})
    # the loop has started (after the resume truncated old metrics lines)
    wait_for(lambda: "trainable of" in log.read_text(), 120, "training to start", log)
    if paused:
        line = wait_for(lambda: [ln for ln in log.read_text().splitlines() if "paused before rename" in ln],
                        120, "the checkpoint pause", log)[0]
        tmp_ckpt = Path(line.split(": ", 2)[2])
        assert (tmp_ckpt / "adapter_model.safetensors").is_file()  # written, not yet renamed
    else:
        if trial == 0:  # a second training into the same run directory is refused while this one runs
            capsys.readouterr()
            assert main(["train", str(cfg), "--resume"]) == 2
            assert f"another training (pid {pid})" in capsys.readouterr().err
        wait_for(lambda: last_metric_step(run) >= target, 120, f"step {target}", log)
        time.sleep(rng.uniform(0.0, 0.25))  # somewhere in the next step(s): compute, checkpoint, resume
    os.kill(pid, signal.SIGKILL)
    status = zygote.wait(pid)
    assert status["signal"] == signal.SIGKILL, (status, log.read_text())
    found = check_after_kill(run)
    print(f"kill {trial}: after step {last_metric_step(run)} (target {target}); inside a checkpoint or "
          f"resume write: {found['in_checkpoint_write']}", file=sys.__stderr__)  # capsys holds stdout
    if paused:  # the half-written checkpoint is not a checkpoint
        step = tmp_ckpt.name.removeprefix(".tmp-").rsplit("-", 1)[0]
        assert tmp_ckpt.exists() and not (run / "checkpoints" / step).exists()
        assert step not in [Path(e["path"]).name for e in read_trajectory(run)]
    stale_lock_is_reported_then_cleared(cfg, run, capsys)
    return found["in_checkpoint_write"]


def assert_same_as_reference(run: Path, ref: Path) -> None:
    entries, ref_entries = read_trajectory(run), read_trajectory(ref)
    assert [e["step"] for e in entries] == list(range(EVERY, STEPS + 1, EVERY))
    for e in entries:
        assert hash_files(run / e["path"]) == e["sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(Path(e["path"]).name for e in entries)
    assert not list(run.glob(".tmp-*")) and not (run / ".lock").exists()
    a, b = adapter(ref, STEPS), adapter(run, STEPS)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"final weights differ from the uninterrupted run by {diff:.2e}"
    # stronger: the whole path is the same, checkpoint by checkpoint
    assert [e["sha256"] for e in entries] == [e["sha256"] for e in ref_entries]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, capsys):
    model_dir = build_tiny_model(tmp_path / "model", dropout=0.1)
    rng = random.Random(20240607)
    zygote = Zygote()
    try:
        ref_cfg = write_config(tmp_path, model_dir, "reference")
        pid = zygote.start(["train", str(ref_cfg)], tmp_path / "reference.log")
        assert zygote.wait(pid)["rc"] == 0, (tmp_path / "reference.log").read_text()
        cfg = write_config(tmp_path, model_dir, "chain")
        run = tmp_path / "runs" / "chain"
        targets = sorted(rng.sample(range(2, STEPS - 2), KILLS))  # the step after which each kill comes
        mid_write = sum(kill_once(zygote, cfg, run, trial, target, rng, capsys)
                        for trial, target in enumerate(targets))
        assert mid_write >= 1
    finally:
        zygote.close()
    # the real console entry point finishes the run
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(cfg), "--resume"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert_same_as_reference(run, tmp_path / "runs" / "reference")
