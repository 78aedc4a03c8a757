"""`sftlab demo`: one short LoRA run on the embedded model, then what it learned and what it cost.

Task: classify the opening of a Wikipedia article into one of eight topics, answering with one
word (sftlab.assets). Before and after, on held-out data: the task loss, greedy exact-match
accuracy, and a retention loss on general chit-chat the run never trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .assets import DemoData, prepare_assets
from .config import DataSource, RunConfig, config_from_dict


@dataclass(frozen=True)
class DemoPlan:
    steps: int
    batch_size: int
    n_generate: int  # held-out articles scored by greedy generation (the task loss uses all of eval.jsonl)
    n_retention: int  # chit-chat examples for the retention loss
    checkpoint_every: int


FULL = DemoPlan(steps=60, batch_size=8, n_generate=96, n_retention=96, checkpoint_every=15)
QUICK = DemoPlan(steps=30, batch_size=8, n_generate=48, n_retention=48, checkpoint_every=10)
MAX_NEW_TOKENS = 6  # a label is 1-2 tokens plus end-of-turn; more only lets the base model ramble


def demo_config(data: DemoData, plan: DemoPlan, output_dir: str, name: str) -> RunConfig:
    return config_from_dict({
        "run": {"name": name, "output_dir": output_dir, "seed": 0},
        "model": {"path": "smollm2"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["all-linear"]},
        "data": {"train": [{"path": str(data.train)}], "eval": [{"path": str(data.eval)}], "max_length": 192},
        "train": {"steps": plan.steps, "batch_size": plan.batch_size, "lr": 1e-3, "schedule": "linear",
                  "warmup": 0.1},
        "checkpoint": {"every": plan.checkpoint_every},
        "logging": {"progress": True, "tensorboard": False},
    })


# ------------------------------------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Exact match ignores case, surrounding whitespace and a trailing full stop, nothing else."""
    return text.strip().lower().rstrip(".").strip()


def held_out_loss(model, tokenizer, cfg: RunConfig, path: Path, desc: str, limit: int = 0) -> float:
    """Token-mean loss on the answers (completion-only labels, exactly as training computes it)."""
    from tqdm.auto import tqdm

    from .data.collate import pad_batch
    from .data.formats import load_records
    from .data.tokenize import tokenize_all
    from .objectives import eval_loss

    records = load_records([DataSource(path=str(path))], cfg.run.seed)
    records = records[:limit] if limit else records
    examples, _ = tokenize_all(records, tokenizer, cfg.data)
    examples.sort(key=lambda e: len(e.input_ids))
    bs = 16
    batches = [pad_batch(examples[i:i + bs], tokenizer.pad_token_id) for i in range(0, len(examples), bs)]
    total, n = 0.0, 0
    for b in tqdm(batches, desc=desc, unit="batch", leave=False):
        m = eval_loss(model, [b], "cpu")
        total += m["eval_loss"] * m["eval_tokens"]
        n += m["eval_tokens"]
    return total / max(n, 1)


def generate_answers(model, tokenizer, rows: list[dict], desc: str, batch_size: int = 16) -> list[str]:
    """Greedy replies to each row's user turn (left-padded batches)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
            prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                       for r in rows[i:i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            n = enc["input_ids"].shape[1]
            out += [tokenizer.decode(g[n:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tokenizer.padding_side = side
    return out


def score(model, tokenizer, cfg: RunConfig, data: DemoData, plan: DemoPlan, rows: list[dict], who: str,
          task_loss: float | None = None) -> dict:
    """Greedy exact match on `rows`, task loss on all of eval.jsonl (unless given), retention loss."""
    answers = generate_answers(model, tokenizer, rows, f"{who}: generating")
    gold = [r["messages"][-1]["content"] for r in rows]
    correct = [normalise(a) == g for a, g in zip(answers, gold)]
    if task_loss is None:
        task_loss = held_out_loss(model, tokenizer, cfg, data.eval, f"{who}: task loss")
    return {"task_loss": task_loss,
            "retention_loss": held_out_loss(model, tokenizer, cfg, data.retention, f"{who}: retention loss",
                                            plan.n_retention),
            "accuracy": sum(correct) / len(rows), "in_label_set": sum(normalise(a) in data.labels for a in answers)
            / len(rows), "answers": answers}


def final_eval_loss(run_dir: Path) -> float | None:
    """The eval loss the training loop logged at its last step (same examples, same loss function)."""
    last = None
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("eval"):
            last = row["eval_loss"]
    return last


# ------------------------------------------------------------------------------------------- the demo


def run_demo(quick: bool = False, output_dir: str = "runs/demo", plan: DemoPlan | None = None) -> Path:
    """Score the base model, train, score the final checkpoint, print the comparison; returns the run dir."""
    import torch

    from .models import load_model, load_tokenizer, resolve_model
    from .runs import Run
    from .train.loop import train

    t0 = time.time()
    plan = plan or (QUICK if quick else FULL)
    data = prepare_assets(verbose=True)
    name = time.strftime("wiki-topics-%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    cfg = demo_config(data, plan, output_dir, name)
    rows = [json.loads(ln) for ln in data.eval.read_text(encoding="utf-8").splitlines()][: plan.n_generate]
    torch.manual_seed(0)
    print(f"\nTask: name the topic of a Wikipedia article's opening in one word ({', '.join(data.labels)});\n"
          f"  e.g. {_article(rows[0])[:90]}... -> {rows[0]['messages'][-1]['content']}")

    print(f"\n[1/3] base model: scoring {len(rows)} held-out articles", flush=True)
    ref = resolve_model(cfg.model.path)
    tok = load_tokenizer(ref)
    before = score(load_model(ref), tok, cfg, data, plan, rows, "base")

    print(f"\n[2/3] LoRA fine-tuning: {plan.steps} steps x {plan.batch_size} examples", flush=True)
    run_dir = train(cfg)

    print(f"\n[3/3] fine-tuned model: scoring the same {len(rows)} articles", flush=True)
    model, tok = Run(run_dir).load(merge=True)  # merged: same function, faster forward passes
    after = score(model, tok, cfg, data, plan, rows, "tuned", task_loss=final_eval_loss(run_dir))

    summary = {"plan": plan.__dict__, "labels": data.labels, "n_generate": len(rows),
               "majority_baseline": _majority(rows), "before": before, "after": after,
               "seconds": round(time.time() - t0, 1)}
    (Path(run_dir) / "demo.json").write_text(json.dumps(summary, indent=1))
    print(report(summary, rows))
    print(f"\nrun directory: {run_dir}")
    print(f"  chat with it:   sftlab chat {run_dir}")
    print(f"  export it:      sftlab export {run_dir} --merge -o {run_dir}-merged")
    return Path(run_dir)


def _majority(rows: list[dict]) -> float:
    gold = [r["messages"][-1]["content"] for r in rows]
    return max(gold.count(g) for g in set(gold)) / len(gold)


def report(s: dict, rows: list[dict]) -> str:
    b, a = s["before"], s["after"]
    lines = [
        "",
        f"What the run learned (held-out, {s['n_generate']} articles; labels: {', '.join(s['labels'])})",
        f"  {'':34}{'base':>10}{'tuned':>10}",
        f"  {'task loss (answer tokens)':34}{b['task_loss']:>10.3f}{a['task_loss']:>10.3f}",
        f"  {'exact-match accuracy (greedy)':34}{b['accuracy']:>10.1%}{a['accuracy']:>10.1%}"
        f"   (most common label every time: {s['majority_baseline']:.1%})",
        f"  {'answers one of the labels':34}{b['in_label_set']:>10.1%}{a['in_label_set']:>10.1%}",
        "And what it cost (general chit-chat it never trained on)",
        f"  {'retention loss':34}{b['retention_loss']:>10.3f}{a['retention_loss']:>10.3f}",
        "",
        "Samples:",
    ]
    for i in _sample_indices(rows, a["answers"]):
        text = _article(rows[i])
        lines += [f"  article: {text[:110]}{'...' if len(text) > 110 else ''}",
                  f"    expected: {rows[i]['messages'][-1]['content']}",
                  f"    base:     {b['answers'][i]!r}",
                  f"    tuned:    {a['answers'][i]!r}"]
    lines.append(f"\ndemo took {s['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def _article(row: dict) -> str:
    """The article text of a task example (the user turn after the question)."""
    return row["messages"][0]["content"].split("\n\n", 1)[-1]


def _sample_indices(rows: list[dict], tuned: list[str]) -> list[int]:
    """Two the tuned model gets right and one it gets wrong (when there is one): honest samples."""
    right = [i for i, r in enumerate(rows) if normalise(tuned[i]) == r["messages"][-1]["content"]]
    wrong = [i for i in range(len(rows)) if i not in set(right)]
    picked = right[:2] + wrong[:1]
    return picked + [i for i in range(len(rows)) if i not in picked][: 3 - len(picked)]
