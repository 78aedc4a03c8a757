"""SIGKILL at named points (SFTLAB_FAULT, sftlab/faults.py): every completed result survives, nothing partial is
ever taken for complete, --resume continues, and the final weights equal an uninterrupted run's, bit for bit.

The kills come from inside the process at exact points, so no outcome depends on the machine's speed: a kill
"after step 13's update" lands after step 13's update on a fast machine and on a slow one.

Training: one run chain on a tiny model with everything that carries hidden state (dropout, shuffled epochs,
gradient accumulation, a cosine schedule) is killed at every training point, each at two or more steps (the
first kill before any resume state exists, the last one at the final step). After each kill: trajectory.jsonl
lists only complete checkpoints whose sha256 matches, the resume state is loadable, the half-written file the
point leaves is nowhere a reader looks, the stale lock is reported with the command that clears it. Then the
chain runs to the end with `python -m sftlab.cli train --resume` and is compared with an uninterrupted run,
checkpoint by checkpoint. Exports, exports at a rewind alpha, a pipeline between its stages and the DPO
reference cache are killed the same way, and their reruns compared with uninterrupted ones.

Each process is real and killed with SIGKILL. To keep the many processes affordable on 2 cores, they are forked
from one "zygote" process that has already imported torch and transformers (~6 s of CPU each otherwise); the
child then runs `sftlab.cli.main(argv)` exactly as the console script does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, memorisable_chats, write_jsonl
from zygote import Zygote
import sftlab.train.loop  # noqa: F401  (import torch/transformers now, not first under capsys in a test)
from sftlab.cli import main
from sftlab.faults import POINTS
from sftlab.runs import Run
from sftlab.train.checkpoint import find_resume, hash_files, read_trajectory

pytestmark = pytest.mark.slow

STEPS, EVERY, RESUME_EVERY = 24, 2, 4
# (point, step) in the order the chain meets them: a kill at step s resumes from the last resume state (a
# multiple of RESUME_EVERY) at or before s, so the next kill may be at the same step again.
CHAIN = [("after_update", 3),  # no resume state exists yet: the resumed run starts over
         ("checkpoint_write", 6), ("checkpoint_rename", 8), ("checkpoint_line", 8), ("resume_write", 8),
         ("resume_swap", 12), ("after_update", 13), ("checkpoint_write", 16), ("checkpoint_rename", 18),
         ("checkpoint_line", 20), ("resume_write", 20), ("resume_swap", 24)]  # the last: at the final step
TRAINING_POINTS = {"after_update", "checkpoint_write", "checkpoint_rename", "checkpoint_line", "resume_write",
                   "resume_swap"}

@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("cache"))
    yield z
    z.close()


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


def check_after_kill(run: Path, point: str, step: int) -> None:
    """What must hold at any moment a training can die."""
    entries = read_trajectory(run)
    recorded = {Path(e["path"]).name for e in entries}
    for e in entries:
        assert (run / e["path"]).is_dir(), f"trajectory lists {e['path']}, which does not exist"
        assert hash_files(run / e["path"]) == e["sha256"], f"{e['path']}: sha256 does not match trajectory.jsonl"
    assert [c["step"] for c in Run(run).checkpoints()] == [e["step"] for e in entries]
    folders = [p.name for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").is_dir() else []
    stray = [n for n in folders if n not in recorded]
    name = f"step-{step:06d}"
    if point == "checkpoint_write":  # a temp folder with a torn weights file, not a checkpoint
        tmp = [n for n in stray if n.startswith(f".tmp-{name}-")]
        assert tmp and name not in recorded, (stray, recorded)
        torn = run / "checkpoints" / tmp[0] / "adapter_model.safetensors"
        with pytest.raises(Exception):
            from safetensors.torch import load_file
            load_file(str(torn))
    elif point == "checkpoint_rename":  # complete files, still under the temp name
        assert any(n.startswith(f".tmp-{name}-") for n in stray) and name not in recorded
    elif point == "checkpoint_line":  # renamed, not recorded: not a checkpoint
        assert name in stray and name not in recorded
    else:
        assert not stray, stray
    resume = find_resume(run)
    if step > RESUME_EVERY or point in ("resume_swap",):
        assert resume is not None, f"{point}@{step}: no loadable resume state"
    if resume is not None:
        import torch
        from safetensors.torch import load_file

        pos = json.loads((resume / "position.json").read_text())
        assert pos["step"] % RESUME_EVERY == 0 and pos["step"] <= step
        if point in ("resume_write", "resume_swap"):
            assert pos["step"] == step - RESUME_EVERY  # the previous resume state, intact
        load_file(str(resume / "trainable.safetensors"))
        torch.load(resume / "state.pt", weights_only=True)
    if point == "resume_write":
        assert list(run.glob(".tmp-resume-*")), "the torn resume temp folder should be left for resume to clean"
    if point == "resume_swap":
        assert resume.name == ".old-resume" and not (run / "resume").exists()


def stale_lock_is_reported_then_cleared(cfg: Path, run: Path, capsys):
    lock = run / ".lock"
    assert lock.exists(), "a SIGKILLed training cannot remove its lock"
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stale lock" in err and f"rm {lock}" in err, err
    os.remove(err.split("rm ", 1)[1].strip())  # do what the message says


def write_config(tmp: Path, model_dir: Path, name: str) -> Path:
    data = write_jsonl(tmp / "chats.jsonl", memorisable_chats(12))  # 3 steps per epoch: 8 shuffled epochs
    cfg = {"run": {"name": name, "output_dir": str(tmp / "runs"), "seed": 3},
           "model": {"path": str(model_dir)}, "method": {"name": "lora", "r": 4, "dropout": 0.1},
           "data": {"train": [{"path": str(data)}], "max_length": 64},
           "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "schedule": "cosine",
                     "warmup": 2, "threads": 1},
           "checkpoint": {"every": EVERY, "resume_every": RESUME_EVERY},
           "logging": {"progress": False, "tensorboard": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "sftlab_export.json"}  # that one names the run folder


def assert_same_as_reference(run: Path, ref: Path) -> None:
    entries, ref_entries = read_trajectory(run), read_trajectory(ref)
    assert [e["step"] for e in entries] == list(range(EVERY, STEPS + 1, EVERY))
    for e in entries:
        assert hash_files(run / e["path"]) == e["sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(Path(e["path"]).name for e in entries)
    assert not list(run.glob(".tmp-*")) and not (run / ".lock").exists()
    # the whole path is the same, checkpoint by checkpoint, bit for bit
    assert [e["sha256"] for e in entries] == [e["sha256"] for e in ref_entries]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref_rows = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, zygote):
    """The reference run and the chain killed at every point of CHAIN (then finished by the console script)."""
    tmp = tmp_path_factory.mktemp("crash")
    model_dir = build_tiny_model(tmp / "model", dropout=0.1)
    ref_cfg = write_config(tmp, model_dir, "reference")
    zygote.ok(["train", str(ref_cfg)], tmp / "reference.log")
    return tmp, model_dir, write_config(tmp, model_dir, "chain")


def test_the_chain_covers_every_training_point_at_two_steps_or_more():
    assert TRAINING_POINTS <= set(POINTS)
    for point in TRAINING_POINTS:
        assert len({s for p, s in CHAIN if p == point}) >= 2, point
    assert CHAIN[-1][1] == STEPS


def test_sigkill_at_every_training_point_then_resume_equals_uninterrupted(chain, zygote, capsys):
    tmp, _, cfg = chain
    run = tmp / "runs" / "chain"
    for trial, (point, step) in enumerate(CHAIN):
        argv = ["train", str(cfg)] + (["--resume"] if trial else [])
        log = zygote.killed_at(argv, tmp / f"trial-{trial}.log", point, step)
        if point == "after_update":  # the update of this step was applied; nothing of it was written
            assert last_metric_step(run) == step - 1, log
        check_after_kill(run, point, step)
        print(f"kill {trial}: {point}@{step}: trajectory steps {[e['step'] for e in read_trajectory(run)]}, "
              f"resume at {json.loads((find_resume(run) / 'position.json').read_text())['step'] if find_resume(run) else None}",
              file=sys.__stderr__)  # capsys holds stdout
        stale_lock_is_reported_then_cleared(cfg, run, capsys)
    # the real console entry point finishes the run
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(cfg), "--resume"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and "removed what a crash left behind" in proc.stdout
    assert_same_as_reference(run, tmp / "runs" / "reference")


@pytest.mark.parametrize("step,merge", [(8, True), (STEPS, False)])
def test_sigkill_during_export_leaves_nothing_that_looks_complete(chain, zygote, step, merge):
    tmp, _, _ = chain
    ref = tmp / "runs" / "reference"
    out, clean = tmp / f"export-{step}", tmp / f"export-{step}-clean"

    def argv(folder):
        return ["export", str(ref), "--step", str(step), "-o", str(folder)] + (["--merge"] if merge else [])

    zygote.killed_at(argv(out), tmp / f"export-{step}.log", "export", step)
    assert not out.exists(), "a killed export must not leave its output folder"
    torn = out.with_name(f".tmp-{out.name}")
    assert torn.is_dir()  # the torn weights live under the temp name, which no reader takes for an export
    zygote.ok(argv(out), tmp / f"export-{step}-again.log")  # the same command again: the temp folder is replaced
    assert not torn.exists()
    zygote.ok(argv(clean), tmp / f"export-{step}-clean.log")
    assert folder_files(out) == folder_files(clean)
    meta = json.loads((out / "sftlab_export.json").read_text())
    assert meta["step"] == step and meta["merged"] == merge


@pytest.mark.parametrize("step", [12, STEPS])
def test_sigkill_during_a_rewind_export(chain, zygote, step):
    tmp, _, _ = chain
    ref = str(tmp / "runs" / "reference")
    out = tmp / f"rewind-{step}"
    code = ("from sftlab.runs import Run\nfrom sftlab.interpolate import export_at\n"
            "export_at(Run(ARGV[0]), ARGV[1], 0.5, ARGV[2], merge=True)")  # what `sftlab rewind --search -o` runs
    zygote.killed_at([ref, step, str(out)], tmp / f"rewind-{step}.log", "rewind_export", step, code=code)
    assert not out.exists() and out.with_name(f".tmp-{out.name}").is_dir()
    zygote.ok([ref, step, str(out)], tmp / f"rewind-{step}-again.log", code=code)
    clean = tmp / f"rewind-{step}-clean"
    zygote.ok([ref, step, str(clean)], tmp / f"rewind-{step}-clean.log", code=code)
    assert folder_files(out) == folder_files(clean)
    assert json.loads((out / "sftlab_export.json").read_text())["alpha"] == 0.5


def pipeline_config(tmp: Path, model_dir: Path, name: str) -> Path:
    chats = write_jsonl(tmp / "chats.jsonl", memorisable_chats(12))
    colours = ["red", "blue", "green", "black", "white", "pink"]
    pairs = write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"colour of item {i}?", "chosen": colours[i % 6],
                                               "rejected": colours[(i + 1) % 6]} for i in range(12)])
    common = {"model": {"path": str(model_dir)}, "logging": {"progress": False, "tensorboard": False},
              "checkpoint": {"every": 3, "resume_every": 3}, "data": {"max_length": 64}}
    pipe = {"output_dir": str(tmp / name), "stages": [
        {"name": "sft", "config": {**common, "method": {"name": "lora", "r": 4},
                                   "data": {"max_length": 64, "train": [{"path": str(chats)}]},
                                   "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "threads": 1}}},
        {"name": "dpo", "from": "sft", "config": {
            **common, "method": {"name": "lora", "r": 4}, "objective": {"name": "dpo", "beta": 0.1},
            "data": {"max_length": 64, "train": [{"path": str(pairs)}]},
            "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "threads": 1}}}]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return path


def test_sigkill_between_pipeline_stages_and_in_the_dpo_reference_cache(chain, zygote):
    tmp, model_dir, _ = chain
    ref_cfg = pipeline_config(tmp, model_dir, "pipe-reference")
    zygote.ok(["pipeline", str(ref_cfg)], tmp / "pipe-reference.log", env={"SFTLAB_CACHE": str(tmp / "cache-ref")})
    cfg = pipeline_config(tmp, model_dir, "pipe")
    folder, env = tmp / "pipe", {"SFTLAB_CACHE": str(tmp / "cache-pipe")}  # its own cache: it computes the reference
    zygote.killed_at(["pipeline", str(cfg)], tmp / "pipe-1.log", "pipeline_stage", 1, env=env)
    assert "sft" not in json.loads((folder / "pipeline.json").read_text() if
                                   (folder / "pipeline.json").exists() else "{}")
    # the DPO stage computes its reference log-probs once and caches them: killed mid-write, the torn temp
    # file is never read as the cache (the two pipelines share the key: the same start point and pairs)
    log = zygote.killed_at(["pipeline", str(cfg)], tmp / "pipe-2.log", "dpo_reference", None, env=env)
    assert "stage sft: resuming" in log and "stage dpo: training" in log
    torn = Path(log.split("sftlab-fault: SIGKILL at dpo_reference (")[1].split(" cut to half)")[0])
    assert torn.name.startswith(".") and torn.name.endswith(".tmp")
    assert not torn.with_name(torn.name[1:-4]).exists(), "the cache file appeared though its write was killed"
    # the killed stage left only its lock: the rerun says so (one line, the command that clears it)
    log = zygote.run(["pipeline", str(cfg)], tmp / "pipe-2b.log", env=env)["log"]
    lock = folder / "dpo" / ".lock"
    assert f"stale lock from a process that is gone" in log and f"rm {lock}" in log, log
    lock.unlink()
    log = zygote.killed_at(["pipeline", str(cfg)], tmp / "pipe-3.log", "pipeline_stage", 2, env=env)
    assert "stage dpo: training" in log  # the folder is empty now: a fresh start
    assert not (folder / "dpo" / ".lock").exists()  # its training had ended; only the pipeline's record is missing
    log = zygote.ok(["pipeline", str(cfg)], tmp / "pipe-4.log", env=env)
    assert "stage sft: finished earlier" in log and "stage dpo: resuming" in log
    for stage in ("sft", "dpo"):
        a, b = read_trajectory(folder / stage), read_trajectory(tmp / "pipe-reference" / stage)
        assert [e["step"] for e in a] == [3, 6] and [e["sha256"] for e in a] == [e["sha256"] for e in b], stage
    ref_prov = json.loads((tmp / "pipe-reference" / "dpo" / "provenance.json").read_text())
    prov = json.loads((folder / "dpo" / "provenance.json").read_text())
    assert prov["data"]["reference"]["status"] == "computed"  # the torn temp file was not taken for the cache
    assert Path(ref_prov["data"]["reference"]["file"]).name == Path(prov["data"]["reference"]["file"]).name
