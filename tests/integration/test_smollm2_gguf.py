"""The embedded SmolLM2-135M-Instruct GGUF, loaded by sftlab (dequantized to fp32) and written back to GGUF with no
training: transformers reads the new file with the same logits (f32: an exact round trip; f16: the same greedy
token everywhere, and a bound), the same tokenizer, chat template and pre-tokenizer name as the source file."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
F16_BOUND = 0.1  # measured max |logit difference| of the f16 file: 0.041 (SmolLM2 logits reach ~30)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_embedded_smollm2_reexports_with_the_same_logits(tmp_path, quant):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.export.gguf import GGUFMeta, read_pre, write_gguf
    from sftlab.models import load_model, load_tokenizer, resolve_model, smollm2_gguf_path

    torch.set_num_threads(1)
    ref = resolve_model("smollm2")
    model, tok = load_model(ref, "float32"), load_tokenizer(ref)
    path = write_gguf(model, tok, tmp_path / f"smol-{quant}.gguf", quant,
                      GGUFMeta("smollm2", pre=read_pre(smollm2_gguf_path())))
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        want = model.eval()(**ids).logits[0]
    del model
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = back(**ids).logits[0]
    diff = (got - want).abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert diff <= (1e-4 if quant == "f32" else F16_BOUND), f"{quant}: max abs logit difference {diff:.3g}"
    gtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Bonjour, world! <|im_start|>user\n12345 naïve"
    assert gtok(text).input_ids == tok(text).input_ids and gtok.chat_template == tok.chat_template
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
