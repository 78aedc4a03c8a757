"""Save the NF4 (double quant) base of SmolLM2-135M-Instruct, dequantized, as a full-precision folder: the weights a
QLoRA adapter trains against, for training its 'dequantized twin' without bitsandbytes (docs/qlora.md).

    python benchmarks/qlora_twin.py nf4-deq
    sftlab arena configs/qlora_arena.yaml arena.name=qlora-twin arena.quantizations=[none] model.path=nf4-deq
"""

import sys

from sftlab.config_scale import QuantizationSection
from sftlab.models import load_model, load_tokenizer, resolve_model


def main(out: str) -> None:
    ref = resolve_model("smollm2")
    model = load_model(ref, "float32", quant=QuantizationSection(bits=4, quant_type="nf4", double_quant=True),
                       dequantize=True)
    model.hf_quantizer = None  # a dequantized model is a plain one: transformers refuses to save a 'quantized' one
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    load_tokenizer(ref).save_pretrained(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nf4-deq")
