"""Exports that leave sftlab: GGUF round trips (transformers reads the file back and its logits match the merged
model), the Modelfile's template, the model card (scores with CIs, the retention cost first), refusals, and the
push dry run. One LoRA run on a tiny model, trained once for the module."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import build_tiny_model, task_files, tiny_config
from sftlab.cli import main

PROMPT = "<|im_start|>user\ncolour of item 3?<|im_end|>\n<|im_start|>assistant\nThe river runs past the mill"
# max |logit difference| against the merged fp32 model, measured on this run (tiny random Llama, hidden 64):
# f32 0 (exact), f16 ~4.5e-4, q8_0 ~7e-3; the bounds leave room for other seeds and platforms.
BOUNDS = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return task_files(tmp_path_factory.mktemp("export-data"))


def _train(tmp, files, method, name):
    from sftlab.config import parse_probes
    from sftlab.train.loop import Trainer

    chats, general = files
    model_dir = tmp / "model" if (tmp / "model").is_dir() else build_tiny_model(tmp / "model")
    cfg = tiny_config(tmp, model_dir, chats, method=method, run={"name": name},
                      train={"steps": 6, "batch_size": 4, "lr": 1e-2, "threads": 1}, checkpoint={"every": 2})
    cfg.probes = parse_probes([{"name": "heldout_loss", "path": str(chats)},
                               {"name": "kl_to_base", "path": str(general), "k": 8}])
    t = Trainer(cfg)
    t.run()
    return t.run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, files):
    return _train(tmp_path_factory.mktemp("export-lora"), files, {"name": "lora", "r": 4}, "lora")


def _logits(model, tok):
    import torch

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def _reload(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_matches_the_merged_model(lora_run, tmp_path, quant):
    import torch

    from sftlab.runs import Run

    out = tmp_path / f"gguf-{quant}"
    assert main(["export", str(lora_run), "--format", "gguf", "--quant", quant, "-o", str(out)]) == 0
    merged, tok = Run(lora_run).load(None, merge=True)
    want = _logits(merged.to(torch.float32), tok)
    model, gtok = _reload(out)
    got = _logits(model, gtok)
    diff = (got - want).abs().max().item()
    assert diff <= BOUNDS[quant], f"{quant}: max abs logit difference {diff:.3g}"
    if quant != "q8_0":  # f32 and f16: the same greedy token at every position of the prompt
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    text = "Hello <|im_start|> wörld  123\n"
    assert gtok(text).input_ids == tok(text).input_ids
    assert gtok.chat_template == tok.chat_template


def test_gguf_folder_has_modelfile_card_and_metadata(lora_run, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "g"
    assert main(["export", str(lora_run), "--format", "gguf", "--quant", "f16", "-o", str(out)]) == 0
    gguf_file = next(out.glob("*.gguf"))
    fields = GGUFReader(str(gguf_file)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "token_embd.weight" in {t.name for t in GGUFReader(str(gguf_file)).tensors}
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{gguf_file.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ .Content }}" in modelfile and "ollama create" in modelfile
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "[More Information Needed]" not in card
    assert json.loads((out / "sftlab_export.json").read_text())["quant"] == "f16"


def test_modelfile_template_rebuilds_the_chat_template(tokenizer):
    from sftlab.export.modelfile import chat_parts

    parts = chat_parts(tokenizer)
    assert parts is not None and parts.default_system.startswith("You are a helpful AI assistant")
    for chat in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert parts.render(chat, True) == want


def test_card_states_scores_with_cis_and_the_retention_cost_first(lora_run, tmp_path):
    from sftlab.runs import Run

    out = tmp_path / "a"
    assert main(["export", str(lora_run), "--select", "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "[More Information Needed]" not in card and "base_model: /" not in card
    first_screen = "\n".join(card.splitlines()[:25])
    assert "Retention cost" in first_screen and "kl_to_base" in first_screen and "heldout_loss" in first_screen
    chosen = json.loads((out / "sftlab_export.json").read_text())["step"]
    entry = next(e for e in Run(lora_run).trajectory() if e["step"] == chosen)
    s = entry["scores"]["heldout_loss"]
    assert f"{s['value']:.4g} [{s['ci_low']:.4g}, {s['ci_high']:.4g}]" in first_screen
    assert "chosen by the run config's select" in card
    sha = json.loads((Path(lora_run) / "provenance.json").read_text())["data"]["train"][0]["sha256"]
    assert sha in card and "sftlab train sftlab_config.yaml" in card
    ET.fromstring((out / "frontier.svg").read_text().split("\n", 1)[1])  # a well-formed standalone SVG
    assert "(frontier.svg)" in card


def test_alpha_export_is_merged_and_carded(lora_run, tmp_path):
    out = tmp_path / "half"
    assert main(["export", str(lora_run), "--alpha", "0.5", "--format", "gguf", "--quant", "f32", "-o",
                 str(out)]) == 0
    assert json.loads((out / "sftlab_export.json").read_text())["alpha"] == 0.5
    assert "alpha 0.5" in (out / "README.md").read_text()


def test_virtual_token_methods_refuse_gguf_in_one_line(tmp_path_factory, files, tmp_path, capsys):
    run = _train(tmp_path_factory.mktemp("export-prompt"), files, {"name": "prompt", "num_virtual_tokens": 4},
                 "prompt")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "virtual tokens" in err and "--format hf" in err
    assert not (tmp_path / "g").exists()


def test_push_dry_run_lists_files_and_sends_nothing(lora_run, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["export", str(lora_run), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["push", str(out), "--repo", "me/tiny", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "README.md" in text and "adapter_model.safetensors" in text and "nothing was sent" in text


def test_push_without_token_or_network_is_one_line(lora_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    assert main(["export", str(lora_run), "-o", str(out)]) == 0
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    capsys.readouterr()
    assert main(["push", str(out), "--repo", "me/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token" in err
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a network failure, offline
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    assert main(["push", str(out), "--repo", "me/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "failed" in err
