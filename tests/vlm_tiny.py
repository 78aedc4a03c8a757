"""Tiny random vision-language models of three families, built in code (no hub), saved as HF folders with
their processors: LLaVA (a CLIP vision tower + projector + Llama), Idefics3/SmolVLM (a SigLIP-style vision
model + pixel-shuffle connector + Llama, images split into tiles) and Qwen2-VL (a patch-merging vision
transformer inside the model + a Qwen2 language model with multimodal rotary positions).

Each uses the real SmolLM2 tokenizer (tests/assets) with the family's image tokens added, and a chat template
written like the family's real one (SmolVLM's and Qwen2-VL's are copied, without video). Images are tiny
(16-32 pixels a side) so a training step takes well under a second on one core.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llava", "idefics3", "qwen2_vl")
# solid colours the tests draw (a colour-naming task)
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "black": (0, 0, 0)}
TOKENIZER_DIR = Path(__file__).parent / "assets" / "smollm2-tokenizer"

LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolVLM's template (HuggingFaceTB/SmolVLM-Instruct), verbatim
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# Qwen2-VL-Instruct's template without its video branch
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' "
    "in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2}


def image_processor(name: str, **kw):
    """The PIL-backed image processor (transformers >= 5.2x names it *Pil; earlier the plain name is PIL)."""
    import transformers

    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kw)


def image_only(cls):
    """`cls` without its video processor: transformers builds video processors with torchvision only."""
    from sftlab.models import image_only_processor

    return image_only_processor(cls)


def _tokenizer(extra: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return tok


def _llava_processor(tok):
    from transformers import LlavaProcessor

    # 16-pixel images in 8-pixel patches, plus CLIP's class token: 5 <image> tokens per image
    return LlavaProcessor(image_processor=image_processor("CLIPImageProcessor", size={"shortest_edge": 16},
                                                          crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


def _llava(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(vocab_size=len(tok), **TEXT),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg)


def _idefics3_processor(tok):
    from transformers import Idefics3Processor

    # 16-pixel tiles of (16/4)^2 patches, pixel-shuffled by 2: 4 <image> tokens per tile; images up to 32
    # pixels a side are split into up to 2 x 2 tiles plus the global view
    ip = image_processor("Idefics3ImageProcessor", size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)


def _idefics3(tok):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig

    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=4)
    cfg = Idefics3Config(vision_config=vision, text_config=LlamaConfig(vocab_size=len(tok), **TEXT), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration(cfg)


def _qwen2_vl_processor(tok):
    from transformers import Qwen2VLProcessor

    # 4-pixel patches merged 2 x 2: a 16 x 16 image is 16 patches and 4 <|image_pad|> tokens; sizes vary per image
    ip = image_processor("Qwen2VLImageProcessor", patch_size=4, merge_size=2, temporal_patch_size=2,
                         min_pixels=8 * 8, max_pixels=32 * 32)
    return image_only(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)


def _qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"),
                                                         ("vision_end_token_id", "<|vision_end|>"))}
    text = {**TEXT, "vocab_size": len(tok), "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    cfg = Qwen2VLConfig(text_config=text, vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64,
                                                         "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2},
                        **ids)
    return Qwen2VLForConditionalGeneration(cfg)


EXTRA_TOKENS = {"llava": ["<image>"],
                "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
                "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]}
MODELS = {"llava": _llava, "idefics3": _idefics3, "qwen2_vl": _qwen2_vl}
PROCESSORS = {"llava": _llava_processor, "idefics3": _idefics3_processor, "qwen2_vl": _qwen2_vl_processor}


def tiny_processor(family: str):
    """The family's processor (tokenizer with its image tokens, image processor, chat template), no model."""
    return PROCESSORS[family](_tokenizer(EXTRA_TOKENS[family]))


def build_tiny_vlm(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random VLM of `family` with its processor, saved to `folder` (safetensors)."""
    import torch

    proc = tiny_processor(family)
    torch.manual_seed(seed)
    model = MODELS[family](proc.tokenizer)
    model.save_pretrained(str(folder), safe_serialization=True)
    proc.save_pretrained(str(folder))
    return Path(folder)


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A random RGB PNG of the given size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(path)
    return path
