"""Probes on vision-language runs (issue 18 item 5), on tiny random models of three families (tests/vlm_tiny.py):
classify, choice, generate and heldout_loss read image rows through the processor exactly as training does,
kl_to_base scores text against the base, during training and offline alike; frontier, rewinding (checkpoints,
alpha search, the merged-linear path of an OFT run), export and the report work on VLM runs; an exported adapter
loads with plain transformers + PEFT and answers as sftlab's generate probe does.

The task: 16x16 single-colour images, the answer is the colour.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_jsonl
from sftlab.train.loop import train
from vlm_tiny import COLOURS, FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")



@pytest.fixture(scope="module")
def colour_task(tmp_path_factory):
    """train.jsonl (chats with an image part), classify.jsonl (prompt + images + label), choice.jsonl (messages
    with an image part, choices, answer), generate.jsonl (prompt + images + completion), general.txt."""
    from PIL import Image

    d = tmp_path_factory.mktemp("colours")
    (d / "img").mkdir()
    names = list(COLOURS)
    train_rows, cls, cho, gen = [], [], [], []
    for i in range(8):
        c = names[i % 4]
        Image.new("RGB", (16, 16), COLOURS[c]).save(d / f"img/{i}.png")
        train_rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"},
                                                                     {"type": "text", "text": "Colour?"}]},
                                        {"role": "assistant", "content": c}]})
        cls.append({"prompt": "Colour?", "images": [f"img/{i}.png"], "label": c})
        cho.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                    "images": [f"img/{i}.png"], "choices": names, "answer": i % 4})
        gen.append({"prompt": "Colour?", "images": [f"img/{i}.png"], "completion": c})
    (d / "general.txt").write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town."
                                               for i in range(4)))
    return {"train": write_jsonl(d / "train.jsonl", train_rows), "classify": write_jsonl(d / "classify.jsonl", cls),
            "choice": write_jsonl(d / "choice.jsonl", cho), "generate": write_jsonl(d / "generate.jsonl", gen),
            "general": d / "general.txt"}


def probes(task) -> list[dict]:
    return [{"name": "classify", "path": str(task["classify"])},
            {"name": "choice", "path": str(task["choice"])},
            {"name": "generate", "path": str(task["generate"]), "max_new_tokens": 3, "samples": 8},
            {"name": "heldout_loss", "path": str(task["train"])},
            {"name": "kl_to_base", "path": str(task["general"]), "k": 4, "tail_samples": 0, "max_length": 16}]


def vlm_run(tmp_path, model_dir, task, method, steps=8, lr=1e-2, **sections):
    cfg = tiny_config(tmp_path, model_dir, task["train"], method, train={"steps": steps, "batch_size": 4, "lr": lr},
                      data={"train": [{"path": str(task["train"])}], "max_length": 256}, checkpoint={"every": 4},
                      probes=probes(task), **sections)
    return train(cfg)


def trajectory(run_dir) -> dict[int, dict]:
    from sftlab.rundir_format import read_trajectory

    return {e["step"]: e.get("scores", {}) for e in read_trajectory(run_dir)}


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_rows_render_as_training_does(vlm_dirs, colour_task, family):
    """A probe's (image row, answer) example is the training example of the same chat: ids, labels, images."""
    from sftlab.data.formats import read_source
    from sftlab.config import DataSource
    from sftlab.data.multimodal import tokenize_multimodal
    from sftlab.models import load_processor, resolve_model
    from sftlab.probes.likelihood import answer_examples, data_section
    from sftlab.probes.texts import prompt_and_images, read_rows

    proc = load_processor(resolve_model(str(vlm_dirs[family])))
    rec = read_source(DataSource(path=str(colour_task["train"])))[1]
    trained = tokenize_multimodal(proc, rec, data_section("auto", 256), 1 << 24)
    for name in ("classify", "choice"):
        place, row = read_rows(str(colour_task[name]), name)[1]
        msgs, refs = prompt_and_images(row, place, colour_task[name].parent)
        (probed,) = answer_examples(proc.tokenizer, [msgs], ["blue"], "auto", 256, [place], [refs])
        assert probed.input_ids == trained.input_ids and probed.labels == trained.labels
        assert [r.value for r in probed.images] == [r.value for r in trained.images]
        assert probed.token_inputs == trained.token_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_probes_score_image_rows_during_training_and_offline(tmp_path, vlm_dirs, colour_task, family):
    from sftlab.scoring import evaluate_run

    run_dir = vlm_run(tmp_path, vlm_dirs[family], colour_task, {"name": "lora", "r": 4})
    during = trajectory(run_dir)
    for step in (0, 4, 8):
        assert {"classify", "choice", "heldout_loss", "kl_to_base"} <= set(during[step]), during[step]
        assert during[step]["classify"]["n"] == 8 and during[step]["choice"]["n"] == 8
    assert during[0]["kl_to_base"]["value"] == 0.0 and during[8]["kl_to_base"]["value"] > 0
    assert during[8]["heldout_loss"]["value"] < during[0]["heldout_loss"]["value"]
    evaluate_run(str(run_dir), progress=False)  # offline: the same numbers
    again = trajectory(run_dir)
    for step in (4, 8):
        for name in ("classify", "choice", "heldout_loss"):
            assert again[step][name]["value"] == pytest.approx(during[step][name]["value"], abs=1e-6)
    evaluate_run(str(run_dir), steps=[0, 8], which="generation", progress=False)
    gen = trajectory(run_dir)[8]["generate"]
    assert gen["n"] == 8 and len(gen["extra"]["samples"]) == 8


def plain_greedy(model, processor, image_path, max_new_tokens: int) -> str:
    """Greedy answer to 'Colour?' about one image with nothing but transformers (and PEFT)."""
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(image_path).convert("RGB")]], return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_adapter_answers_as_sftlab_evaluates(tmp_path, vlm_dirs, colour_task, family):
    """`sftlab export` of a VLM LoRA run: AutoProcessor + AutoModelForImageTextToText + PeftModel give the same
    greedy answers as sftlab's generate probe on 5 held-out images."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sftlab.cli import main
    from sftlab.models import image_only_processor
    from sftlab.scoring import evaluate_run

    run_dir = vlm_run(tmp_path, vlm_dirs[family], colour_task, {"name": "lora", "r": 4}, steps=4)
    evaluate_run(str(run_dir), steps=[4], which="generation", progress=False)
    samples = trajectory(run_dir)[4]["generate"]["extra"]["samples"][:5]
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "-o", str(out)]) in (0, None)
    try:
        processor = AutoProcessor.from_pretrained(out)
    except (ImportError, ValueError, OSError):  # Qwen2-VL's video processor needs torchvision
        import transformers

        cls = getattr(transformers, json.loads((out / "processor_config.json").read_text())["processor_class"])
        processor = image_only_processor(cls).from_pretrained(out)
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_path), out).eval()
    rows = [json.loads(line) for line in colour_task["generate"].read_text().splitlines()]
    for s in samples:
        line = int(s["source"].rsplit(":", 1)[1])
        image = colour_task["generate"].parent / rows[line - 1]["images"][0]
        assert plain_greedy(model, processor, image, 3) == s["output"], s


def test_frontier_rewind_merged_linear_and_report_on_a_vlm_run(tmp_path, vlm_dirs, colour_task, capsys):
    """An OFT run on the tiny LLaVA: frontier, rewinding with an alpha search, the merged-linear (additive) path of
    its rotation, an interpolated export that loads with plain transformers, and the report."""
    from transformers import AutoModelForImageTextToText

    from sftlab.cli import main
    from sftlab.interpolate import Interpolator
    from sftlab.probes import ProbeContext, build_probe
    from sftlab.runs import Run
    from sftlab.scoring import score_model

    run_dir = vlm_run(tmp_path, vlm_dirs["llava"], colour_task, {"name": "oft", "block_size": 4}, steps=8, lr=5e-2)
    assert trajectory(run_dir)[8]["classify"]["value"] > trajectory(run_dir)[0]["classify"]["value"]
    assert main(["frontier", str(run_dir)]) in (0, None)
    assert "classify" in capsys.readouterr().out
    out = tmp_path / "rewound"
    assert main(["rewind", str(run_dir), "--search", "--alphas", "0,0.5,1", "-o", str(out)]) in (0, None)
    assert "search between the base and step" in capsys.readouterr().out
    AutoModelForImageTextToText.from_pretrained(out)  # a merged VLM folder
    run = Run(run_dir)
    probe = build_probe("classify", {"path": str(colour_task["classify"])})
    ctx = ProbeContext(n_boot=10)
    base = score_model(run.load_initial(), run.tokenizer(), [probe], ctx)["classify"]["value"]
    interp = Interpolator(run, 8, kind="additive")  # W0 + a (W0 R - W0): the merged rotation's dense delta
    at0 = score_model(interp.at(0.0), interp.tokenizer, [probe], ctx)["classify"]["value"]
    at1 = score_model(interp.at(1.0), interp.tokenizer, [probe], ctx)["classify"]["value"]
    assert at0 == base and at1 == trajectory(run_dir)[8]["classify"]["value"]
    assert main(["report", str(run_dir)]) in (0, None)
    html = (run_dir / "report.html").read_text()
    assert "classify" in html and "kl_to_base" in html
