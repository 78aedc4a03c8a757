"""One TRL SFTTrainer training run, timed per step, for the CPU benchmark.

    .venv/bin/python benchmarks/trl_run.py --model /tmp/smol --data chats.jsonl \
        --method lora --policy padded --batch-size 4 --steps 12 --out trl.json

The script re-runs itself as a child (`--worker`) and reports the child's peak RSS from
getrusage(RUSAGE_CHILDREN) after it exits, the same way sftlab_run.py measures `sftlab train`.

TRL settings that make it the same job as sftlab's:
  * data: conversational {"messages": [...]} records; loss on every assistant turn only
    (`assistant_only_loss=True`). SmolLM2's chat template has no {% generation %} markers and TRL
    1.16 has no built-in training template for it, so the tokenizer gets TRAINING_TEMPLATE below:
    the same template with the assistant content + <|im_end|> wrapped in generation markers. It
    renders byte-identical text (checked at start-up).
  * padded: packing=False, padding_free=False -> rows padded to the longest row of the batch.
  * packed: packing=True, packing_strategy="bfd", padding_free=True (TRL forces padding-free for
    bfd): each batch is `batch_size` packed rows of <= max_length tokens, flattened into one
    sequence with position_ids restarting per example; transformers turns those into a
    block-diagonal (per-example) causal mask under sdpa, i.e. no cross-example attention.
  * fp32 (bf16=False), use_cpu=True, sdpa attention, gradient_checkpointing=False (SFTConfig's
    default is True; sftlab's is False), adamw_torch, linear schedule, no warmup, weight decay 0,
    max_grad_norm 1.0, grad accum 1, no eval, no saving, logging_steps=1 (sftlab logs every step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SYSTEM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-Instruct's template, with {% generation %} around what the assistant must learn to emit.
TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_DEFAULT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p)
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the worker is killed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# parent: run the worker in a fresh child and take its peak RSS


def main_parent(args) -> int:
    if args.model is None:
        args.model = common.default_model()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    worker_out = out.with_suffix(out.suffix + ".worker")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", str(worker_out),
           "--model", args.model, "--data", args.data, "--method", args.method, "--policy", args.policy,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--max-length",
           str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=common.child_env(args.threads), timeout=args.timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, log = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, log = -9, (e.stdout or "") if isinstance(e.stdout, str) else ""
    wall = time.perf_counter() - t0
    peak = common.children_peak_rss_mb()
    if rc != 0 or not worker_out.exists():
        res = {"framework": "trl", "ok": False, "returncode": rc, "error": log[-4000:], "wall_s": wall,
               "method": args.method, "policy": args.policy}
        out.write_text(json.dumps(res, indent=1))
        sys.stderr.write(log[-4000:])
        print(f"[trl] {args.method}/{args.policy} FAILED (rc={rc})", file=sys.stderr)
        return 1
    res = json.loads(worker_out.read_text())
    worker_out.unlink()
    res.update({"ok": True, "peak_rss_mb": peak, "wall_s": wall, "log_tail": log[-2000:]})
    out.write_text(json.dumps(res, indent=1))
    print(f"[trl] {args.method}/{args.policy}: median {res['median_tokens_per_s']:.1f} tok/s, "
          f"overall {res['overall_tokens_per_s']:.1f} tok/s, peak RSS {peak:.0f} MB, "
          f"{res['mean_tokens_per_step']:.0f} tok/step, wall {wall:.1f}s")
    return 0


# ---------------------------------------------------------------------------------------------
# worker: the training run itself


def main_worker(args) -> int:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    records = common.read_jsonl(args.data)
    probe = records[0]["messages"]
    original = tok.apply_chat_template(probe, tokenize=False)
    tok.chat_template = TRAINING_TEMPLATE
    patched = tok.apply_chat_template(probe, tokenize=False)
    if original != patched:
        raise SystemExit(f"training template renders differently:\n{original!r}\n{patched!r}")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    ds = Dataset.from_list([{"messages": r["messages"]} for r in records])

    packed = args.policy == "packed"
    tmp = tempfile.mkdtemp(prefix="trl_bench_")
    cfg = SFTConfig(
        output_dir=tmp,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=args.max_length,
        packing=packed,
        packing_strategy="bfd",
        padding_free=packed,
        assistant_only_loss=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    per_step: list[dict] = []
    batches: list[dict] = []
    losses: list[float] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                tokens = int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, no pad (pad_to_multiple_of is None on CPU)
                tokens = int(ids.numel())
            trained = int((inputs["labels"] != -100).sum()) if "labels" in inputs else None
            n_seq = None
            if "position_ids" in inputs and "attention_mask" not in inputs:
                n_seq = int((inputs["position_ids"] == 0).sum())
            batches.append({"tokens": tokens, "trained_tokens": trained, "shape": list(ids.shape),
                            "examples": n_seq if n_seq is not None else int(ids.shape[0])})
            return super().training_step(model, inputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin = None
            self.t_prev_end = None

        def on_train_begin(self, a, state, control, **kw):
            self.t_prev_end = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            b = batches[-1] if batches else {}
            per_step.append({"step": state.global_step, "step_time": now - self.t_begin,
                             "step_wall": now - self.t_prev_end, **b})
            self.t_prev_end = now

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = CountingTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=peft_config, callbacks=[StepTimer()])
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t_setup = time.perf_counter() - t_start
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0

    if len(batches) != len(per_step):
        raise SystemExit(f"counted {len(batches)} batches for {len(per_step)} steps (grad accum?)")
    stats = common.summarize(per_step)
    res = {
        "framework": "trl",
        "method": args.method,
        "policy": args.policy,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "max_length": args.max_length,
        "lr": args.lr,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "data": args.data,
        "train_rows": len(trainer.train_dataset),
        "trainable_params": n_trainable,
        "settings": {"assistant_only_loss": True, "chat_template": "SmolLM2 + {% generation %} markers",
                     "packing": packed, "packing_strategy": "bfd" if packed else None,
                     "padding_free": trainer.padding_free, "gradient_checkpointing": False, "dtype": "float32",
                     "attn_implementation": model.config._attn_implementation},
        "setup_s": t_setup,
        "train_s": t_train,
        "per_step": per_step,
        "losses": losses,
        "peak_rss_self_mb": common.self_peak_rss_mb(),
        "warmup_steps_discarded": common.WARMUP_STEPS,
        **stats,
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    a = parse_args()
    sys.exit(main_worker(a) if a.worker else main_parent(a))
