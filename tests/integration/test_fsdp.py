"""Sharded training: 2 CPU processes (gloo) under FSDP2 equal 1 process at the same global batch.

torch 2.13's `fully_shard` runs on CPU with gloo (CPU offload does not: it needs an accelerator, and sftlab
refuses it on CPU). One case starts through `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
(sftlab reads accelerate's FSDP settings from the environment), one through torchrun with
distributed.strategy=fsdp. The checkpoints must be the same PEFT/HF files a single process writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.config import config_from_dict
from sftlab.train.checkpoint import hash_files, read_trajectory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def config_dict(tmp_path, model_dir, data, name, method, batch_size, distributed=None):
    d = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": method,
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        # 8 examples, global batch 4, grad_accum 2: the no_sync micro-batches are covered too
        "train": {"steps": STEPS, "batch_size": batch_size, "grad_accum": 2, "lr": 1e-3, "threads": 1},
        "checkpoint": {"every": 1},
        "logging": {"progress": False, "tensorboard": False},
    }
    if distributed:
        d["distributed"] = distributed
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, cfg_path, how: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if how == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "sftlab.cli", "train", str(cfg_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sftlab.cli", "train", str(cfg_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def last_weights(run_dir, peft: bool) -> dict:
    from safetensors.torch import load_file

    last = run_dir / read_trajectory(run_dir)[-1]["path"]
    return load_file(str(last / ("adapter_model.safetensors" if peft else "model.safetensors")))


@pytest.mark.parametrize("method,how", [({"name": "lora", "r": 4}, "accelerate"), ({"name": "full"}, "torchrun")],
                         ids=["lora-accelerate", "full-torchrun"])
def test_fsdp_two_processes_equal_one(tmp_path, tiny_model_dir, method, how, monkeypatch):
    import torch
    from sftlab.train.loop import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    dist = None if how == "accelerate" else {"strategy": "fsdp"}  # accelerate: strategy auto reads its env
    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, tiny_model_dir, data, "fsdp", method, 2, dist)))
    proc = launch(tmp_path, cfg_path, how)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.count("trainable of") == 1, "only rank 0 reports"
    assert "fsdp2 (reshard_after_forward=True" in proc.stdout, proc.stdout[-2000:]

    single = Trainer(config_from_dict(config_dict(tmp_path, tiny_model_dir, data, "single", method, 4)))
    single.run()

    fsdp_dir, single_dir = tmp_path / "runs" / "fsdp", tmp_path / "runs" / "single"
    peft = method["name"] != "full"
    w_fsdp, w_single = last_weights(fsdp_dir, peft), last_weights(single_dir, peft)
    assert w_fsdp.keys() == w_single.keys()  # the same files and tensor names as one process writes
    assert all(w_fsdp[k].shape == w_single[k].shape and w_fsdp[k].dtype == w_single[k].dtype for k in w_fsdp)
    diff = max((w_fsdp[k] - w_single[k]).abs().max().item() for k in w_fsdp)
    assert diff <= 1e-5, f"FSDP 2 processes x batch 2 differ from 1 x batch 4 by {diff:.2e}"
    ckpt = fsdp_dir / read_trajectory(fsdp_dir)[-1]["path"]
    ref = single_dir / read_trajectory(single_dir)[-1]["path"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in ref.iterdir())
    if peft:
        cfg_a, cfg_b = (json.loads((p / "adapter_config.json").read_text()) for p in (ckpt, ref))
        assert cfg_a == cfg_b

    rows_fsdp = [json.loads(x) for x in (fsdp_dir / "metrics.jsonl").read_text().splitlines()]
    rows_single = [json.loads(x) for x in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(rows_fsdp, rows_single):
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for e in read_trajectory(fsdp_dir):
        assert hash_files(fsdp_dir / e["path"]) == e["sha256"]
    # the resume state holds full tensors under the single-process names
    from safetensors.torch import load_file

    resume_f = load_file(str(fsdp_dir / "resume" / "trainable.safetensors"))
    resume_s = load_file(str(single_dir / "resume" / "trainable.safetensors"))
    assert resume_f.keys() == resume_s.keys()
    assert all(resume_f[k].shape == resume_s[k].shape for k in resume_f)
