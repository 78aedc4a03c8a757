"""Greedy answers of a LoRA-tuned SmolLM2: the merged model (`sftlab export --merge`) against its f16 GGUF file
(`sftlab export --format gguf --quant f16`) read back by transformers (`gguf_file=`). Offline.

    PYTHONPATH=src .venv/bin/python benchmarks/gguf_greedy.py                       # trains configs/tool_calls_lora.yaml once
    PYTHONPATH=src .venv/bin/python benchmarks/gguf_greedy.py --run runs/mine --quant q8_0

The default run is the tool-call LoRA (two new tokens, LoRA on every linear layer, 30 steps; its probes are
dropped to save time): its answers are whole `<tool_call>{...}</tool_call>` lines, 20-30 tokens, not one letter.
Five prompts: three tool-call questions and one plain question from examples/data/tool_calls_eval.jsonl (with
the tool system prompt), one general chat question without it. For each: both models' greedy answers
(--new-tokens at most), whether they are identical, the first differing token position if not; and the max
|logit difference| over prompt + answer (the merged model's answer, teacher-forced through both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERAL = [{"role": "user", "content": "Give me three tips for a good night's sleep."}]


def prompts() -> list[list[dict]]:
    rows = [json.loads(x) for x in (ROOT / "examples/data/tool_calls_eval.jsonl").read_text().splitlines()]
    tool = [r for r in rows if r.get("needs_tool")][:3]
    plain = [r for r in rows if not r.get("needs_tool")][:1]
    return [r["messages"][:-1] for r in tool + plain] + [GENERAL]


def sftlab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sftlab.cli", *args], check=True, cwd=ROOT)


def train_default(out: Path) -> Path:
    run = out / "tool_calls_lora"
    if not (run / "trajectory.jsonl").is_file():
        sftlab("train", "configs/tool_calls_lora.yaml", f"run.output_dir={out}", "probes=[]", "train.threads=1")
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a LoRA run directory (default: train configs/tool_calls_lora.yaml into --work)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sftlab-gguf-greedy"))
    ap.add_argument("--quant", default="f16")
    ap.add_argument("--new-tokens", type=int, default=40)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    work = Path(args.work)
    run = Path(args.run) if args.run else train_default(work)
    merged_dir, gguf_dir = work / "merged", work / f"gguf-{args.quant}"
    for d, extra in ((merged_dir, ["--merge"]), (gguf_dir, ["--format", "gguf", "--quant", args.quant])):
        if not d.is_dir():
            sftlab("export", str(run), *extra, "-o", str(d))
    gguf_name = next(gguf_dir.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    t0 = time.time()
    got = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    print(f"run {run}; {args.quant} GGUF {gguf_name} loaded in {time.time() - t0:.0f} s")
    same, worst = 0, 0.0
    for i, chat in enumerate(prompts()):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gids = gtok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        assert torch.equal(ids.input_ids, gids.input_ids), "the GGUF's tokenizer/template renders differently"
        n = ids.input_ids.shape[1]
        with torch.no_grad():
            a = ref.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False)[0, n:]
            b = got.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False)[0, n:]
            full = torch.cat([ids.input_ids[0], a]).unsqueeze(0)
            diff = (ref(full).logits - got(full).logits).abs().max().item()
        worst = max(worst, diff)
        first = next((j for j, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y),
                     None if len(a) == len(b) else min(len(a), len(b)))
        same += first is None
        print(f"\nprompt {i + 1}: {chat[-1]['content']!r}\n  merged ({len(a)} tokens): "
              f"{tok.decode(a, skip_special_tokens=False)!r}\n  gguf   ({len(b)} tokens): "
              f"{gtok.decode(b, skip_special_tokens=False)!r}\n  identical: {first is None}"
              + ("" if first is None else f" (first difference at answer token {first})")
              + f"; max |logit diff| {diff:.3g}")
    print(f"\n{same}/5 greedy answers identical; max |logit difference| over prompts + answers {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
