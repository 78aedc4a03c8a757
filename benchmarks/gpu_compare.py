"""TRL SFTTrainer vs sftlab's Trainer on one GPU: training throughput and peak GPU memory.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_compare.py --out $OUT          # full (H100: ~3-5 min)
    python3 benchmarks/gpu_compare.py --out /tmp/gc --quick                  # fewer steps / rows
    .venv/bin/python benchmarks/gpu_compare.py --out /tmp/gc --device cpu --tiny   # end-to-end check on CPU

Workload (TRL's reference shape): a randomly initialised model with SmolLM2-135M's exact shape
(Llama, vocab 49152, hidden 576, MLP 1536, 30 layers, 9 heads / 3 KV heads, head_dim 64, tied
embeddings, rope_theta 1e5) saved as fp32 safetensors with the real SmolLM2 tokenizer
(tests/assets/smollm2-tokenizer); synthetic single-turn chats (short user turn, long assistant
answer of random words) whose rendered length is uniform in [64, 1024] tokens; loss on the
assistant turn only (answer + <|im_end|>); batch 16, max_length 1024.

Rows (each: TRL first, then sftlab, in this one process, GPU memory freed in between):
  lora_padded  LoRA r=16 alpha=32 dropout 0, all-linear; rows padded to the batch's longest
  full_padded  full fine-tuning, padded
  lora_packed  LoRA, packed (TRL: packing=True, bfd, padding-free; sftlab: data.packing=true, FFD)
  full_packed  full fine-tuning, packed

Precision, matched: weights loaded in fp32 and kept fp32 (the optimizer's master copy), forward
under bf16 autocast. That is what TRL does with `bf16=True` when handed an fp32 model (accelerate's
autocast); sftlab does the same with model.dtype=float32 + train.precision=bf16. (Give TRL a hub
id instead and transformers v5 loads the checkpoint's own dtype, bf16 for SmolLM2, which is pure
bf16 training without fp32 master weights: a different, cheaper job, not measured here.)

Other settings, the same on both sides: AdamW (torch.optim.AdamW, TRL optim="adamw_torch";
transformers' default would be the fused variant), lr 1e-4 linear decay, no warmup, weight decay 0,
grad-norm clip 1.0, grad accum 1, sdpa attention, no gradient checkpointing, no eval, no saving,
log every step. TRL keeps its default per-step metrics (entropy, token accuracy).

Measured per step: the wall time between consecutive step ends, each end after
torch.cuda.synchronize() (so data loading/collation, forward, backward, clip and optimizer step are
all in it), and the non-pad input tokens of the step. Throughput = tokens / time over steps after
the first --warmup steps: median of per-step rates and overall (sum tokens / sum time). Peak
memory = torch.cuda.max_memory_allocated() over the whole run (reset before building each trainer,
so the model, optimizer state and activations are all in it). Approximate MFU =
F x tokens/s / peak FLOP/s with F = 6 N per token for full fine-tuning and 4 N for LoRA (frozen
base: no weight gradients), N = base-model parameters, attention scores ignored; peak defaults to
989 TFLOP/s (H100/H200 SXM dense bf16).

Output in --out: gpu_compare.json (everything, rewritten after every run), gpu_compare.md (the
table), and per-run logs inside the JSON. Every run is in its own try/except: a failure is recorded
and the next run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKENIZER_ASSET = REPO / "tests" / "assets" / "smollm2-tokenizer"
sys.path.insert(0, str(HERE))

ROWS = {
    "lora_padded": ("lora", "padded"),
    "full_padded": ("full", "padded"),
    "lora_packed": ("lora", "packed"),
    "full_packed": ("full", "packed"),
}

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                     rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_SHAPE = dict(SMOLLM2_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def log(msg: str) -> None:
    print(f"[gpu_compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_compare_out", help="output folder (default $OUT)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="2-layer hidden-64 model, short examples, batch 4, few steps (CPU end-to-end check)")
    p.add_argument("--quick", action="store_true", help="fewer steps (15, warm-up 3) and only the padded rows")
    p.add_argument("--rows", default=None, help=f"comma list of rows (default all: {','.join(ROWS)})")
    p.add_argument("--frameworks", default="trl,sftlab", help="comma list, run in this order per row")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; quick 15)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the statistics (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny: 4)")
    p.add_argument("--max-length", type=int, default=None, help="default 1024 (tiny: 128)")
    p.add_argument("--min-tokens", type=int, default=None, help="shortest example (default 64; tiny 48)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 dense bf16)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no new row (TRL + sftlab) when the time so far plus the previous row's time would "
                        "pass this many seconds; skipped rows are marked so")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = p.parse_args(argv)
    tiny, quick = a.tiny, a.quick
    a.steps = a.steps or (6 if tiny else 15 if quick else 40)
    a.warmup = a.warmup if a.warmup is not None else (2 if tiny else 3 if quick else 5)
    a.batch_size = a.batch_size or (4 if tiny else 16)
    a.max_length = a.max_length or (128 if tiny else 1024)
    a.min_tokens = a.min_tokens or (48 if tiny else 64)
    a.precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    if a.rows:
        a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
        bad = [r for r in a.rows if r not in ROWS]
        if bad:
            p.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    else:
        a.rows = ["lora_padded", "full_padded"] if quick else list(ROWS)
    a.frameworks = [f.strip() for f in a.frameworks.split(",") if f.strip()]
    if not a.frameworks or any(f not in ("trl", "sftlab") for f in a.frameworks):
        p.error("--frameworks: a comma list of trl and/or sftlab")
    if a.warmup >= a.steps:
        p.error("--warmup must be < --steps")
    return a


# ---------------------------------------------------------------------------------------------
# environment, model, data


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pyarrow", "huggingface_hub",
                "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__}: {e})"[:200]
    try:
        import sftlab

        out["sftlab"] = getattr(sftlab, "__version__", None) or "importable"
        out["sftlab_file"] = str(Path(sftlab.__file__).parent)
    except Exception as e:  # noqa: BLE001
        out["sftlab"] = f"unavailable ({type(e).__name__}: {e})"[:200]
    return out


def device_info(device: str) -> dict:
    import torch

    info = {"device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, total_mem_mb=p.total_memory / 2**20, capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, sm_count=p.multi_processor_count)
    else:
        info.update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def build_model_folder(folder: Path, tiny: bool, seed: int, shape: dict | None = None, dtype: str = "float32",
                       device: str = "cpu") -> dict:
    """Random-init Llama of SmolLM2-135M's shape (or a tiny one, or `shape`), safetensors in `dtype` + the
    SmolLM2 tokenizer. `device`: where the weights are initialised (a 1B model initialises in seconds on a GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or (TINY_SHAPE if tiny else SMOLLM2_SHAPE)
    cfg = LlamaConfig(**shape, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in TOKENIZER_ASSET.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    del model
    return {"params": n, "dtype": dtype, "shape": {k: v for k, v in cfg.to_dict().items() if k in shape}}


def make_data(path: Path, model_dir: Path, n: int, lo: int, hi: int, seed: int) -> dict:
    """n single-turn chats whose rendered token length (chat template, default system prompt) is uniform in [lo, hi]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    vocab = tok.get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()
                   and 3 <= len(t) - 1 <= 9)
    words = [w for w in words[:: max(1, len(words) // 4000)] if len(tok(" " + w, add_special_tokens=False)
                                                                  ["input_ids"]) == 1]

    def n_tokens(msgs):
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])

    lengths, exact = [], 0
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            target = rng.randint(lo, hi)
            user = "Write about " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
            answer = [rng.choice(words) for _ in range(max(1, target - 40))]
            for _try in range(6):
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(answer)}]
                length = n_tokens(msgs)
                diff = target - length
                if diff == 0:
                    break
                if diff > 0:
                    answer += [rng.choice(words) for _ in range(diff)]
                else:
                    del answer[max(1, len(answer) + diff):]
            while length > hi and len(answer) > 1:  # never above the cap
                answer.pop()
                msgs[1]["content"] = " ".join(answer)
                length = n_tokens(msgs)
            exact += length == target
            lengths.append(length)
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return {"examples": n, "min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths),
            "median": statistics.median(lengths), "exact_target_share": exact / n, "word_pool": len(words)}


def n_examples_needed(steps: int, batch: int, lo: int, hi: int, max_length: int) -> int:
    """Enough examples for `steps` packed batches (the padded runs use the first steps x batch of a shuffle)."""
    per_row = max(1.0, max_length / ((lo + hi) / 2))
    return int(math.ceil(steps * batch * per_row * 1.25)) + 2 * batch


# ---------------------------------------------------------------------------------------------
# measurement helpers


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def mem_reset(device: str) -> float:
    """Free what can be freed, reset the peak; returns MiB still allocated (leftovers of earlier runs)."""
    gc.collect()
    if device != "cuda":
        return 0.0
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def mem_peak(device: str) -> dict:
    if device != "cuda":
        import resource

        return {"peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    return {"peak_alloc_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def summarize(per_step: list[dict], warmup: int, key: str = "step_wall") -> dict:
    kept = [s for s in per_step if s["step"] > warmup and (s.get(key) or 0) > 0]
    if not kept:
        return {"measured_steps": 0}
    rates = [s["tokens"] / s[key] for s in kept]
    tok, t = sum(s["tokens"] for s in kept), sum(s[key] for s in kept)
    trained = [s.get("trained_tokens") for s in kept]
    out = {"measured_steps": len(kept), "median_tokens_per_s": statistics.median(rates),
           "overall_tokens_per_s": tok / t, "median_step_s": statistics.median(s[key] for s in kept),
           "mean_tokens_per_step": tok / len(kept)}
    if all(x is not None for x in trained):
        out["mean_trained_tokens_per_step"] = sum(trained) / len(kept)
        out["trained_share"] = sum(trained) / tok
    return out


def approx_mfu(tokens_per_s, method: str, n_params: int, peak_tflops: float, device: str):
    if device != "cuda" or not tokens_per_s:
        return None
    per_token = (6 if method == "full" else 4) * n_params
    return per_token * tokens_per_s / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------
# TRL


def run_trl(a, method: str, policy: str, model_dir: Path, data_path: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trl_run import TRAINING_TEMPLATE  # SmolLM2's template + {% generation %} markers (see trl_run.py)

    dev = a.device
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    records = [json.loads(x) for x in data_path.read_text().splitlines() if x.strip()]
    original = tok.apply_chat_template(records[0]["messages"], tokenize=False)
    tok.chat_template = TRAINING_TEMPLATE
    if tok.apply_chat_template(records[0]["messages"], tokenize=False) != original:
        raise RuntimeError("TRAINING_TEMPLATE renders differently from the tokenizer's chat template")
    # gpu_speed.py sets trl_dtype=bfloat16 (pure bf16, TRL's own workload) and gradient_checkpointing
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, getattr(a, "trl_dtype", "float32")),
                                                 attn_implementation="sdpa")
    ds = Dataset.from_list(records)
    packed = policy == "packed"
    cfg = SFTConfig(
        output_dir=str(work / "trl_out"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=a.precision == "bf16", fp16=False, use_cpu=dev == "cpu",
        gradient_checkpointing=getattr(a, "gradient_checkpointing", False),
        max_length=a.max_length, packing=packed, packing_strategy="bfd", padding_free=packed,
        assistant_only_loss=True, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1,
        dataloader_num_workers=0, seed=a.seed, data_seed=a.seed, disable_tqdm=True,
    )
    peft_config = None
    if method == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    batches: list[dict] = []
    per_step: list[dict] = []
    losses: list[float] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                tokens = int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row; pad_to_multiple_of is None, so no pad in it
                tokens = int(ids.numel())
            trained = int((inputs["labels"] != -100).sum()) if "labels" in inputs else None
            batches.append({"tokens": tokens, "trained_tokens": trained, "shape": list(ids.shape)})
            return super().training_step(model, inputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        t_prev_end = t_begin = None

        def on_train_begin(self, args, state, control, **kw):
            sync(dev)
            self.t_prev_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            sync(dev)
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(dev)
            now = time.perf_counter()
            b = batches[-1] if batches else {}
            per_step.append({"step": state.global_step, "step_wall": now - self.t_prev_end,
                             "step_time": now - self.t_begin, **b})
            self.t_prev_end = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = CountingTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=peft_config, callbacks=[StepTimer()])
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    setup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    trainer.train()
    sync(dev)
    train_s = time.perf_counter() - t0
    if len(batches) != len(per_step):
        raise RuntimeError(f"counted {len(batches)} batches for {len(per_step)} steps")
    res = {"trainable_params": n_trainable, "setup_s": setup_s, "train_s": train_s, "per_step": per_step,
           "losses": losses, "train_rows": len(trainer.train_dataset),
           "padding_free": bool(getattr(trainer, "padding_free", False)),
           "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
           "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                             else trainer.optimizer).__name__}
    del trainer, model, ds
    return res


# ---------------------------------------------------------------------------------------------
# sftlab


def sftlab_config(a, method: str, policy: str, model_dir: Path, data_path: Path, out_dir: Path, name: str) -> dict:
    if method == "lora":
        m = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]}
    else:
        m = {"name": "full"}
    return {
        "run": {"name": name, "output_dir": str(out_dir), "seed": a.seed},
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "method": m,
        "data": {"train": [{"path": str(data_path), "format": "chat"}], "max_length": a.max_length,
                 "packing": policy == "packed", "template": "chat", "train_on_prompt": False,
                 "assistant_turns": "all"},
        "train": {"steps": a.steps, "batch_size": a.batch_size, "grad_accum": 1, "lr": a.lr, "schedule": "linear",
                  "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": a.precision,
                  "gradient_checkpointing": False, "threads": a.threads, "eval_every": 0, "log_every": 1},
        "checkpoint": {"every": 0, "final": False},
        "logging": {"progress": False, "tensorboard": False},
    }


def run_sftlab(a, method: str, policy: str, model_dir: Path, data_path: Path, work: Path,
               raw: dict | None = None) -> dict:
    """`raw`: a whole sftlab config dict instead of sftlab_config's (gpu_speed.py); its run.name names the run."""
    from sftlab.config import config_from_dict
    from sftlab.train.loop import Trainer

    dev = a.device
    name = raw["run"]["name"] if raw else f"{method}_{policy}"
    out_dir = Path(raw["run"]["output_dir"]) if raw else work / "sftlab_runs"
    shutil.rmtree(out_dir / name, ignore_errors=True)
    raw = raw or sftlab_config(a, method, policy, model_dir, data_path, out_dir, name)
    cfg = config_from_dict(raw)
    t_start = time.perf_counter()
    trainer = Trainer(cfg)

    # Time each step the same way as TRL's: synchronized step end to synchronized step end.
    ends: list[float] = []
    orig_step = trainer.train_step

    def timed_step(micro):
        if not ends:  # first step: from here (collation of step 1 is not in it; it is warm-up anyway)
            sync(dev)
            ends.append(time.perf_counter())
        r = orig_step(micro)
        sync(dev)
        ends.append(time.perf_counter())
        return r

    trainer.train_step = timed_step
    # No final resume checkpoint (TRL saves nothing either); it is written after the last step anyway.
    if hasattr(trainer, "_maybe_checkpoint"):
        trainer._maybe_checkpoint = lambda *args, **kw: None
    t0 = time.perf_counter()
    trainer.run()
    sync(dev)
    train_s = time.perf_counter() - t0  # includes sftlab's setup (data, model), unlike TRL's train_s
    metrics_path = out_dir / name / "metrics.jsonl"
    from sftlab.rundir_format import read_metrics

    steps = [r for r in read_metrics(metrics_path.parent)[0] if "tokens" in r and "step_time" in r]
    per_step = []
    for i, r in enumerate(steps):
        wall = ends[i + 1] - ends[i] if i + 1 < len(ends) else None
        per_step.append({"step": r["step"], "step_wall": wall, "step_time": r.get("step_time"),
                         "tokens": r["tokens"], "trained_tokens": r.get("trained_tokens"), "loss": r.get("loss"),
                         "peak_mem_mb_reported": r.get("peak_mem_mb")})
    if len(ends) - 1 != len(per_step):
        raise RuntimeError(f"{len(ends) - 1} timed steps but {len(per_step)} step lines in {metrics_path}")
    params = getattr(trainer, "params", {}) or {}
    data_stats = None
    try:
        data_stats = trainer.data.train_stats.summary()
    except Exception:  # noqa: BLE001
        pass
    res = {"trainable_params": params.get("trainable_params"), "setup_plus_train_s": train_s,
           "setup_s": time.perf_counter() - t_start - train_s, "per_step": per_step,
           "losses": [s["loss"] for s in per_step], "data_stats": data_stats, "config": raw,
           "optimizer": type(getattr(trainer, "optimizer", None)).__name__}
    del trainer
    return res


# ---------------------------------------------------------------------------------------------
# report


def fmt(x, spec=".0f", none="-"):
    return none if x is None else format(x, spec)


def write_outputs(out: Path, results: dict) -> None:
    (out / "gpu_compare.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_compare.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    m, dev = results["meta"], results["meta"]["device_info"]
    cuda = dev.get("device") == "cuda"
    mem_key = "peak_net_mb" if cuda else "peak_rss_mb_process"
    lines = [f"# TRL SFTTrainer vs sftlab: {dev.get('name')} ({m['precision']})", "",
             f"Model: random-init {'SmolLM2-135M shape' if not m['tiny'] else 'tiny (2-layer)'} "
             f"({m['model']['params'] / 1e6:.1f}M params); data: {m['data']['examples']} chats (padded rows: the first "
             f"{m['data'].get('padded_examples')}), "
             f"{m['data']['min']}-{m['data']['max']} tokens (mean {m['data']['mean']:.0f}); batch {m['batch_size']}, "
             f"max_length {m['max_length']}, {m['steps']} steps, first {m['warmup']} discarded.", "",
             "Throughput: non-pad input tokens per second of step wall time (synchronized step end to step end), "
             "overall over the measured steps. Memory: "
             + ("torch.cuda.max_memory_allocated over the run, less what was still allocated before it "
                "(leftovers of earlier runs; listed below when any)." if cuda else
                "process peak RSS (cumulative across runs on CPU: only the first run's is meaningful)."), "",
             "| row | TRL tok/s | sftlab tok/s | sftlab/TRL | TRL peak MiB | sftlab peak MiB | sftlab/TRL "
             "| TRL MFU | sftlab MFU | tok/step TRL / sftlab | trained share TRL / sftlab | "
             "loss first->last TRL / sftlab |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in m["rows"]:
        r = results["runs"].get(row, {})
        t, s = r.get("trl", {}), r.get("sftlab", {})

        def g(d, k):
            return d.get("stats", {}).get(k) if d.get("ok") else None

        tt, st = g(t, "overall_tokens_per_s"), g(s, "overall_tokens_per_s")
        tm, sm = (t.get("memory", {}).get(mem_key) if t.get("ok") else None,
                  s.get("memory", {}).get(mem_key) if s.get("ok") else None)

        def status(d):
            return "" if d.get("ok") else (" (skipped)" if d.get("skipped") else " (FAILED)" if d else " (not run)")

        def loss(d):
            ls = [x for x in d.get("losses", []) if x is not None] if d.get("ok") else []
            return f"{ls[0]:.2f}->{ls[-1]:.2f}" if ls else "-"

        lines.append(
            f"| {row} | {fmt(tt)}{status(t)} | {fmt(st)}{status(s)} | {fmt(st / tt if tt and st else None, '.2f')} "
            f"| {fmt(tm)} | {fmt(sm)} | {fmt(sm / tm if tm and sm else None, '.2f')} "
            f"| {fmt(t.get('mfu'), '.1%')} | {fmt(s.get('mfu'), '.1%')} "
            f"| {fmt(g(t, 'mean_tokens_per_step'))} / {fmt(g(s, 'mean_tokens_per_step'))} "
            f"| {fmt(g(t, 'trained_share'), '.3f')} / {fmt(g(s, 'trained_share'), '.3f')} "
            f"| {loss(t)} / {loss(s)} |")
    errs = [(row, fw, d.get("error", "").strip().splitlines()[-1:]) for row, r in results["runs"].items()
            for fw, d in r.items() if isinstance(d, dict) and d.get("ok") is False and not d.get("skipped")]
    if errs:
        lines += ["", "Failures (full tracebacks in gpu_compare.json):"]
        lines += [f"- {row}/{fw}: {' '.join(e)}" for row, fw, e in errs]
    left = [(row, fw, d.get("leftover_mb_before")) for row, r in results["runs"].items() for fw, d in r.items()
            if isinstance(d, dict) and (d.get("leftover_mb_before") or 0) > 1]
    if left:
        lines += ["", "Allocated before the run (not freed by the previous one): "
                  + ", ".join(f"{row}/{fw} {mb:.0f} MiB" for row, fw, mb in left)]
    v = m["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v.get(k)}" for k in
                                          ("python", "torch", "transformers", "peft", "accelerate", "trl",
                                           "datasets")), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    a = parse_args(argv)
    t_launch = time.perf_counter()
    for k, v in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        os.environ.setdefault(k, v)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFTLAB_CACHE", str(work / "sftlab_cache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets_cache"))

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        log("CUDA requested but torch.cuda.is_available() is False; use --device cpu --tiny for a CPU check")
        return 2
    vers = versions()
    dinfo = device_info(a.device)
    log(f"device: {dinfo}")
    log("versions: " + ", ".join(f"{k}={v}" for k, v in vers.items()))

    t0 = time.perf_counter()
    model_dir = work / "model"
    minfo = build_model_folder(model_dir, a.tiny, a.seed)
    log(f"model: {minfo['params']:,} params in {model_dir} ({time.perf_counter() - t0:.1f}s)")
    # Two files from one generator: the padded runs need only (steps + 2) x batch examples (one epoch, so
    # every step is a full batch for both frameworks), the packed runs enough for `steps` packed batches.
    # Fewer examples = less tokenization in each trainer's setup (not timed, but it costs device time).
    t0 = time.perf_counter()
    data_paths = {"packed": work / "chats_packed.jsonl", "padded": work / "chats_padded.jsonl"}
    n_packed = n_examples_needed(a.steps, a.batch_size, a.min_tokens, a.max_length, a.max_length)
    n_padded = (a.steps + 2) * a.batch_size
    policies = {ROWS[r][1] for r in a.rows}
    dstats = make_data(data_paths["packed"], model_dir, max(n_packed if "packed" in policies else 0, n_padded),
                       a.min_tokens, a.max_length, a.seed)
    with open(data_paths["packed"], encoding="utf-8") as src, open(data_paths["padded"], "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= n_padded:
                break
            dst.write(line)
    dstats["padded_examples"] = n_padded
    log(f"data: {dstats} ({time.perf_counter() - t0:.1f}s)")

    results = {"meta": {"argv": sys.argv, "device_info": dinfo, "versions": vers, "tiny": a.tiny, "quick": a.quick,
                        "precision": a.precision, "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
                        "max_length": a.max_length, "lr": a.lr, "seed": a.seed, "rows": a.rows,
                        "frameworks": a.frameworks, "model": minfo, "data": dstats,
                        "peak_tflops": a.peak_tflops, "timing": "step_wall: synchronized step end to step end"},
               "runs": {}}
    write_outputs(out, results)
    runners = {"trl": run_trl, "sftlab": run_sftlab}
    last_row_s = 0.0
    for row in a.rows:
        method, policy = ROWS[row]
        results["runs"][row] = {}
        elapsed = time.perf_counter() - t_launch
        if elapsed + last_row_s > a.budget_s:  # a row runs whole or not at all
            log(f"{row}: skipped ({elapsed:.0f}s elapsed + {last_row_s:.0f}s for the last row > budget "
                f"{a.budget_s:.0f}s)")
            results["runs"][row] = {fw: {"ok": False, "skipped": True} for fw in a.frameworks}
            write_outputs(out, results)
            continue
        t_row = time.perf_counter()
        for fw in a.frameworks:
            log(f"{row}/{fw}: start")
            leftover = mem_reset(a.device)
            t_run = time.perf_counter()
            rec: dict = {"leftover_mb_before": leftover}
            try:
                res = runners[fw](a, method, policy, model_dir, data_paths[policy], work)
                sync(a.device)
                rec.update(ok=True, memory=mem_peak(a.device), **res)
                if "peak_alloc_mb" in rec["memory"]:  # what this run added on top of any leftovers of earlier runs
                    rec["memory"]["peak_net_mb"] = rec["memory"]["peak_alloc_mb"] - leftover
                rec["stats"] = summarize(res["per_step"], a.warmup)
                rec["stats_step_time"] = summarize(res["per_step"], a.warmup, "step_time")
                rec["mfu"] = approx_mfu(rec["stats"].get("overall_tokens_per_s"), method, minfo["params"],
                                        a.peak_tflops, a.device)
                st, mem = rec["stats"], rec["memory"]
                log(f"{row}/{fw}: {fmt(st.get('overall_tokens_per_s'))} tok/s overall, "
                    f"{fmt(st.get('median_tokens_per_s'))} median, {fmt(st.get('median_step_s'), '.3f')} s/step, "
                    f"{fmt(st.get('mean_tokens_per_step'))} tok/step, trained share "
                    f"{fmt(st.get('trained_share'), '.3f')}, memory {json.dumps({k: round(v) for k, v in mem.items()})}"
                    f", mfu {fmt(rec['mfu'], '.1%')}, loss {fmt(rec['losses'][0] if rec['losses'] else None, '.3f')}"
                    f" -> {fmt(rec['losses'][-1] if rec['losses'] else None, '.3f')}")
            except BaseException as e:  # noqa: BLE001 - one failed run must not lose the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                rec.update(ok=False, error=traceback.format_exc()[-6000:])
                try:
                    rec["memory"] = mem_peak(a.device)
                except Exception:  # noqa: BLE001
                    pass
                log(f"{row}/{fw}: FAILED: {type(e).__name__}: {str(e)[:500]}")
                traceback.print_exc()
                sys.stdout.flush()
            rec["wall_s"] = time.perf_counter() - t_run
            results["runs"][row][fw] = rec
            write_outputs(out, results)
            mem_reset(a.device)
        last_row_s = time.perf_counter() - t_row
    results["meta"]["total_s"] = time.perf_counter() - t_launch
    write_outputs(out, results)
    print(markdown(results), flush=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    n_ok = sum(1 for r in results["runs"].values() for d in r.values() if d.get("ok"))
    n_all = sum(len(r) for r in results["runs"].values())
    log(f"done: {n_ok}/{n_all} runs ok in {results['meta']['total_s']:.0f}s; wrote {out}/gpu_compare.json and .md")
    return 0 if n_ok == n_all else 1


if __name__ == "__main__":
    sys.exit(main())
