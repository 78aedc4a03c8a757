"""examples/make_quality_pairs.py's building step (no model): splits by activity, pairs by margin, the SFT set,
deterministic output from the same samples."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_quality_pairs.py"


@pytest.fixture(scope="module")
def mqp():
    spec = importlib.util.spec_from_file_location("make_quality_pairs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_samples(qs: list[str], k: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": q, "answer": f"answer {j} to {q} " + "word " * rng.randint(20, 60), "finished": True,
             "logprob": -rng.uniform(0.5, 1.5), "readability": rng.uniform(20, 90),
             "actionability": rng.choice([0.0, 0.1, 0.3, 0.6]), "words": rng.randint(10, 80)}
            for q in qs for j in range(k)]


def test_questions_split_by_activity_with_no_overlap(mqp):
    qs = mqp.questions(0)
    assert {k: len(v) for k, v in qs.items()} == {"train": 60, "validation": 20, "test": 32}
    act = {s: {q for q in v} for s, v in qs.items()}
    assert not (act["train"] & act["test"]) and not (act["validation"] & act["test"])
    topic = lambda q: next(a for a in mqp.activities() if a.lower() in q.lower())  # noqa: E731
    assert not ({topic(q) for q in qs["train"]} & {topic(q) for q in qs["test"]})
    assert mqp.questions(0) == qs and mqp.questions(1) != qs


def test_trim_cuts_a_truncated_answer_after_its_last_sentence(mqp):
    assert mqp.trim("Do this. Then 2. do that", False) == "Do this."
    assert mqp.trim("Steps:\n\n1. **Rinse**: the", False) == "Steps:"
    assert mqp.trim("Do this. Then that", True) == "Do this. Then that"


def test_pairs_meet_the_margin_and_the_build_is_deterministic(mqp):
    qs = mqp.questions(0)
    samples = fake_samples(qs["train"] + qs["validation"])
    files = mqp.build(samples, qs, min_words=25)
    assert files == mqp.build(list(reversed(samples)), qs, min_words=25)  # order of samples does not matter
    for dim, margin in mqp.MARGINS.items():
        pairs = files[f"quality_pairs_{dim}_train.jsonl"]
        assert pairs and all(p["meta"]["chosen"] - p["meta"]["rejected"] >= margin - 1e-9 for p in pairs)
        assert {p["prompt"] for p in pairs} <= set(qs["train"])
        assert all(r["question"] in qs["validation"] for r in files[f"quality_choice_{dim}_val.jsonl"])
    long_enough = {(s["question"], s["answer"]) for s in samples if s["words"] >= 25}
    sft = files["quality_sft_train.jsonl"]
    assert sft and all((r["prompt"], r["completion"]) in long_enough for r in sft)
    assert len({r["prompt"] for r in sft}) == len(sft)  # one best answer per question
    assert [r["prompt"] for r in files["quality_prompts_test.jsonl"]] == qs["test"]
    row = files["quality_choice_readability_val.jsonl"][0]
    assert sorted(row["choices"]) == row["choices"] and 0 <= row["answer"] < 2
