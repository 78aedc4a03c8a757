"""Image rows (issue 18): parsing, one-line errors, answer-only masks against hand-written ones, and batches.

The processors of the three tiny families (tests/vlm_tiny.py: LLaVA, Idefics3/SmolVLM, Qwen2-VL) are built in
code without their models. The expected tokens below are written out by hand from each family's chat template
and its image expansion (LLaVA: 5 <image> per 16-pixel image; Idefics3: 2 x 2 tiles + the global view, 4
<image> each, in its row/column markup; Qwen2-VL: a 16 x 16 image is 4 x 4 patches merged 2 x 2 = 4
<|image_pad|>), and which of them train: the answer and its end-of-turn token, nothing else.
"""

from __future__ import annotations

import base64
import json
from functools import partial
from pathlib import Path

import pytest

from sftlab.config import config_from_dict
from sftlab.configtools import ConfigError
from sftlab.data.collate import pad_batch
from sftlab.data.formats import read_source
from sftlab.data.images import open_image
from sftlab.data.multimodal import encoder, vision_batch
from sftlab.data.tokenize import IGNORE, tokenize_all
from sftlab.errors import DataError, ModelError
from conftest import write_jsonl
from vlm_tiny import FAMILIES, tiny_processor, write_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")


@pytest.fixture(scope="module")
def processors():
    return {f: tiny_processor(f) for f in FAMILIES}


def source(path: Path, **kw):
    return config_from_dict({"data": {"train": [{"path": str(path), **kw}]}}).data.train[0]


def records(tmp_path: Path, rows: list[dict]):
    return read_source(source(write_jsonl(tmp_path / "rows.jsonl", rows)))


def chat(user, answer="Red.", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


IMG = {"type": "image"}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


# ---------------------------------------------------------------------------------------------- parsing


def test_image_parts_column_and_base64(tmp_path):
    write_image(tmp_path / "img" / "a.png", 16, 16)
    write_image(tmp_path / "img" / "b.png", 12, 8)
    png = base64.b64encode(write_image(tmp_path / "c.png", 4, 4).read_bytes()).decode()
    recs = records(tmp_path, [
        chat([{"type": "image", "image": "img/a.png"}, text("What?")]),
        chat([IMG, text("and"), IMG], images=["img/a.png", "img/b.png"]),
        chat("Describe.", images=[f"data:image/png;base64,{png}"]),  # no part: the image goes before the text
        chat([text("only "), text("text")]),  # text parts alone: a plain string
    ])
    a, b, c, plain = recs
    (pc,) = records(tmp_path, [{"prompt": "Describe.", "completion": "A dot.", "images": ["img/b.png"]}])
    assert [r.kind for r in a.images] == ["path"] and a.images[0].value == tmp_path / "img" / "a.png"
    assert a.messages[0]["content"] == [IMG, text("What?")]
    assert [r.label for r in b.images] == ["img/a.png", "img/b.png"]
    assert c.images[0].kind == "base64" and c.messages[0]["content"] == [IMG, text("Describe.")]
    assert pc.kind == "prompt_completion" and pc.images[0].label == "img/b.png"
    assert plain.messages[0]["content"] == "only text" and plain.images is None
    assert open_image(c.images[0], c.source, 0).size == (4, 4)


@pytest.mark.parametrize("row, words", [
    (chat([IMG, text("x")], images=["img/nope.png"]),
     ["image 1 (img/nope.png) not found", "relative to the data file's folder"]),
    (chat([IMG, IMG, text("x")], images=["img/a.png"]),
     ["2 image part(s) without a source but 'images' lists 1", "one {\"type\": \"image\"} part per listed image"]),
    (chat([{"type": "image", "url": "https://example.com/cat.png"}]), ["image 1 is a URL", "does not download"]),
    ({"text": "plain", "images": ["img/a.png"]}, ["a text row cannot carry images", "use messages"]),
    (chat([{"type": "audio", "audio": "x.wav"}]), ["content[0] has type 'audio'", "text and image parts"]),
    (chat([IMG, text("x")], images=[3]), ["image 1 is int", "an image part is"]),
])
def test_bad_image_rows_are_one_line_errors(tmp_path, row, words):
    write_image(tmp_path / "img" / "a.png", 16, 16)
    with pytest.raises(DataError) as e:
        records(tmp_path, [{"text": "fine"} if "text" in row else chat("fine"), row])
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'rows.jsonl'}:2: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_unreadable_and_oversized_images(tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    write_image(tmp_path / "big.png", 40, 30)
    broken, big = records(tmp_path, [chat("x", images=["broken.png"]), chat("y", images=["big.png"])])
    with pytest.raises(DataError, match=r"rows.jsonl:1: cannot decode image 1 \(broken.png\) with Pillow .*re-save"):
        open_image(broken.images[0], broken.source, 0)
    with pytest.raises(DataError, match=r"rows.jsonl:2: image 1 \(big.png\) is 40x30 = 1,200 pixels, above "
                                        r"vision.max_image_pixels=1000; downscale"):
        open_image(big.images[0], big.source, 0, max_pixels=1000)
    assert open_image(big.images[0], big.source, 0, max_pixels=0).size == (40, 30)


def test_text_model_refuses_image_rows(tmp_path, tokenizer):
    write_image(tmp_path / "a.png", 8, 8)
    recs = records(tmp_path, [chat("x", images=["a.png"])])
    cfg = config_from_dict({}).data
    with pytest.raises(DataError, match=r"rows.jsonl:1: this row has images but the model is a text-only model"):
        tokenize_all(recs, tokenizer, cfg)


def test_vision_options_are_checked():
    assert config_from_dict({}).vision.train == ["language"]
    with pytest.raises(ConfigError, match=r"vision.train\[0\]: 'visual' is not allowed; use one of 'language'"):
        config_from_dict({"vision": {"train": ["visual"]}})
    with pytest.raises(ConfigError, match="vision.train: 'vision' is listed twice"):
        config_from_dict({"vision": {"train": ["vision", "vision"]}})
    with pytest.raises(ConfigError, match="vision.max_image_pixels: must be >= 0"):
        config_from_dict({"vision": {"max_image_pixels": -1}})
    # a config without a vision section keeps the hash it had before the section existed
    assert config_from_dict({}).hash() != config_from_dict({"vision": {"train": ["language", "projector"]}}).hash()


# ---------------------------------------------------------------------------------------------- masks


def tokenized(processor, recs, **data):
    cfg = config_from_dict({"data": {"max_length": 512, **data}}).data
    examples, _ = tokenize_all(recs, processor.tokenizer, cfg, encode=encoder(processor, cfg, 0))
    return examples


def marked(processor, ex) -> list[str]:
    """The example's tokens, each trained one in [brackets]."""
    toks = processor.tokenizer.convert_ids_to_tokens(ex.input_ids)
    return [f"[{t}]" if lab != IGNORE else t for t, lab in zip(toks, ex.labels)]


LLAVA_IMAGE = ["<image>"] * 5
IDEFICS3_IMAGE = (["<fake_token_around_image>", "<row_1_col_1>"] + ["<image>"] * 4
                  + ["<fake_token_around_image>", "<row_1_col_2>"] + ["<image>"] * 4 + ["Ċ"]
                  + ["<fake_token_around_image>", "<row_2_col_1>"] + ["<image>"] * 4
                  + ["<fake_token_around_image>", "<row_2_col_2>"] + ["<image>"] * 4 + ["ĊĊ"]
                  + ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 4 + ["<fake_token_around_image>"])
QWEN_IMAGE = ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]
QWEN_SYSTEM = ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>", "Ċ"]

HAND = {
    "llava": ["<|im_start|>", "user", "Ċ", *LLAVA_IMAGE, "Ċ", "What", "Ġcolour", "?", "<|im_end|>", "Ċ",
              "<|im_start|>", "ass", "istant", "Ċ", "[Red]", "[.]", "[<|im_end|>]", "Ċ"],
    "idefics3": ["<|im_start|>", "User", ":", *IDEFICS3_IMAGE, "What", "Ġcolour", "?", "<end_of_utterance>", "Ċ",
                 "Ass", "istant", ":", "[ĠRed]", "[.]", "[<end_of_utterance>]", "Ċ"],
    "qwen2_vl": [*QWEN_SYSTEM, "<|im_start|>", "user", "Ċ", *QWEN_IMAGE, "What", "Ġcolour", "?", "<|im_end|>", "Ċ",
                 "<|im_start|>", "ass", "istant", "Ċ", "[Red]", "[.]", "[<|im_end|>]", "Ċ"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_match_hand_written(tmp_path, processors, family):
    write_image(tmp_path / "a.png", 16, 16)
    (ex,) = tokenized(processors[family], records(tmp_path, [chat([IMG, text("What colour?")], images=["a.png"])]))
    assert marked(processors[family], ex) == HAND[family]
    assert ex.n_trained == 3


def test_image_inside_an_answer_is_never_trained(tmp_path, processors):
    """Qwen2-VL, two turns; the second answer shows an image: its markup and expansion stay untrained, the
    answer's text around it trains, the prompt of either turn does not."""
    write_image(tmp_path / "a.png", 16, 16)
    write_image(tmp_path / "b.png", 16, 16, seed=1)
    row = {"messages": [{"role": "user", "content": [IMG, text("Hi")]}, {"role": "assistant", "content": "Red."},
                        {"role": "user", "content": "Show"},
                        {"role": "assistant", "content": [text("Here"), IMG, text("done")]}],
           "images": ["a.png", "b.png"]}
    (ex,) = tokenized(processors["qwen2_vl"], records(tmp_path, [row]))
    assert marked(processors["qwen2_vl"], ex) == [
        *QWEN_SYSTEM, "<|im_start|>", "user", "Ċ", *QWEN_IMAGE, "Hi", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ", "[Red]", "[.]", "[<|im_end|>]", "Ċ",
        "<|im_start|>", "user", "Ċ", "Show", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ", "[Here]", *QWEN_IMAGE, "[done]", "[<|im_end|>]", "Ċ"]
    assert ex.token_inputs["mm_token_type_ids"] == [int(t == "<|image_pad|>") for t in
                                                    processors["qwen2_vl"].tokenizer.convert_ids_to_tokens(ex.input_ids)]


def test_prompt_completion_rows_with_images(tmp_path, processors):
    write_image(tmp_path / "a.png", 16, 16)
    (ex,) = tokenized(processors["llava"], records(tmp_path, [{"prompt": "What colour?", "completion": "Red.",
                                                               "images": ["a.png"]}]))
    assert marked(processors["llava"], ex) == HAND["llava"]


def test_literal_image_token_in_text_is_refused(tmp_path, processors):
    write_image(tmp_path / "a.png", 16, 16)
    recs = records(tmp_path, [chat([IMG, text("look <image> here")], images=["a.png"])])
    with pytest.raises(DataError, match=r"rows.jsonl:1: the text holds the image token '<image>' 2 times for 1 "
                                        r"image\(s\); remove the literal token"):
        tokenized(processors["llava"], recs)


def test_rows_with_images_are_dropped_not_truncated(tmp_path, processors):
    write_image(tmp_path / "a.png", 16, 16)
    recs = records(tmp_path, [chat([IMG, text("What colour?")], images=["a.png"]), chat("Hi")])
    kept = tokenized(processors["qwen2_vl"], recs, max_length=30)  # row 1: 33 tokens, row 2: 19
    assert [e.source.rsplit(":", 1)[1] for e in kept] == ["2"]
    with pytest.raises(DataError, match=r"rows.jsonl:1: 33 tokens with its images, above data.max_length=30; rows "
                                        r"with images are never truncated"):
        tokenized(processors["qwen2_vl"], recs, max_length=30, overlong="error")
    with pytest.raises(ModelError, match="data.template is 'raw', which cannot place images"):
        tokenized(processors["qwen2_vl"], recs, template="raw")


# ---------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_of_different_image_counts_and_sizes(tmp_path, processors, family):
    """Rows with 2, 0 and 1 images of different sizes: the batch's image tensors equal what the processor makes
    for the same rows in one call, and each row's image tokens are where the model will put its features."""
    proc = processors[family]
    for name, (w, h) in {"a.png": (16, 16), "b.png": (12, 28), "c.png": (32, 20)}.items():
        write_image(tmp_path / name, w, h, seed=w)
    recs = records(tmp_path, [chat([IMG, text("two"), IMG], images=["a.png", "b.png"]), chat("none"),
                              chat([IMG, text("one")], images=["c.png"])])
    examples = tokenized(proc, recs)
    batch = pad_batch(examples, proc.tokenizer.pad_token_id, vision=partial(vision_batch, proc, max_pixels=0))
    images = [[open_image(r, e.source, i) for i, r in enumerate(e.images or ())] for e in examples]
    texts = [proc.tokenizer.decode(e.input_ids) for e in examples]  # expanded already: tokenize without images
    ref = proc.image_processor(images=images, return_tensors="pt")
    vision = batch["vision"]
    for key in ref:
        assert vision[key].equal(ref[key]), key
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    n_image_tokens = [int((row == image_id).sum()) for row in batch["input_ids"]]
    if family == "llava":  # 5 tokens per image, images concatenated in row order
        assert n_image_tokens == [10, 0, 5] and vision["pixel_values"].shape == (3, 3, 16, 16)
    elif family == "qwen2_vl":  # one grid per image; tokens = patches / merge^2
        grids = vision["image_grid_thw"]
        assert grids.shape == (3, 3) and sum(n_image_tokens) == int(grids.prod(-1).sum()) // 4
        assert vision["mm_token_type_ids"].shape == batch["input_ids"].shape
    else:  # Idefics3: rows padded to the most tiles, a pixel mask says which are real
        assert vision["pixel_values"].shape[:2] == (3, max(len(t) for t in ref["pixel_values"]))
        assert n_image_tokens[1] == 0 and not vision["pixel_attention_mask"][1].any()
    assert texts[1].count(proc.image_token) == 0
    json.dumps(batch["n_tokens"])  # plain int


def test_datasets_images(tmp_path):
    """A `datasets` image column holds decoded images, or {"bytes", "path"} entries (its Image feature)."""
    from PIL import Image

    from sftlab.data.images import to_ref

    png = write_image(tmp_path / "a.png", 6, 4).read_bytes()
    ref = to_ref({"bytes": png, "path": "a.png"}, tmp_path, "ds[train]:row 0", 0)
    assert ref.kind == "bytes" and open_image(ref, "ds[train]:row 0", 0).size == (6, 4)
    decoded = Image.new("RGBA", (5, 3))
    ref = to_ref(decoded, tmp_path, "ds[train]:row 1", 0)
    assert ref.kind == "pil" and open_image(ref, "ds[train]:row 1", 0).mode == "RGB"
    with pytest.raises(DataError, match=r"ds\[train\]:row 1: image 1 \(decoded image\) is 5x3 = 15 pixels"):
        open_image(ref, "ds[train]:row 1", 0, max_pixels=10)
