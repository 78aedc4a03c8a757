"""The arena behind docs/img/plane.png: the tests' tiny Llama (2 layers, built in code, random weights) learning
memorisable chats, four methods at 4k trainable parameters, 32 steps, scored every 4 (about a minute on 2 CPU
cores). Then draw its plane:

    .venv/bin/python docs/img/make_tiny_arena.py /tmp/plane
    .venv/bin/python -m sftlab.docs --plane /tmp/plane/out/tiny-arena
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_tiny_model, memorisable_chats, write_jsonl  # noqa: E402

from sftlab.cli import main  # noqa: E402

tmp = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/plane-picture")
tmp.mkdir(parents=True, exist_ok=True)
model = tmp / "tiny-model"
if not model.exists():
    build_tiny_model(model)
chats = write_jsonl(tmp / "chats.jsonl", memorisable_chats(24))
general = tmp / "general.txt"
general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i}."
                               for i in range(8)))
cfg = {
    "arena": {"name": "tiny-arena", "output_dir": str(tmp / "out"), "methods": ["full", "lora", "oft", "prompt"],
              "budgets": ["4k"], "lrs": {"full": [3e-3], "lora": [3e-2], "oft": [1e-1], "prompt": [3e-1]}},
    "run": {"seed": 0},
    "model": {"path": str(model)},
    "data": {"train": [{"path": str(chats)}], "max_length": 64},
    "train": {"steps": 32, "batch_size": 4, "threads": 1},
    "checkpoint": {"every": 4},
    "logging": {"progress": False, "tensorboard": False},
    "probes": [{"name": "heldout_loss", "path": str(chats)},
               {"name": "kl_to_base", "path": str(general), "k": 8, "tail_samples": 0}],
}
path = tmp / "arena.yaml"
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
sys.exit(main(["arena", str(path)]))
