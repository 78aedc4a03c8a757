"""Build the worked example's vision-language model: SmolLM2-135M-Instruct as the language model of a LLaVA.

No pretrained vision weights are available offline, so the vision tower (a small CLIP-style encoder: 32x32
images in 8x8 patches, 3 layers of width 128) and LLaVA's two-layer projector start random; the language model
and its (tied) output head are SmolLM2's weights, copied exactly, so on text the built model IS SmolLM2 (tested:
same logits). The tokenizer is SmolLM2's plus one `<image>` token; the chat template is SmolLM2's ChatML without
its default system turn. The folder loads with AutoModelForImageTextToText + AutoProcessor (LlavaProcessor with a
PIL CLIP image processor, so torchvision is not needed). Each image is 16 `<image>` tokens.

Usage: python examples/build_smollm2_llava.py [OUT] [--lm DIR] (default: examples/smollm2-llava, and the embedded
SmolLM2 converted by `sftlab setup`; --lm takes any Llama-family causal LM folder with a ChatML tokenizer, which the
example's test uses with a tiny random one).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE, PATCH = 32, 8


def build(out: Path, seed: int = 0, lm_dir: Path | None = None) -> Path:
    import torch
    import transformers
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from sftlab.models import ensure_default_model

    lm_dir = lm_dir or ensure_default_model()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    ip_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    ip = ip_cls(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TEMPLATE)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    text = lm.config
    text.vocab_size = len(tok)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=128)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)  # the <image> row: never an input (image features)
    missing = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.tie_weights()
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.lm_head.weight)
    model.save_pretrained(str(out), safe_serialization=True)
    proc.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "smollm2-llava"))
    ap.add_argument("--lm", default="", help="the language model's folder (default: the embedded SmolLM2)")
    a = ap.parse_args()
    print(f"built {build(Path(a.out), lm_dir=Path(a.lm) if a.lm else None)}")
