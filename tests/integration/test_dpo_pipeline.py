"""End to end: a generated Reddit dump -> `sftlab pairs` -> `sftlab pipeline` (SFT, then DPO from it) on a tiny
model -> reward accuracy on held-out pairs, checked against chance with an exact binomial test.

The preference needs learning: each post asks about a thing; the chosen reply names the thing with its colour
in this synthetic world (blue sky, green grass, ...), the rejected reply with another colour, in the same
sentence. Every colour is as common among rejected replies as among chosen ones and the sentences have the same
words but the colour, so length and any single marker word are at chance (the test checks both baselines);
only the colour-thing association separates them. Held-out posts are new, and so are the sentences their
replies use (other openings and endings than in training): the learnt facts must carry over."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from sftlab.cli import main

FACTS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
         "mud": "brown", "grape": "purple"}
OPENINGS = {1: ["I always picture", "Nothing beats", "My kid drew", "We talked about"],
            2: ["I still remember", "Everyone knows"]}
ENDINGS = {1: ["honestly", "every time", "as usual", "no doubt"], 2: ["for sure", "of course"]}
T0 = 1_400_000_000


def reddit_dump(folder: Path, n_posts: int, seed: int) -> list[Path]:
    """Pushshift-shaped RS/RC files: a post about a thing; its later, high-scored reply gives the thing its
    colour, its earlier, low-scored reply another colour (the same sentence otherwise)."""
    rng = random.Random(seed)
    rs, rc = [], []
    colours = sorted(set(FACTS.values()))
    for i in range(n_posts):
        sid, thing = f"p{seed}x{i}", rng.choice(sorted(FACTS))
        right = FACTS[thing]
        wrong = rng.choice([c for c in colours if c != right])
        rs.append({"id": sid, "name": f"t3_{sid}", "author": f"op{i}", "created_utc": T0 + 100 * i, "score": 50,
                   "title": f"Thoughts on {thing} ({i})?", "selftext": f"What comes to mind with {thing}?",
                   "subreddit": "AskAnything", "is_self": True, "stickied": False, "over_18": False})
        opening, ending = rng.choice(OPENINGS[seed]), rng.choice(ENDINGS[seed])
        for j, (c, score, dt) in enumerate(((wrong, 3, 10), (right, 40, 20))):
            rc.append({"id": f"c{seed}x{i}x{j}", "link_id": f"t3_{sid}", "parent_id": f"t3_{sid}",
                       "author": f"u{i}x{j}", "created_utc": T0 + 100 * i + dt, "score": score,
                       "body": f"{opening} the {c} {thing}, {ending}.", "subreddit": "AskAnything",
                       "stickied": False})
    files = [folder / f"RS_{seed}.jsonl", folder / f"RC_{seed}.jsonl"]
    for path, rows in zip(files, (rs, rc)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def length_baseline(pairs: list[dict]) -> float:
    """Accuracy of 'the longer reply is chosen' (ties count half)."""
    return sum(1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"])
               else 0.0 for p in pairs) / len(pairs)


def marker_baseline(train: list[dict], held: list[dict]) -> float:
    """Best single-word rule learnt on train ('the reply with word w is chosen'), scored on held-out pairs."""
    def words(s):
        return set(s.lower().replace(",", " ").replace(".", " ").split())

    score: dict[str, float] = {}
    for p in train:
        c, r = words(p["chosen"]), words(p["rejected"])
        for w in c - r:
            score[w] = score.get(w, 0) + 1
        for w in r - c:
            score[w] = score.get(w, 0) - 1
    best = max(score, key=lambda w: abs(score[w]))
    sign = 1 if score[best] > 0 else -1

    def pick(p):
        c, r = best in words(p["chosen"]), best in words(p["rejected"])
        return 0.5 if c == r else float((c and sign > 0) or (r and sign < 0))

    return sum(pick(p) for p in held) / len(held)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_pairs_sft_dpo_reward_accuracy(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))  # the reference log-probs are computed here
    assert main(["pairs", *map(str, reddit_dump(tmp_path, 700, 1)), "-o", str(tmp_path / "train.jsonl")]) == 0
    assert main(["pairs", *map(str, reddit_dump(tmp_path, 240, 2)), "-o", str(tmp_path / "held.jsonl")]) == 0
    train, held = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "held.jsonl")
    assert len(train) == 700 and len(held) == 240  # one pair per post survives the pairs rules
    assert abs(length_baseline(held) - 0.5) < 0.08 and abs(marker_baseline(train, held) - 0.5) < 0.08

    common = {"model": {"path": str(tiny_model_dir)}, "logging": {"progress": False, "tensorboard": False},
              "checkpoint": {"every": 40}}
    data = {"max_length": 64, "template": "raw"}
    pipe = {"output_dir": str(tmp_path / "pipe"), "stages": [
        {"name": "sft", "config": {**common, "method": {"name": "full"},
                                   "data": {**data, "train": [{"path": str(tmp_path / "train.jsonl"),
                                                               "columns": {"chosen": "completion"}}]},
                                   "train": {"steps": 60, "batch_size": 16, "lr": 5e-3, "warmup": 10,
                                             "schedule": "constant"}}},
        {"name": "dpo", "from": "sft", "config": {
            **common, "method": {"name": "lora", "r": 8, "alpha": 16},
            "objective": {"name": "dpo", "beta": 0.1},
            "data": {**data, "train": [{"path": str(tmp_path / "train.jsonl")}],
                     "eval": [{"path": str(tmp_path / "held.jsonl")}]},
            "train": {"steps": 40, "batch_size": 16, "lr": 3e-3, "schedule": "constant"}}}]}
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(pipe))
    assert main(["pipeline", str(cfg)]) == 0

    dpo_dir = tmp_path / "pipe" / "dpo"
    lines = read_jsonl(dpo_dir / "metrics.jsonl")
    steps = [m for m in lines if not m.get("eval")]
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"} <= set(steps[0])
    final = [m for m in lines if m.get("eval")][-1]
    k, n = final["eval_correct"], final["eval_pairs"]
    p = binomial_tail(k, n)
    print(f"held-out reward accuracy {k}/{n} = {k / n:.3f}, binomial p = {p:.2e}")
    assert n >= 200 and p < 0.01

    prov = json.loads((dpo_dir / "provenance.json").read_text())
    sft_prov = json.loads((tmp_path / "pipe" / "sft" / "provenance.json").read_text())
    assert prov["start"]["run_rel"] == "../sft" and prov["base_model"] == sft_prov["base_model"]
    assert prov["data"]["reference"]["status"] == "computed"

    # A rerun skips both finished stages.
    capsys.readouterr()
    assert main(["pipeline", str(cfg)]) == 0
    assert capsys.readouterr().out.count("skipped") == 2

    _check_offline_reward_accuracy(tmp_path, held, k)


def _check_offline_reward_accuracy(tmp_path: Path, held: list[dict], k_logged: int) -> None:
    """Independently of the training loop: the DPO checkpoint loaded through Run (SFT merged + adapter) against
    the SFT checkpoint loaded on its own gives the logged held-out accuracy."""
    import torch

    from sftlab.runs import Run
    from sftlab.train.dpo import pair_batch, pair_logps, tokenize_pairs
    from sftlab.data.preferences import Preference

    dpo, sft = Run(tmp_path / "pipe" / "dpo"), Run(tmp_path / "pipe" / "sft")
    policy, tok = dpo.load()
    ref, _ = sft.load()
    prefs = [Preference("text", str(i), p["prompt"], p["chosen"], p["rejected"]) for i, p in enumerate(held)]
    pairs, _ = tokenize_pairs(prefs, tok, dpo.cfg.data)
    correct = 0
    with torch.no_grad():
        for s in range(0, len(pairs), 32):
            batch = pair_batch(pairs[s:s + 32], tok.pad_token_id)
            pc, pr, _, _ = pair_logps(policy.eval(), batch)
            rc, rr, _, _ = pair_logps(ref.eval(), batch)
            correct += int(((pc - rc) > (pr - rr)).sum())
    assert abs(correct - k_logged) <= 2  # merged vs unmerged SFT weights: float rounding may flip a near-tie
