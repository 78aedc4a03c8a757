"""Vision-language models through sftlab's own loop (issue 18), on tiny random models of three families built in
code (tests/vlm_tiny.py: LLaVA, Idefics3/SmolVLM, Qwen2-VL): training steps lower the loss, checkpoints reload with
plain transformers (+ PEFT) and give the trained model's logits, and only the parts in vision.train change.

The data: rows with 0, 1 or 2 images of different sizes, each with a short fixed answer a tiny model memorises.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_jsonl
from sftlab.train.loop import train
from vlm_tiny import FAMILIES, write_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")

ANSWERS = ["red", "blue", "green", "black"]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """8 rows: image counts 1, 2, 0, 1, ... and sizes from 12 to 32 pixels a side."""
    d = tmp_path_factory.mktemp("vlm-data")
    rows = []
    for i in range(8):
        n = (1, 2, 0, 1)[i % 4]
        names = [f"img/{i}-{k}.png" for k in range(n)]
        for k, name in enumerate(names):
            write_image(d / name, 12 + 4 * ((i + k) % 6), 16 + 4 * (i % 3), seed=10 * i + k)
        user = [{"type": "image"} for _ in names] + [{"type": "text", "text": f"Colour of item {i}?"}]
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": ANSWERS[i % 4]}], "images": names})
    return write_jsonl(d / "train.jsonl", rows)


def run(tmp_path, model_dir, data, method, steps=6, **sections):
    trainer = {}
    cfg = tiny_config(tmp_path, model_dir, data, method, train={"steps": steps, "batch_size": 4, "lr": 1e-2},
                      data={"train": [{"path": str(data)}], "max_length": 256}, **sections)
    run_dir = train(cfg, hooks={"after_setup": lambda t: trainer.setdefault("t", t)})
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer["t"], run_dir, losses


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch.get("vision", {})).logits
    model.train(was)
    return out


def first_batch(trainer) -> dict:
    batch = trainer.plan.collate(trainer.plan.epoch(0)[0], trainer.tokenizer.pad_token_id)
    assert "pixel_values" in batch["vision"]
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lowers_the_loss_and_reloads(tmp_path, vlm_dirs, image_data, family):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    trainer, run_dir, losses = run(tmp_path, vlm_dirs[family], image_data, {"name": "lora", "r": 4})
    assert losses[-1] < losses[0] - 0.5, losses
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["vision"]["train"] == ["language"]
    assert prov["vision"]["trainable_by_part"] == {"language": prov["trainable_params"], "projector": 0, "vision": 0}
    batch = first_batch(trainer)
    base = AutoModelForImageTextToText.from_pretrained(vlm_dirs[family])
    before = logits(base, batch)
    reloaded = PeftModel.from_pretrained(base, run_dir / "checkpoints" / "step-000006")
    after = logits(reloaded, batch)
    assert torch.allclose(after, logits(trainer.model, batch), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # the adapter changed the model


@pytest.mark.parametrize("family", FAMILIES)
def test_full_trains_only_the_selected_parts_and_reloads(tmp_path, vlm_dirs, image_data, family):
    """Full fine-tuning with vision.train [language, projector]: the vision tower stays bitwise the base's."""
    from transformers import AutoModelForImageTextToText

    from sftlab.methods.vlm_parts import part_of, part_scopes

    trainer, run_dir, losses = run(tmp_path, vlm_dirs[family], image_data, {"name": "full"}, steps=3,
                                   vision={"train": ["language", "projector"]})
    assert losses[-1] < losses[0], losses
    reloaded = AutoModelForImageTextToText.from_pretrained(run_dir / "checkpoints" / "step-000003")
    base = AutoModelForImageTextToText.from_pretrained(vlm_dirs[family])
    scopes = part_scopes(base)
    changed = {"language": False, "projector": False, "vision": False}
    base_params = dict(base.named_parameters())
    for name, p in reloaded.named_parameters():
        changed[part_of(name, scopes)] |= not torch.equal(p, base_params[name])
    assert changed == {"language": True, "projector": True, "vision": False}
    prov = json.loads((run_dir / "provenance.json").read_text())["vision"]
    assert prov["train"] == ["language", "projector"] and prov["trainable_by_part"]["vision"] == 0
    batch = first_batch(trainer)
    assert torch.allclose(logits(reloaded, batch), logits(trainer.model, batch), atol=1e-5)


@pytest.mark.parametrize("family, parts, inside, outside", [
    ("llava", ["vision"], "vision_tower", "language_model"),
    ("llava", ["projector"], "multi_modal_projector", "vision_tower"),
    ("idefics3", ["projector", "language"], "connector", "vision_model"),
    ("qwen2_vl", ["projector"], "visual.merger", "visual.blocks"),
    ("qwen2_vl", ["vision"], "visual.blocks", "visual.merger"),
])
def test_adapters_go_on_the_selected_parts(vlm_dirs, family, parts, inside, outside):
    from transformers import AutoModelForImageTextToText

    from sftlab.methods import METHODS, vlm_parts

    model = AutoModelForImageTextToText.from_pretrained(vlm_dirs[family])
    vlm_parts.select(model, parts)
    spec = METHODS.get("lora")
    model = spec.apply(model, spec.options(r=2))
    adapted = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any(inside in n for n in adapted) and not any(outside in n for n in adapted)
    by_part = vlm_parts.trainable_by_part(model)
    assert set(p for p, n in by_part.items() if n) == set(parts) - ({"language"} - set(parts))


def test_inspect_reports_images_and_refusals(tmp_path, vlm_dirs, image_data, capsys):
    from sftlab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {vlm_dirs['qwen2_vl']}}}\ndata: {{train: [{{path: {image_data}}}], "
                   "max_length: 256}\n")
    assert main(["data", "inspect", str(cfg), "-n", "2"]) in (0, None)
    out = capsys.readouterr().out
    assert "1 image: " in out and "2 images: " in out and "<|image_pad|>x" in out
    assert "train images: 8 in 6 of 8 rows (up to 2 per row); sizes (width x height) from" in out
    for override, words in (["data.packing=true", "rows with images are not packed"],
                            ["method=prompt", "prepends virtual tokens"]):
        assert main(["train", str(cfg), override, f"run.output_dir={tmp_path}/runs"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_arena_budgets_count_what_trains(tmp_path, vlm_dirs, image_data):
    """An arena on a VLM sizes its adapters on the language model, which is what trains by default (the count
    equals the trainable parameters of the model the trainer builds); other parts are not counted yet, so an
    arena that trains them is refused in one line rather than sized wrongly."""
    import yaml

    from conftest import arena_config
    from sftlab.arena import load_arena, plan_trials
    from sftlab.train.loop import Trainer

    path = arena_config(tmp_path, vlm_dirs["llava"], methods=["lora"], lrs={"lora": [1e-3]},
                        data={"train": [{"path": str(image_data)}], "max_length": 256})
    arena, base = load_arena(path)
    (trial,) = plan_trials(arena, base)
    assert not trial.refused and abs(trial.trainable - 4000) / 4000 <= 0.10
    trainer = Trainer(trial.cfg)
    trainer.setup()
    assert trainer.params["trainable_params"] == trial.trainable
    cfg = yaml.safe_load(path.read_text())
    cfg["vision"] = {"train": ["language", "vision"]}
    path.write_text(yaml.safe_dump(cfg))
    arena, base = load_arena(path)
    (trial,) = plan_trials(arena, base)
    assert trial.refused and "counts the language model only" in trial.note


def test_text_model_refuses_the_vision_section(tmp_path, tiny_model_dir, image_data):
    from sftlab.errors import DataError, ModelError

    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "ok"}]}] * 4)
    cfg = tiny_config(tmp_path, tiny_model_dir, chats, vision={"train": ["vision"]})
    with pytest.raises(ModelError, match="is a text-only model; the vision section applies to vision-language"):
        train(cfg)
    cfg = tiny_config(tmp_path, tiny_model_dir, image_data, run={"name": "r2"})
    with pytest.raises(DataError, match=r"train.jsonl:1: this row has images but the model is a text-only model"):
        train(cfg)
