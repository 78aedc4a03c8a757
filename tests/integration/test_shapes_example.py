"""The shapes worked example (docs/multimodal.md, issue 18 item 7) end to end on a tiny language model: the data
script, the model builder (with a 2-layer random Llama in SmolLM2's place) and configs/shapes_pipeline.yaml itself
(two stages, a few steps each), then `sftlab eval --generation` and `sftlab report`, as `make shapes-example` runs
them. Checks the example's contract, not its accuracy: the splits are disjoint, stage 1 leaves the language model
untouched (kl_to_base exactly 0) while stage 2's LoRA moves it (kl_to_base > 0), and the report shows both scores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import build_tiny_model
from sftlab.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scores(run: Path) -> dict[int, dict[str, float]]:
    """step -> score name -> value, over trajectory.jsonl's lines (scoring during training, then `sftlab eval`)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run / "trajectory.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update({k: v["value"] for k, v in row.get("scores", {}).items()})
    return out


def test_shapes_example_end_to_end(tmp_path, monkeypatch):
    shapes = tmp_path / "examples" / "shapes"
    _script("make_shapes").write(shapes, 18, 9, seed=0, n_val=9)
    images = {s: {json.loads(r).get("images", [None])[0] or json.loads(r)["messages"][0]["content"][0]["image"]
                  for r in (shapes / f"{s}.jsonl").read_text().splitlines()} for s in ("train", "heldout", "val")}
    assert [len(v) for v in images.values()] == [18, 9, 9]
    assert not (images["train"] & images["heldout"]) and not (images["val"] & (images["train"] | images["heldout"]))

    lm = build_tiny_model(tmp_path / "tiny-lm")
    _script("build_smollm2_llava").build(tmp_path / "examples" / "smollm2-llava", lm_dir=lm)

    monkeypatch.chdir(tmp_path)  # the config's paths are relative to the repository root
    steps = ["vision.train.steps=2", "vision.checkpoint.every=2", "lm.train.steps=2", "lm.checkpoint.every=1",
             "vision.train.batch_size=4", "lm.train.batch_size=4"]
    assert main(["pipeline", str(REPO / "configs" / "shapes_pipeline.yaml"), *steps]) == 0
    vision, lm_run = tmp_path / "runs" / "shapes" / "vision", tmp_path / "runs" / "shapes" / "lm"
    assert main(["eval", str(lm_run), "--generation"]) == 0
    assert main(["report", str(lm_run)]) == 0

    stage1, stage2 = _scores(vision), _scores(lm_run)
    assert sorted(stage1) == [0, 2] and sorted(stage2) == [0, 1, 2]
    assert all(s["kl_to_base"] == 0.0 for s in stage1.values())  # stage 1: the language model is frozen
    assert stage2[2]["kl_to_base"] > 0  # stage 2: LoRA on the language model moves it
    assert {"classify", "kl_to_base", "generate"} <= set(stage2[2])  # generate: the held-out score of the bar
    html = (lm_run / "report.html").read_text()
    assert "kl_to_base" in html and "classify" in html

    # the functional-token variant (configs/shapes_tagged.yaml) starts from stage 1 and trains the tagged answers
    tagged = ["train.steps=2", "checkpoint.every=2", "train.batch_size=4"]
    assert main(["train", str(REPO / "configs" / "shapes_tagged.yaml"), *tagged]) == 0
    assert main(["eval", "runs/shapes_tagged", "--generation"]) == 0
    run = tmp_path / "runs" / "shapes_tagged"
    assert {"classify", "kl_to_base", "generate"} <= set(_scores(run)[2])
    tok = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    assert {"<|Shape|>", "<|/Shape|>"} <= {t["content"] for t in tok["added_tokens"]}
