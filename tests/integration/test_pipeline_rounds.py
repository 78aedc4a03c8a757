"""Multi-round preference pipelines on a tiny model: SFT -> DPO (pairs A) -> DPO (pairs B).

Each stage starts from the checkpoint its source stage's select: rule picks (not the last), each DPO round's
reference is that starting model (round 2's: the round-1 model, with the SFT adapter merged below it, never the
base with an adapter switched off), nothing is overwritten, and provenance.json chains the three stages. Killed
with SIGKILL inside every stage (sftlab/faults.py: an optimizer update in stage 1, 2 and 3, and the write of
stage 3's reference cache), each time rerun with `sftlab pipeline`, the pipeline ends with exactly the
checkpoints (sha256) and trajectory scores of an uninterrupted one.

Why exact: every process runs on one CPU thread; a resumed stage restores weights, optimizer, scheduler, RNG
(dropout) and data position bitwise from its last resume state and retrains the lost steps with the same
kernels; the reference log-probs are computed by the same code on identical weights; the probes score identical
weights; and the selection is a function of those scores. Stages have 4, 6 and 8 steps so that the kill at
optimizer step 3, 5 or 7 falls in stage 1, 2 or 3 (a step-numbered fault point fires in the first stage that
reaches that step).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_tiny_model, memorisable_chats, write_jsonl
from zygote import Zygote
from sftlab.rundir_format import read_trajectory
from sftlab.runs import Run
from sftlab.train.checkpoint import hash_files

pytestmark = pytest.mark.slow

STEPS = {"sft": 4, "dpo_a": 6, "dpo_b": 8}
COLOURS = ["red", "blue", "green", "black", "white", "pink"]


def colour_pairs(n: int, seed: int, question: str) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = COLOURS[i % len(COLOURS)]
        w = rng.choice([x for x in COLOURS if x != c])
        out.append({"prompt": question.format(i=i), "chosen": c, "rejected": w})
    return out


def pipeline_config(tmp: Path, model_dir: Path, name: str) -> Path:
    chats = write_jsonl(tmp / "chats.jsonl", memorisable_chats(12))
    pairs_a = write_jsonl(tmp / "pairs_a.jsonl", colour_pairs(12, 1, "colour of item {i}?"))
    pairs_b = write_jsonl(tmp / "pairs_b.jsonl", colour_pairs(12, 2, "which colour is thing {i}?"))
    general = tmp / "general.txt"
    general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i}."
                                   for i in range(8)))
    probes = [{"name": "heldout_loss", "path": str(chats)},
              {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0}]
    common = {"logging": {"progress": False, "tensorboard": False}, "probes": probes,
              "checkpoint": {"every": 2, "resume_every": 2}, "method": {"name": "lora", "r": 4, "dropout": 0.1}}

    def train(stage):
        return {"steps": STEPS[stage], "batch_size": 4, "lr": 1e-2, "threads": 1}

    least_forgetting = {"min_task": 100.0}  # heldout_loss <= 100: every checkpoint; the least KL to the base wins
    dpo = {"objective": {"name": "dpo", "beta": 0.5}}
    pipe = {"output_dir": str(tmp / name), "stages": [
        {"name": "sft", "config": {**common, "model": {"path": str(model_dir)}, "select": least_forgetting,
                                   "data": {"max_length": 64, "train": [{"path": str(chats)}]},
                                   "train": train("sft")}},
        {"name": "dpo_a", "from": "sft", "config": {
            **common, **dpo, "select": least_forgetting, "train": train("dpo_a"),
            "data": {"max_length": 64, "train": [{"path": str(pairs_a)}]}}},
        {"name": "dpo_b", "from": "dpo_a", "config": {
            **common, **dpo, "train": train("dpo_b"), "data": {"max_length": 64, "train": [{"path": str(pairs_b)}]}}}]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    model_dir = build_tiny_model(tmp / "model", dropout=0.1)
    z = Zygote(tmp / "cache-unused")
    cfg = pipeline_config(tmp, model_dir, "reference")
    log = z.ok(["pipeline", str(cfg)], tmp / "reference.log", env={"SFTLAB_CACHE": str(tmp / "cache-reference")})
    yield tmp, model_dir, z, log
    z.close()


def test_each_stage_starts_from_the_selected_checkpoint_and_provenance_chains_them(rounds):
    tmp, _, _, log = rounds
    folder = tmp / "reference"
    state = json.loads((folder / "pipeline.json").read_text())
    assert list(state) == ["sft", "dpo_a", "dpo_b"]
    for stage, src in (("dpo_a", "sft"), ("dpo_b", "dpo_a")):
        start, chosen = state[stage]["start"], state[src]["selected"]
        assert start["how"] == "selected" and start["from"] == src and "min_task: 100" in start["rule"]
        assert start["step"] == chosen["step"] > 0 and start["sha256"] == chosen["sha256"]
        assert start["step"] < state[src]["step"]  # the least forgetting checkpoint, not the last
        assert f"stage {stage}: starts from {src} step {start['step']}" in log
        prov = json.loads((folder / stage / "provenance.json").read_text())
        # the trainer's record (what was loaded, verified by sha256) and the pipeline's (which and why) agree
        assert prov["start"]["run_rel"] == f"../{src}" and prov["start"]["step"] == start["step"]
        assert prov["start"]["sha256"] == start["sha256"] == Run(folder / src).checkpoint(start["step"])["sha256"]
        assert prov["start"]["checkpoint"] == start["checkpoint"] == f"checkpoints/step-{start['step']:06d}"
        assert prov["pipeline"]["start"] == start and prov["pipeline"]["stage"] == stage
    assert "start" not in json.loads((folder / "sft" / "provenance.json").read_text())
    assert "the last stage's select: default (the knee" in log and "picks dpo_b" in log
    # nothing overwritten: one folder per stage, every checkpoint still matches its recorded sha256
    for stage, steps in STEPS.items():
        entries = Run(folder / stage).checkpoints()
        assert [e["step"] for e in entries] == list(range(2, steps + 1, 2))
        assert all(hash_files(folder / stage / e["path"]) == e["sha256"] for e in entries)


def reference_table(folder: Path, stage: str) -> torch.Tensor:
    from safetensors.torch import load_file

    prov = json.loads((folder / stage / "provenance.json").read_text())
    assert prov["data"]["reference"]["mode"] == "cached"
    return load_file(prov["data"]["reference"]["file"])["logps"]


@torch.no_grad()
def logps_under(model, stage_run: Run) -> torch.Tensor:
    """(N, 2) log-probs of the stage's pairs (train, then eval: the reference cache's order) under `model`."""
    from sftlab.train.dpo import pair_batch, pair_logps, prepare_pairs

    tok = stage_run.tokenizer()
    data = prepare_pairs(stage_run.cfg, tok)
    pairs = data.train + data.eval
    out = []
    model.eval()
    for p in pairs:  # one pair a batch: no padding
        c, r, _, _ = pair_logps(model, pair_batch([p], tok.pad_token_id))
        out.append(torch.stack([c, r], dim=1))
    return torch.cat(out).float()


def test_each_rounds_reference_is_the_model_it_starts_from(rounds):
    tmp, model_dir, _, _ = rounds
    folder = tmp / "reference"
    state = json.loads((folder / "pipeline.json").read_text())
    sft, dpo_a, dpo_b = (Run(folder / s) for s in STEPS)
    round1_model, _ = dpo_a.load(state["dpo_b"]["start"]["step"])  # SFT merged, round-1 adapter on top
    sft_model, _ = sft.load(state["dpo_a"]["start"]["step"])
    base = Run(folder / "sft").load_initial()
    ref2, ref1 = reference_table(folder, "dpo_b"), reference_table(folder, "dpo_a")
    # round 2's reference is the round-1 selected model (measured: 2e-6 apart, the merge's float rounding) ...
    assert torch.allclose(ref2, logps_under(round1_model, dpo_b), atol=2e-5)
    assert torch.allclose(ref1, logps_under(sft_model, dpo_a), atol=2e-5)
    # ... and neither the SFT model nor the base (measured: 0.39 and 0.69 apart; the base is what switching
    # every adapter off would give)
    assert (ref2 - logps_under(sft_model, dpo_b)).abs().max() > 1e-2
    assert (ref2 - logps_under(base, dpo_b)).abs().max() > 1e-2


def numbers(entry: dict) -> dict:
    """A trajectory entry's scores as numbers (not the seconds they took, nor the cache file they read)."""
    return {name: [s[k] for k in ("value", "ci_low", "ci_high", "n")] for name, s in entry.get("scores", {}).items()}


def test_sigkill_in_every_stage_then_rerun_equals_uninterrupted(rounds):
    tmp, model_dir, z, _ = rounds
    cfg = pipeline_config(tmp, model_dir, "killed")
    folder, env = tmp / "killed", {"SFTLAB_CACHE": str(tmp / "cache-killed")}
    argv = ["pipeline", str(cfg)]
    kills = [("after_update", 3, "sft"), ("after_update", 5, "dpo_a"), ("dpo_reference", None, "dpo_b"),
             ("after_update", 7, "dpo_b")]
    for n, (point, step, stage) in enumerate(kills):
        log = z.killed_at(argv, tmp / f"killed-{n}.log", point, step, env=env)
        said = [ln for ln in log.splitlines() if ln.startswith("sftlab: stage ")]
        assert said[-1].startswith(f"sftlab: stage {stage}: "), log  # killed inside the stage meant
        lock = folder / stage / ".lock"
        if n == 0:  # a killed stage leaves its lock: the rerun says how to clear it, in one line
            again = z.run(argv, tmp / "killed-lock.log", env=env)
            assert again["rc"] != 0 and f"rm {lock}" in again["log"], again["log"]
        lock.unlink()
    log = z.ok(argv, tmp / "killed-final.log", env=env)
    assert "stage sft: finished earlier" in log and "stage dpo_a: finished earlier" in log
    assert "stage dpo_b: resuming" in log
    ref = tmp / "reference"
    for stage in STEPS:
        a, b = read_trajectory(folder / stage), read_trajectory(ref / stage)
        assert [e["step"] for e in a] == [e["step"] for e in b]
        assert [e.get("sha256") for e in a] == [e.get("sha256") for e in b], stage  # the weights, bit for bit
        assert [numbers(e) for e in a] == [numbers(e) for e in b], stage  # exactly the same scores
    got, want = (json.loads((f / "pipeline.json").read_text()) for f in (folder, ref))
    for stage in STEPS:
        for key in ("step", "sha256", "selected"):
            assert got[stage].get(key) == want[stage].get(key), (stage, key)
        if stage != "sft":
            drop = ("run",)  # the only field that names the pipeline's own folder
            assert {k: v for k, v in got[stage]["start"].items() if k not in drop} == \
                   {k: v for k, v in want[stage]["start"].items() if k not in drop}
