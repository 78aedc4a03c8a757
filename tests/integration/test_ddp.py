"""Data-parallel training: 2 CPU processes (gloo) equal 1 process at the same global batch.

`torchrun --nproc_per_node 2 -m sftlab.cli train` with batch_size 2 per process on disjoint shards
(BatchPlan splits each global batch by rank) against one in-process run with batch_size 4; gradient
accumulation is on, so the no_sync micro-batches are covered too. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.config import config_from_dict
from sftlab.train.checkpoint import hash_files, read_trajectory

pytestmark = pytest.mark.slow

STEPS = 3


def config_dict(tmp_path, model_dir, data, name, method, batch_size):
    return {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": method,
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        # 8 examples, global batch 4, grad_accum 2: one step per epoch, so 3 steps reshuffle twice
        "train": {"steps": STEPS, "batch_size": batch_size, "grad_accum": 2, "lr": 1e-3, "threads": 1},
        "checkpoint": {"every": 1},
        "logging": {"progress": False, "tensorboard": False},
    }


def load_weights(run_dir, peft: bool) -> dict:
    from safetensors.torch import load_file

    last = run_dir / read_trajectory(run_dir)[-1]["path"]
    return load_file(str(last / ("adapter_model.safetensors" if peft else "model.safetensors")))


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}], ids=["lora", "full"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, method, monkeypatch):
    import torch
    from sftlab.train.loop import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # both sides on CPU, also on a GPU machine

    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    ddp_cfg = tmp_path / "ddp.yaml"
    ddp_cfg.write_text(yaml.safe_dump(config_dict(tmp_path, tiny_model_dir, data, "ddp", method, 2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sftlab.cli", "train", str(ddp_cfg)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trainable of") == 1, "only rank 0 reports"

    single = Trainer(config_from_dict(config_dict(tmp_path, tiny_model_dir, data, "single", method, 4)))
    single.run()

    ddp_dir, single_dir = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"
    peft = method["name"] != "full"
    w_ddp, w_single = load_weights(ddp_dir, peft), load_weights(single_dir, peft)
    assert w_ddp.keys() == w_single.keys()
    diff = max((w_ddp[k] - w_single[k]).abs().max().item() for k in w_ddp)
    assert diff <= 1e-5, f"2 processes x batch 2 differ from 1 x batch 4 by {diff:.2e}"

    rows_ddp = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    rows_single = [json.loads(x) for x in (single_dir / "metrics.jsonl").read_text().splitlines()]
    # written once, by rank 0: one line per step, global token counts, the same losses
    assert [r["step"] for r in rows_ddp] == list(range(1, STEPS + 1))
    for a, b in zip(rows_ddp, rows_single):
        assert a["trained_tokens"] == b["trained_tokens"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    traj_lines = (ddp_dir / "trajectory.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in traj_lines] == list(range(1, STEPS + 1))
    for e in read_trajectory(ddp_dir):
        assert hash_files(ddp_dir / e["path"]) == e["sha256"]
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted(p.name for p in single_dir.iterdir())
    assert not list(ddp_dir.glob(".*")) and not list((ddp_dir / "checkpoints").glob(".*"))  # no tmp, no lock
    prov = json.loads((ddp_dir / "provenance.json").read_text())
    assert prov["trainable_params"] == json.loads((single_dir / "provenance.json").read_text())["trainable_params"]
