"""Functional tokens on vision-language models (issue 18 item 4, ATLAS-style): new tokens added through the
processor's tokenizer, their rows only trained (the old rows bitwise), the processor saved with them, and the
run reloaded by plain transformers + PEFT (AutoProcessor, resize, the token adapter, the method's adapter) to the
same logits; the tagged answers (`<|Colour|>red<|/Colour|> red`: the visual-operation token before the answer)
are learned. Tiny random models of three families (tests/vlm_tiny.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_jsonl
from sftlab.train.loop import train
from vlm_tiny import COLOURS, FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")

OPEN, CLOSE = "<|Colour|>", "<|/Colour|>"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("tagged")
    rows = []
    for i in range(8):
        c = list(COLOURS)[i % 4]
        Image.new("RGB", (16, 16), COLOURS[c]).save(d / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": f"{OPEN}{c}{CLOSE} {c}"}], "images": [f"{i}.png"]})
    return write_jsonl(d / "train.jsonl", rows)


def processor_from(folder):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, ValueError, OSError):  # Qwen2-VL's video processor needs torchvision
        import transformers

        from sftlab.models import image_only_processor

        cls = getattr(transformers, json.loads((folder / "processor_config.json").read_text())["processor_class"])
        return image_only_processor(cls).from_pretrained(folder)


def inputs(processor, image, answer: str = ""):
    """The processor's inputs for the question about `image`, with the start of an answer when given."""
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + answer
    return processor(text=[text], images=[[Image.open(image).convert("RGB")]], return_tensors="pt",
                     add_special_tokens=False)


def plain_reload(adapter, base_dir):
    """The plain recipe: AutoProcessor, the base resized, the token adapter merged (all but LoRA), the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    proc = processor_from(adapter)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    base.resize_token_embeddings(len(proc.tokenizer), pad_to_multiple_of=64)
    if (adapter / "tokens").is_dir():
        base = PeftModel.from_pretrained(base, str(adapter / "tokens")).merge_and_unload()
    return PeftModel.from_pretrained(base, str(adapter)).eval(), proc


@pytest.mark.parametrize("family, method", [(f, "lora") for f in FAMILIES] + [("llava", "oft"), ("qwen2_vl", "oft")])
def test_functional_tokens_train_only_their_rows_and_reload_plainly(tmp_path, vlm_dirs, tagged, family, method):
    from transformers import AutoModelForImageTextToText

    from sftlab.runs import Run, export

    tokens = [{"text": OPEN}, {"text": CLOSE, "init": "description", "description": "end of the colour"}]
    cfg = tiny_config(tmp_path, vlm_dirs[family], tagged, {"name": method, **({"r": 8} if method == "lora" else {})},
                      model={"path": str(vlm_dirs[family]), "new_tokens": tokens},
                      train={"steps": 30, "batch_size": 8, "lr": 3e-2, "weight_decay": 0.1},
                      data={"train": [{"path": str(tagged)}], "max_length": 256}, checkpoint={"every": 30})
    run_dir = train(cfg)
    run = Run(run_dir)
    base = AutoModelForImageTextToText.from_pretrained(vlm_dirs[family])
    emb0, head0 = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    n0 = emb0.shape[0]
    merged = run.load(merge=True)[0]
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert torch.equal(emb[:n0], emb0) and torch.equal(head[:n0], head0)  # old rows bitwise, weight decay on
    assert not torch.equal(emb[n0:n0 + 2], run.load_initial().get_input_embeddings().weight[n0:n0 + 2])
    assert (run_dir / "tokenizer" / "processor_config.json").is_file()  # the processor, with the new tokens

    model, tok = run.load()
    model.eval()
    adapter = tmp_path / "adapter"
    export(str(run_dir), None, str(adapter), merge=False)
    plain, proc = plain_reload(adapter, vlm_dirs[family])
    assert proc.tokenizer.convert_tokens_to_ids(OPEN) == n0 == tok.convert_tokens_to_ids(OPEN)
    batch = inputs(proc, tagged.parent / "1.png")
    with torch.no_grad():
        ours, theirs = model(**batch).logits, plain(**batch).logits
        V = len(proc.tokenizer)  # padding rows: zero in sftlab, random after a plain resize (never tokens)
        assert torch.allclose(ours[..., :V], theirs[..., :V], atol=1e-5)
        # the tagged answers were learned: the plain reload scores `<|Colour|>blue<|/Colour|> blue` far above the
        # starting point (a 2-layer random model's free-running text still wanders: no generation is asserted here)
        start = run.load_initial().eval()
        forced = inputs(proc, tagged.parent / "1.png", answer=f"{OPEN}blue{CLOSE} blue")
        n = len(proc.tokenizer(f"{OPEN}blue{CLOSE} blue", add_special_tokens=False)["input_ids"])
        ids = forced["input_ids"][0, -n:]
        def answer_logprob(m):
            return float(m(**forced).logits[0, -n - 1:-1, :V].log_softmax(-1).gather(-1, ids[:, None]).sum())
        assert answer_logprob(plain) > answer_logprob(start) + 5
