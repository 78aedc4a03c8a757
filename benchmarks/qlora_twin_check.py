"""One batch of the demo task through an NF4 (bitsandbytes) base and through its dequantized twin (the same weights as
plain fp32 nn.Linear), the same LoRA (r16 all-linear, lora_B made non-zero so every factor gets a gradient), in fp32
and under bf16 autocast. Prints the loss, the logits' difference and the cosine of all LoRA gradients (docs/qlora.md).

    OMP_NUM_THREADS=1 python benchmarks/qlora_twin_check.py
"""
import json

import torch
from sftlab.cache import cache_root
from sftlab.config_scale import QuantizationSection
from sftlab.models import load_model, load_tokenizer, resolve_model
from sftlab import quantize
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
ref = resolve_model("smollm2"); tok = load_tokenizer(ref)
q = QuantizationSection(bits=4, quant_type="nf4", double_quant=True)
rows = [json.loads(l) for l in open(cache_root() / "data" / "wiki-topics-v3" / "train.jsonl")][:8]
texts = []
for r in rows:
    msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    texts.append(tok.apply_chat_template(msgs, tokenize=False))
enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=192)
labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
def build(dequant):
    m = load_model(ref, "float32", quant=q, dequantize=dequant)
    if not dequant:
        quantize.prepare_for_training(m); quantize.keep_training_layout(m)
    torch.manual_seed(1)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(2)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return m
res = {}
for name, deq in (("twin", True), ("nf4", False)):
    m = build(deq); m.train()
    for mode in ("bf16", "fp32"):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = m(**enc, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.requires_grad}
        res[(name, mode)] = (out.loss.item(), out.logits.detach().float(), grads)
    del m
for mode in ("bf16", "fp32"):
    lt, Lt, Gt = res[("twin", mode)]; ln, Ln, Gn = res[("nf4", mode)]
    cos = []; rel = []
    for n in Gt:
        a, b = Gt[n].flatten(), Gn[n].flatten()
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item()); rel.append(((a - b).norm() / a.norm()).item())
    ga = torch.cat([g.flatten() for g in Gt.values()]); gb = torch.cat([g.flatten() for g in Gn.values()])
    print(mode, f"loss twin {lt:.5f} nf4 {ln:.5f}; logits max|d| {(Lt-Ln).abs().max():.4f} mean|d| {(Lt-Ln).abs().mean():.5f};",
          f"grad cos all {torch.nn.functional.cosine_similarity(ga, gb, dim=0):.5f}, per-tensor min {min(cos):.4f} median {sorted(cos)[len(cos)//2]:.4f}, rel err median {sorted(rel)[len(rel)//2]:.4f} max {max(rel):.4f}")
# the noise floor: twin bf16 vs twin fp32
lt, Lt, Gt = res[("twin", "fp32")]; lb, Lb, Gb = res[("twin", "bf16")]
ga = torch.cat([g.flatten() for g in Gt.values()]); gb = torch.cat([g.flatten() for g in Gb.values()])
print("twin fp32 vs twin bf16:", f"loss {lt:.5f} vs {lb:.5f}; logits mean|d| {(Lt-Lb).abs().mean():.5f}; grad cos {torch.nn.functional.cosine_similarity(ga, gb, dim=0):.5f}")
