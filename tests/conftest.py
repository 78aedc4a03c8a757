"""Shared fixtures: tiny deterministic Llama models built in code, the real SmolLM2 tokenizer (shipped
under tests/assets, so no download), and small memorisable datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "smollm2-tokenizer"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_model(folder: Path, seed: int = 0, tie: bool = True, layers: int = 2, hidden: int = 64,
                     dropout: float = 0.0, init: float = 0.02, adjust=None) -> Path:
    """A 2-layer Llama with the real SmolLM2 tokenizer, saved as an HF folder.

    `init` is the weights' initializer range; `adjust(model)` may reshape the initial weights (no grad)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      attention_dropout=dropout, max_position_embeddings=1024, initializer_range=init)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory) -> dict:
    """A tiny random VLM of each family (tests/vlm_tiny.py), built once for every test that reads them."""
    from vlm_tiny import FAMILIES, build_tiny_vlm

    root = tmp_path_factory.mktemp("vlms")
    return {f: build_tiny_vlm(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def memorisable_chats(n: int = 24) -> list[dict]:
    """Short question -> fixed answer pairs: a tiny model can memorise them in a few dozen steps."""
    colours = ["red", "blue", "green", "black", "white", "pink"]
    return [{"messages": [{"role": "user", "content": f"colour of item {i}?"},
                          {"role": "assistant", "content": colours[i % len(colours)]}]} for i in range(n)]


def tiny_config(tmp_path: Path, model_dir: Path, data_path: Path, method: dict | None = None, **sections):
    """A RunConfig for a tiny run; `sections` override whole-section keys, e.g. train={'steps': 5}."""
    from sftlab.config import config_from_dict

    d = {
        "run": {"name": "run", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": method or {"name": "lora", "r": 4},
        "data": {"train": [{"path": str(data_path)}], "max_length": 64},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3},
        "checkpoint": {"every": 0},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, val in sections.items():
        d[key] = {**d.get(key, {}), **val} if isinstance(val, dict) else val  # lists (probes) replace
    return config_from_dict(d)


def task_files(folder: Path, passages: int = 12) -> tuple[Path, Path]:
    """(16 memorisable chats as JSONL, `passages` short general-text passages) written into `folder`: a task and a
    retention text for tiny runs."""
    chats = write_jsonl(folder / "chats.jsonl", memorisable_chats(16))
    general = folder / "general.txt"
    general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i}."
                                   for i in range(passages)))
    return chats, general


def arena_config(tmp: Path, model_dir: Path, data: dict | None = None, **arena) -> Path:
    """A tiny arena on memorisable chats, scored by held-out loss and KL to the base; `arena` and `data` override."""
    chats, general = task_files(tmp, passages=8)
    cfg = {
        "arena": {"name": "a", "output_dir": str(tmp / "out"), "methods": ["full", "lora", "prompt"],
                  "budgets": ["4k"], "lrs": {"full": [1e-3], "lora": [1e-3, 1e-2], "prompt": [3e-2]}, **arena},
        "run": {"seed": 0},
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(chats)}], "max_length": 64, **(data or {})},
        "train": {"steps": 4, "batch_size": 4, "threads": 1},
        "checkpoint": {"every": 2},
        "logging": {"progress": False, "tensorboard": False},
        "probes": [{"name": "heldout_loss", "path": str(chats)},
                   {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0}],
    }
    path = tmp / "arena.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
