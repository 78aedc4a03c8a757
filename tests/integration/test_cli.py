"""The CLI end to end on a tiny model built in code: train -> run directory layout (DESIGN.md), bad data,
data inspect, export (adapter and merged), chat."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.cli import main


def write_config(tmp_path: Path, model_dir: Path, train_file: Path, eval_: Path | None = None, name: str = "run",
                 method: dict | None = None, **sections) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": method or {"name": "lora", "r": 4},
        "data": {"train": [{"path": str(train_file)}], "max_length": 64},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2},
        "checkpoint": {"every": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    if eval_ is not None:
        cfg["data"]["eval"] = [{"path": str(eval_)}]
    for key, val in sections.items():
        cfg[key] = {**cfg.get(key, {}), **val}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    chats = memorisable_chats(32)
    return write_jsonl(d / "train.jsonl", chats[:24]), write_jsonl(d / "eval.jsonl", chats[24:])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, data_files) -> Path:
    """One LoRA run through `sftlab train`, shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = write_config(tmp, tiny_model_dir, *data_files)
    assert main(["train", str(cfg)]) == 0
    return tmp / "runs" / "run"


def logits_of(model, tokenizer, text: str = "colour of item 3?"):
    import torch

    ids = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


# ------------------------------------------------------------------------------------------ run directory


def test_train_writes_the_run_directory_contract(lora_run, tiny_model_dir, data_files):
    from sftlab.models import file_sha256, folder_hash
    from sftlab.train.checkpoint import hash_files

    run = lora_run
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "provenance.json", "metrics.jsonl", "checkpoints", "trajectory.jsonl",
            "resume"} <= names
    assert "error.txt" not in names and ".lock" not in names

    cfg = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config, method options included
    assert cfg["method"]["name"] == "lora" and cfg["method"]["r"] == 4 and cfg["train"]["steps"] == 4

    prov = json.loads((run / "provenance.json").read_text())
    assert prov["base_model"]["location"] == str(tiny_model_dir)
    assert prov["base_model"]["sha256"] == folder_hash(tiny_model_dir)
    for pkg in ("torch", "transformers", "peft"):
        assert prov["packages"][pkg], pkg
    assert "sftlab_commit" in prov  # the commit (None only outside a git checkout)
    train_file, eval_file = data_files
    assert prov["data"]["train"] == [{"path": str(train_file), "sha256": file_sha256(train_file), "kind": "file"}]
    assert prov["data"]["eval"][0]["sha256"] == file_sha256(eval_file)

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in steps)
    assert any(r.get("eval") and math.isfinite(r["eval_loss"]) for r in rows)

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # no temp folders left behind
    for c in ckpts:
        files = {p.name for p in (run / "checkpoints" / c).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files

    traj = [json.loads(ln) for ln in (run / "trajectory.jsonl").read_text().splitlines()]
    assert [t["step"] for t in traj] == [2, 4]
    for t in traj:
        assert t["sha256"] == hash_files(run / t["path"])

    assert {"trainable.safetensors", "state.pt", "position.json"} <= {p.name for p in (run / "resume").iterdir()}
    assert json.loads((run / "resume" / "position.json").read_text())["step"] == 4


def test_training_learns(lora_run):
    rows = [json.loads(ln) for ln in (lora_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if not r.get("eval")]
    assert losses[-1] < losses[0]


def test_rerun_into_existing_run_dir_is_refused(lora_run, capsys):
    cfg = lora_run / "config.yaml"
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err


# ------------------------------------------------------------------------------------------- bad input


def test_bad_data_exits_2_with_one_line_naming_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(memorisable_chats(1)[0])
    bad.write_text(f"{good}\n{good}\n{{\"messages\": [\n{good}\n")
    cfg = write_config(tmp_path, tiny_model_dir, bad)
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(cfg)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and f"{bad}:3" in lines[0]
    run = tmp_path / "runs" / "run"
    assert [p.name for p in run.iterdir()] == ["error.txt"]
    assert f"{bad}:3" in (run / "error.txt").read_text()


def test_bad_role_names_the_line(tmp_path, tiny_model_dir, capsys):
    bad = write_jsonl(tmp_path / "roles.jsonl", memorisable_chats(4) + [
        {"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "red"}]}])
    cfg = write_config(tmp_path, tiny_model_dir, bad)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:5" in err
    assert [p.name for p in (tmp_path / "runs" / "run").iterdir()] == ["error.txt"]


def test_bad_config_exits_2_before_loading_anything(tmp_path, tiny_model_dir, data_files, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, data_files[0])
    assert main(["train", str(cfg), "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ data inspect


def test_data_inspect_marks_trained_spans_and_counts(tmp_path, tiny_model_dir, data_files, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, *data_files)
    assert main(["data", "inspect", str(cfg), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "--- example 1" in out and "--- example 2" in out and "--- example 3" not in out
    # Only the answer and its end-of-turn token are trained; the prompt is not.
    answers = {m["messages"][-1]["content"] for m in memorisable_chats(24)}
    body = out.split("\n", 1)[1]  # after the header line, which explains the [[ ]] marks
    marked = [seg.split("]]")[0] for seg in body.split("[[")[1:]]
    assert marked and all(seg.removesuffix("<|im_end|>") in answers for seg in marked), marked
    assert "colour of item" in out and "[[colour" not in out
    assert "train: 24 examples" in out and "eval: 8 examples" in out and "% trained" in out
    assert not (tmp_path / "runs").exists()  # inspecting writes nothing


# ------------------------------------------------------------------------------------------------ export


def test_export_adapter_loads_with_plain_peft(lora_run, tiny_model_dir, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import Run

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "sftlab_export.json"} <= files
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_model_dir)
    meta = json.loads((out / "sftlab_export.json").read_text())
    assert meta["step"] == 4 and meta["merged"] is False

    tok = AutoTokenizer.from_pretrained(str(out))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"]),
                                      str(out))
    ours, _ = Run(lora_run).load()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    got, want = logits_of(plain, tok), logits_of(ours, tok)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, logits_of(base, tok))  # the adapter is not a no-op


def test_export_merged_is_a_plain_model_folder(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import Run

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--step", "2", "--merge", "-o", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template
    assert not any("lora" in n for n, _ in model.named_parameters())
    ours, _ = Run(lora_run).load(step=2)
    torch.testing.assert_close(logits_of(model, tok), logits_of(ours, tok), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "sftlab_export.json").read_text())["merged"] is True


def test_export_refuses_non_empty_output_and_unknown_step(lora_run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(lora_run), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--step", "3", "-o", str(tmp_path / "x")]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_full_run_exports_a_model_folder(tmp_path, tiny_model_dir, data_files):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.runs import Run

    cfg = write_config(tmp_path, tiny_model_dir, data_files[0], method={"name": "full"},
                       train={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "run"
    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    out = tmp_path / "export"
    assert main(["export", str(run), "-o", str(out)]) == 0
    model, tok = AutoModelForCausalLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    ours, _ = Run(run).load()
    torch.testing.assert_close(logits_of(model, tok), logits_of(ours, tok))


# -------------------------------------------------------------------------------------------------- chat


def test_chat_answers_each_line_and_stops_on_empty(lora_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("colour of item 1?\n/reset\ncolour of item 2?\n\nnever read\n"))
    assert main(["chat", str(lora_run), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chatting with") and out.count("model> ") == 2


def test_merge_export_of_virtual_token_method_is_refused_cleanly(tmp_path, tiny_model_dir, data_files, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, data_files[0], method={"name": "prefix", "num_virtual_tokens": 4},
                       train={"steps": 1}, checkpoint={"every": 0})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "run"
    assert main(["export", str(run), "--merge", "-o", str(tmp_path / "m")]) == 2
    assert "without --merge" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "runs"]  # no half-written export
    assert main(["export", str(run), "-o", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------- configs and example data

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_is_a_config_per_kind_of_method():
    names = {(yaml.safe_load(p.read_text()).get("method") or {}).get("name") for p in CONFIGS} - {None}
    assert {"lora", "full", "oft", "prefix"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_starts_with_its_command_and_validates(path, monkeypatch, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "sftlab " in first and f"configs/{path.name}" in first, first
    monkeypatch.chdir(REPO)  # configs name their data relative to the repository root
    raw = yaml.safe_load(path.read_text())
    if "stages" in raw:  # a pipeline: its stages are run configs, validated by the pipeline's own tests
        return
    if "study" in raw:  # a study: --plan validates every arena it would run
        assert main(["study", f"configs/{path.name}", "--plan"]) == 0
        return
    if "arena" in raw:  # an arena: the shared sections are a run config without a method
        from sftlab.arena import load_arena

        resolved = load_arena(path)[1]
        resolved["data"].setdefault("eval", [])
    else:
        assert main(["config", f"configs/{path.name}"]) == 0
        resolved = yaml.safe_load(capsys.readouterr().out)
    for src in resolved["data"]["train"] + resolved["data"]["eval"]:
        generator = next((g for prefix, g in GENERATED_DATA.items() if src["path"].startswith(prefix)), None)
        if generator:  # git-ignored, written by its script (tests/integration/test_shapes_example.py runs it)
            assert (REPO / generator).is_file() and generator in (REPO / "Makefile").read_text(), src
            continue
        # ~/.cache/sftlab/...: the demo task's files, written by `make setup` (the arena configs on it)
        assert (REPO / Path(src["path"]).expanduser()).is_file(), src["path"]


# Data folders that are not committed but generated by a script (a make target runs it before the config).
GENERATED_DATA = {"examples/shapes/": "examples/make_shapes.py"}


def test_example_data_is_what_make_data_writes(tmp_path, monkeypatch):
    import runpy

    script = runpy.run_path(str(REPO / "examples" / "make_data.py"))
    monkeypatch.setitem(script["main"].__globals__, "OUT", tmp_path)
    script["main"]()
    for f in tmp_path.iterdir():
        assert f.read_bytes() == (REPO / "examples" / "data" / f.name).read_bytes(), f.name
