"""The real embedded model end to end: `sftlab train` (a subprocess, as a user runs it) on SmolLM2-135M,
then the adapter read back by plain PEFT, a merged export read by plain transformers, and `sftlab chat`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "data" / "wiki_topics_train.jsonl"


def sftlab(*args: str, input: str | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"sftlab {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("smollm2")
    cfg = {
        "run": {"name": "smol", "output_dir": str(tmp / "runs")},
        "model": {"path": "smollm2"},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [{"path": str(TRAIN)}], "max_length": 128, "limit": 16},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2},
        "logging": {"progress": False, "tensorboard": False},
    }
    path = tmp / "smol.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = sftlab("train", str(path))
    run = tmp / "runs" / "smol"
    assert f"run written to {run}" in proc.stdout
    return run


def test_adapter_loads_with_plain_peft_and_matches_run_load(smol_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import Run

    prov = json.loads((smol_run / "provenance.json").read_text())
    assert prov["base_model"]["source"] == "embedded" and len(prov["base_model"]["sha256"]) == 64
    base_folder = prov["base_model"]["location"]
    ckpt = smol_run / json.loads((smol_run / "trajectory.jsonl").read_text().splitlines()[-1])["path"]
    assert ckpt.name == "step-000003"

    tok = AutoTokenizer.from_pretrained(base_folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), str(ckpt)).eval()
    ours, _ = Run(smol_run).load()
    ours.eval()
    with torch.no_grad():
        want = plain(**ids).logits
        got = ours(**ids).logits
        base = plain.get_base_model()
        with plain.disable_adapter():
            untouched = base(**ids).logits
    torch.testing.assert_close(got, want)
    assert (got - untouched).abs().max() > 1e-4  # three steps at lr 1e-2 moved the adapter


def test_merged_export_is_a_standalone_model(smol_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    sftlab("export", str(smol_run), "--merge", "-o", str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert gen.shape[1] > ids["input_ids"].shape[1] and reply.strip()


def test_chat_answers_lines_from_stdin(smol_run):
    proc = sftlab("chat", str(smol_run), "--max-new-tokens", "8",
                  input="What is the capital of France?\n/reset\nName a colour.\n")
    replies = re.findall(r"model> (.*)", proc.stdout)  # input() writes its "you> " prompt to stdout too
    assert len(replies) == 2 and all(r.strip() for r in replies), proc.stdout


def test_demo_end_to_end_in_miniature(tmp_path, capsys):
    """The demo arena on the real model, cut to two methods x 2 steps: trials, leaderboard, samples, report."""
    from sftlab.demo import DemoPlan, run_demo

    plan = DemoPlan(("lora", "prompt"), steps=2, batch_size=2, checkpoint_every=1, n_task=4, n_general=2,
                    n_generate=2)
    folder = run_demo(output_dir=str(tmp_path), plan=plan)
    out = capsys.readouterr().out
    assert folder == tmp_path / "demo" and (folder / "report.html").is_file() and (folder / "arena.yaml").is_file()
    meta = json.loads((folder / "arena.json").read_text())
    assert [t["status"] for t in meta["trials"]] == ["done", "done"]
    board = json.loads((folder / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"lora", "prompt"}
    for t in meta["trials"]:
        entries = [json.loads(x) for x in (folder / t["run_dir"] / "trajectory.jsonl").read_text().splitlines()]
        scored = sorted({e["step"] for e in entries if "classify" in e.get("scores", {})})
        assert scored == [0, 1, 2]
        assert any("generate" in e.get("scores", {}) and e["step"] == 2 for e in entries)  # final answers kept
    assert "HV" in out and "report:" in out and "Task accuracy" in out


def test_demo_task_needs_fine_tuning(tokenizer):
    """The demo's answers are single-token desk codes that the prompt never explains: the base cannot read the
    scheme off the question (that let it score 31% on the first design), and each label costs one token."""
    from sftlab.assets import CODES, ensure_demo_data

    data = ensure_demo_data()
    rows = [json.loads(x) for x in data.eval.read_text().splitlines()]
    assert sorted(data.labels) == sorted(CODES.values()) and len(rows) == 96
    for code in data.labels:
        assert len(tokenizer(code, add_special_tokens=False)["input_ids"]) == 1
    for r in rows:
        prompt = r["messages"][0]["content"]
        assert r["messages"][-1]["content"] in data.labels
        assert not any(topic in prompt.split("\n\n")[0].lower() for topic in CODES)  # the question names none
