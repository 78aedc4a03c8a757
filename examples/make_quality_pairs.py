"""Writing-quality preference data for configs/pipeline_quality_smollm2.yaml, built offline by rejection sampling:
the model answers how-to questions several times, sftlab's own scorers rate every answer, and the best and the
worst answer to the same question on one dimension become a pair. No other model and no download is needed.

    .venv/bin/python examples/make_quality_pairs.py            # sample (slow: ~13 min on one core) + build
    .venv/bin/python examples/make_quality_pairs.py --build    # rebuild the files from the committed samples (1 s)

Questions: how-to and advice questions, each an everyday activity (ACTIVITIES, written for this example) in a
question form (FORMS). Activities, not questions, are split (seeded): 30 train, 10 validation, 16 test, so no
held-out question is about anything trained on. Test questions (two forms each: 32) are only ever answered
greedily by the quality probe; they are never sampled and never used to choose anything.

Sampling (train and validation questions): `--k` answers each at temperature `--temperature`, top-p 0.95, at most
`--max-new-tokens` tokens (transformers' top-k 50 as well), seeded (torch.manual_seed once, fixed batch order: the same file on the same machine
and torch; another CPU may round differently and draw other samples). A truncated answer is cut after its last
complete sentence or line. Every answer is scored with sftlab's `readability` (Flesch reading ease, textstat) and
`actionability` (steps, imperatives, next actions, concrete amounts) scorers and its mean token log-probability
under the model (fluency). Written to examples/data/quality_samples.jsonl.

Building (deterministic from the samples): answers under `--min-words` words, and the least fluent quarter of
all answers (mean log-prob), are dropped. Per question and dimension the candidates are ranked; the best vs the
worst is a pair, and the second best vs the second worst another, when their difference is at least the
dimension's margin (readability 15 Flesch points, actionability 0.2; combined: 2 in the rank sum). Validation
questions give every pair of their answers that meets the margin (more rows for the selection's task score; rows of
one question are correlated, so its CI is somewhat narrow). The SFT set is the best answer per
question on the sum of both dimensions' within-question ranks (rejection-sampling fine-tuning). Files:

    quality_sft_train.jsonl                       prompt, completion (train questions)
    quality_pairs_{readability,actionability}_train.jsonl   prompt, chosen, rejected (train questions)
    quality_choice_{combined,readability,actionability}_val.jsonl   choice rows from validation pairs: the
                                                  task score each stage's select: rule reads
    quality_prompts_test.jsonl                    the 32 held-out test questions (prompt only)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "data"
SAMPLES = "quality_samples.jsonl"

ACTIVITIES = """learn to swim | bake bread at home | start running | learn a new language | save money each month |
sleep better | prepare for a job interview | keep houseplants alive | make a monthly budget |
start a vegetable garden | cook rice on the stove | clean a laptop keyboard | train a puppy | improve my handwriting |
write a cover letter | study for an exam | reduce stress at work | organise my closet | learn to play the guitar |
start meditating | make friends in a new city | fix a flat bicycle tire | paint a room | start a podcast |
learn to code in Python | improve my posture | drink more water | cut down on sugar | plan a road trip |
wash a wool sweater | brew good coffee | take better photos with my phone | start a journal | train for a marathon |
teach a child to ride a bike | back up my computer | learn to juggle | speak in public with confidence |
get better at chess | stop procrastinating | care for a cast iron pan | set up a home office | learn to draw |
memorise a speech | keep my kitchen clean | pack for a long flight | grow tomatoes on a balcony | type faster |
read more books | reduce my screen time | host a dinner party | learn basic first aid | make a fruit smoothie |
remove a coffee stain | start lifting weights | write a short story"""
FORMS = ["How do I {a}?", "What is the best way to {a}?", "Can you give me some advice on how to {a}?",
         "I want to {a}. Where should I start?"]
SPLIT = {"train": 30, "validation": 10, "test": 16}
MARGINS = {"readability": 15.0, "actionability": 0.2}
DIMENSIONS = tuple(MARGINS)
_END = re.compile(r"(?<!\d)[.!?]['\")]?(?=\s|$)|\n")  # a sentence's end (not a list number's dot) or a line's


def activities() -> list[str]:
    return [a.strip() for a in ACTIVITIES.replace("\n", " ").split("|") if a.strip()]


def questions(seed: int = 0) -> dict[str, list[str]]:
    """{split: questions}: activities shuffled with `seed` and split, two question forms per activity (drawn)."""
    rng = random.Random(seed)
    acts = activities()
    rng.shuffle(acts)
    out, start = {}, 0
    for split, n in SPLIT.items():
        qs = []
        for a in acts[start:start + n]:
            for form in sorted(rng.sample(range(len(FORMS)), 2)):
                text = FORMS[form].format(a=a)
                qs.append(text[0].upper() + text[1:])
        out[split], start = qs, start + n
    return out


def trim(text: str, finished: bool) -> str:
    """A truncated answer cut after its last complete sentence or line (finished answers are kept whole)."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in _END.finditer(text)]
    return text[:ends[-1]].strip() if ends else text


def sample_answers(model_path: str, qs: list[str], k: int, temperature: float, max_new_tokens: int, seed: int,
                   batch: int = 8) -> list[dict]:
    """k seeded samples per question: {question, answer, finished, logprob (mean per token under the model)}."""
    import torch

    from sftlab.models import load_model, load_tokenizer, resolve_model
    from sftlab.probes.texts import render_prompt

    ref = resolve_model(model_path)
    model, tok = load_model(ref, "float32", False).eval(), load_tokenizer(ref)
    tok.padding_side = "left"
    torch.manual_seed(seed)
    rows = []
    for i in range(0, len(qs), batch):
        part = qs[i:i + batch]
        enc = tok([render_prompt(tok, [{"role": "user", "content": q}]) for q in part], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k, pad_token_id=tok.pad_token_id)
        L = enc["input_ids"].shape[1]
        for r in range(gen.shape[0]):
            new = gen[r, L:].tolist()
            finished = tok.eos_token_id in new
            text = trim(tok.decode(new, skip_special_tokens=True), finished)
            rows.append({"question": part[r // k], "answer": text, "finished": finished})
        print(f"sampled {min(i + batch, len(qs))}/{len(qs)} questions", flush=True)
    for row, lp in zip(rows, mean_logprobs(model, tok, rows)):
        row["logprob"] = round(lp, 4)
    return rows


def mean_logprobs(model, tok, rows: list[dict], batch: int = 16) -> list[float]:
    """Mean log-probability per answer token (the answer as written, after its chat prompt) under the model."""
    import torch

    from sftlab.probes.texts import render_prompt

    out = []
    for i in range(0, len(rows), batch):
        seqs, starts = [], []
        for row in rows[i:i + batch]:
            p = tok(render_prompt(tok, [{"role": "user", "content": row["question"]}]), add_special_tokens=False)
            a = tok(row["answer"], add_special_tokens=False)
            seqs.append(p["input_ids"] + a["input_ids"])
            starts.append(len(p["input_ids"]))
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), tok.pad_token_id)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, L, V)
        for r, s in enumerate(seqs):
            tgt = torch.tensor(s[starts[r]:])
            lp = logp[r, starts[r] - 1:len(s) - 1].gather(-1, tgt[:, None]).squeeze(-1)
            out.append(lp.mean().item() if len(tgt) else float("-inf"))
    return out


def score(rows: list[dict]) -> None:
    """Add each answer's readability and actionability (sftlab's scorers) and word count, in place."""
    from sftlab.probes.writing import ScorerSettings, build_scorer

    answers, qs = [r["answer"] for r in rows], [r["question"] for r in rows]
    for dim in DIMENSIONS:
        values = build_scorer(dim, ScorerSettings())(answers, qs).values
        for r, v in zip(rows, values):
            r[dim] = None if v is None else round(float(v), 4)
    for r in rows:
        r["words"] = len(r["answer"].split())


def candidates(rows: list[dict], min_words: int) -> list[dict]:
    """Answers long enough, scored on every dimension, and not in the least fluent quarter of all answers."""
    ok = [r for r in rows if r["words"] >= min_words and all(r.get(d) is not None for d in DIMENSIONS)]
    if not ok:
        return []
    cut = sorted(r["logprob"] for r in ok)[len(ok) // 4]
    return [r for r in ok if r["logprob"] >= cut]


def by_question(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["question"], []).append(r)
    return out


def pairs_on(groups: dict[str, list[dict]], key, margin: float, every: bool = False) -> list[dict]:
    """Per question: best vs worst, second best vs second worst (every: all pairs of its answers, better one
    chosen), when they differ by at least `margin`."""
    out = []
    for q, group in groups.items():
        ranked = sorted(group, key=lambda r: (-key(r), r["answer"]))  # ties: a fixed order
        n = len(ranked)
        idx = [(i, j) for i in range(n) for j in range(i + 1, n)] if every else [(i, n - 1 - i) for i in range(n // 2)]
        for i, j in idx:
            hi, lo = ranked[i], ranked[j]
            if key(hi) - key(lo) >= margin - 1e-9:  # 0.3 - 0.1 is 0.19999999999999998
                out.append({"prompt": q, "chosen": hi["answer"], "rejected": lo["answer"],
                            "meta": {"chosen": key(hi), "rejected": key(lo)}})
    return out


def combined_key(group: list[dict]):
    """The sum of an answer's ranks on both dimensions within its question (0 = worst), as a key."""
    ranks = {id(r): 0 for r in group}
    for d in DIMENSIONS:
        for rank, r in enumerate(sorted(group, key=lambda r: (r[d], r["answer"]))):
            ranks[id(r)] += rank
    return lambda r: ranks[id(r)]


def best(group: list[dict]) -> dict:
    """The answer with the best combined rank (ties: a fixed order)."""
    key = combined_key(group)
    return sorted(group, key=lambda r: (-key(r), r["answer"]))[0]


def build(samples: list[dict], qs: dict[str, list[str]], min_words: int) -> dict[str, list[dict]]:
    """{file name: rows} from the scored samples (deterministic)."""
    files: dict[str, list[dict]] = {}
    for split in ("train", "validation"):
        keep = set(qs[split])
        found = by_question(candidates([r for r in samples if r["question"] in keep], min_words))
        groups = {q: found[q] for q in qs[split] if len(found.get(q, ())) >= 2}  # in question order
        every = split == "validation"  # more rows for the selection's task score (pairs of one question correlate)
        per_dim = {d: pairs_on(groups, lambda r, d=d: r[d], MARGINS[d], every) for d in DIMENSIONS}
        combined = [p for q, g in groups.items() for p in pairs_on({q: g}, combined_key(g), 2, every)]
        if split == "train":
            files["quality_sft_train.jsonl"] = [{"prompt": q, "completion": best(g)["answer"]}
                                                for q, g in groups.items()]
            for d in DIMENSIONS:
                files[f"quality_pairs_{d}_train.jsonl"] = per_dim[d]
        else:
            for name, ps in [("combined", combined)] + list(per_dim.items()):
                files[f"quality_choice_{name}_val.jsonl"] = [to_choice(p) for p in ps]
    files["quality_prompts_test.jsonl"] = [{"prompt": q} for q in qs["test"]]
    return files


def to_choice(pair: dict) -> dict:
    choices = sorted([pair["chosen"], pair["rejected"]])
    return {"question": pair["prompt"], "choices": choices, "answer": choices.index(pair["chosen"])}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="only rebuild the files from the samples file")
    ap.add_argument("--out", default=str(OUT), help="folder for the files (default: examples/data)")
    ap.add_argument("--model", default="smollm2", help="the model that answers (as model.path)")
    ap.add_argument("--k", type=int, default=4, help="answers sampled per question")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=112)
    ap.add_argument("--min-words", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="sample only the first N questions of each split (tests)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    qs = questions(args.seed)
    if args.limit:
        qs = {s: q[:args.limit] for s, q in qs.items()}
    if args.build:
        samples = [json.loads(x) for x in (out / SAMPLES).read_text(encoding="utf-8").splitlines() if x.strip()]
    else:
        t0 = time.time()
        samples = sample_answers(args.model, qs["train"] + qs["validation"], args.k, args.temperature,
                                 args.max_new_tokens, args.seed)
        score(samples)
        write_jsonl(out / SAMPLES, samples)
        print(f"sampled and scored {len(samples)} answers in {time.time() - t0:.0f} s", flush=True)
    for name, rows in build(samples, qs, args.min_words).items():
        write_jsonl(out / name, rows)
        print(f"{out / name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
