"""QLoRA (4-bit NF4 base) vs bf16 LoRA on one GPU: peak memory and the loss over ~30 steps.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_qlora.py --out $OUT          # full (H100: ~2-4 min)
    .venv/bin/python benchmarks/gpu_qlora.py --out /tmp/gq --tiny --device cpu   # end-to-end check on CPU

Workload: a randomly initialised model with a Llama-3.2-1B-like shape (vocab 128256, hidden 2048, 16 layers,
32 heads / 8 KV heads, MLP 8192, tied embeddings; ~1.24 B parameters) saved once as bf16 safetensors, then
loaded through sftlab's own path (models.load_model; quantization.bits=4 -> bitsandbytes NF4 with double
quant, compute in bf16; quantize.prepare_for_training) and wrapped by sftlab's LoRA method (r=16, alpha=32,
all-linear). Both rows: batch 8 x 512 tokens of random-but-learnable data (each row is cut at a random
offset from one fixed 64-token cycle of random token ids: each token
determines the next, so the loss falls within a few steps), sftlab's chunked SFT loss on
every position, AdamW lr 1e-3, bf16 autocast, no gradient checkpointing, one process.

Rows: lora_bf16 (base weights in bf16 on the GPU) and qlora_nf4 (base weights in 4 bits). Each row is
measured after the previous one's memory is freed: torch.cuda.max_memory_allocated() over load + 30 steps,
the memory right after loading (the weights), per-step losses and step times. The qlora row is skipped
with a message (recorded in the JSON) when bitsandbytes or its CUDA backend is unavailable.
Output: OUT/gpu_qlora.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE_1B = dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True)
SHAPE_TINY = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_qlora_out", help="output folder (default $OUT)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy shape, batch 2 x 64, 8 steps (CPU check)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only sensible with --tiny)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default 30; 8 with --tiny)")
    p.add_argument("--lr", type=float, default=0.0, help="AdamW learning rate (default 1e-3; 1e-2 with --tiny)")
    return p.parse_args(argv)


def save_random_model(folder: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def batches(vocab: int, batch: int, length: int, steps: int, device):
    """Rows cut at random offsets from one fixed random 64-token cycle: each token determines the next (a bigram
    a LoRA learns in a few steps), while the tokens themselves are random ids from the whole vocabulary."""
    g = torch.Generator().manual_seed(0)
    period = min(64, length // 2)
    cycle = torch.randint(3, vocab, (period,), generator=g)
    out = []
    for _ in range(steps):
        offsets = torch.randint(0, period, (batch, 1), generator=g)
        ids = cycle[(offsets + torch.arange(length)) % period]  # (B, L)
        targets = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)  # next token; last position none
        out.append({"input_ids": ids.to(device), "targets": targets.to(device),
                    "attention_mask": torch.ones_like(ids).to(device)})
    return out


def mem_mb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def run_row(name: str, folder: Path, quant, data, device, steps: int, lr: float) -> dict:
    from sftlab.methods import METHODS
    from sftlab.models import ModelRef, load_model
    from sftlab.objectives import forward_hidden, sft_loss
    from sftlab.quantize import prepare_for_training

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ref = ModelRef(str(folder), str(folder), "", "local")
    t0 = time.time()
    model = load_model(ref, "bfloat16", quant=quant, device=device)
    if quant is not None and quant.enabled:
        model = prepare_for_training(model)
    else:
        model.to(device)
    load_s = time.time() - t0
    weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    lora = METHODS.get("lora")
    model = lora.apply(model, lora.options(r=16, alpha=32.0))
    model.to(device)  # the adapters (the quantized base is already in place; .to moves nothing of it)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, times = [], []
    for batch in data[:steps]:
        t = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden, head = forward_hidden(model, batch)
            loss, _ = sft_loss(hidden, batch["targets"], head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # syncs the device, so the step time is the step's
        times.append(time.time() - t)
    row = {"name": name, "peak_mem_mb": mem_mb(device), "weights_mem_mb": weights_mb, "load_s": load_s,
           "losses": losses, "step_s_median": sorted(times)[len(times) // 2],
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, opt
    gc.collect()
    return row


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_qlora: no CUDA device; use --tiny --device cpu for the CPU check", file=sys.stderr)
        return 2
    shape = SHAPE_TINY if args.tiny else SHAPE_1B
    steps = args.steps or (8 if args.tiny else 30)
    lr = args.lr or (1e-2 if args.tiny else 1e-3)
    batch, length = (2, 64) if args.tiny else (8, 512)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from sftlab.config_scale import QuantizationSection
    from sftlab.errors import ModelError
    from sftlab.quantize import check_backend

    result = {"shape": shape, "batch": batch, "length": length, "steps": steps, "lr": lr, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "rows": [],
              "skipped": {}}
    data = batches(shape["vocab_size"], batch, length, steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        folder = save_random_model(Path(tmp) / "model", shape)
        result["build_s"] = time.time() - t0
        result["rows"].append(run_row("lora_bf16", folder, None, data, device, steps, lr))
        print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "losses"}), flush=True)
        q = QuantizationSection(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        try:
            check_backend(q, device)
        except ModelError as e:
            result["skipped"]["qlora_nf4"] = str(e)
            print(f"gpu_qlora: skipping the 4-bit row: {e}", flush=True)
        else:
            result["rows"].append(run_row("qlora_nf4", folder, q, data, device, steps, lr))
            print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "losses"}), flush=True)
    for row in result["rows"]:
        print(f"{row['name']}: peak {row['peak_mem_mb']:.0f} MB, weights {row['weights_mem_mb']:.0f} MB, loss "
              f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}, {row['step_s_median'] * 1000:.0f} ms/step")
    (out / "gpu_qlora.json").write_text(json.dumps(result, indent=1))
    print(f"gpu_qlora: wrote {out / 'gpu_qlora.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
