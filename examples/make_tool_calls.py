"""Write examples/data/tool_calls_{train,eval}.jsonl: questions that need a tool vs questions answered plainly.

    .venv/bin/python examples/make_tool_calls.py

The worked example of functional tokens (configs/tool_calls_lora.yaml): a question that needs a tool is
answered with one call, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, anything else with a
plain sentence. Three tools: calculator (arithmetic), get_weather and get_time (a city). Deterministic
(a seeded generator over fixed word lists); eval questions use numbers, cities, countries and words that
no training question uses, so the probe measures the format on held-out questions, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"
SYSTEM = ("You can call tools: calculator(expression), get_weather(city), get_time(city). To call one, answer "
          "with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> and nothing else; answer other "
          "questions directly.")

CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Rome", "Sydney", "Toronto", "Nairobi", "Madrid",
          "Seoul", "Dublin", "Bangkok", "Chicago", "Vienna", "Lagos", "Prague", "Denver", "Havana"]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("Italy", "Rome"), ("Spain", "Madrid"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Mexico", "Mexico City")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("early", "late"), ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("strong", "weak"),
             ("old", "young"), ("hard", "soft"), ("wet", "dry"), ("near", "far"), ("rich", "poor"),
             ("loud", "quiet"), ("thick", "thin"), ("high", "low"), ("clean", "dirty"), ("first", "last")]
COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
           ("milk", "white"), ("a fire truck", "red"), ("the sea", "blue"), ("a crow", "black"),
           ("chocolate", "brown"), ("a flamingo", "pink"), ("an emerald", "green"), ("a pumpkin", "orange")]
OPS = [("+", "plus"), ("-", "minus"), ("*", "times")]


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def tool_rows(rng: random.Random, cities: list[str], numbers: range, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.choice(["calc", "calc", "weather", "time"])
        if kind == "calc":
            a, b = rng.choice(numbers), rng.choice(numbers)
            sym, word = rng.choice(OPS)
            q = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {sym} {b}.", f"How much is {a} {sym} {b}?"])
            rows.append((q, call("calculator", expression=f"{a} {sym} {b}")))
        elif kind == "weather":
            c = rng.choice(cities)
            q = rng.choice([f"What's the weather in {c} right now?", f"Is it raining in {c}?",
                            f"How warm is it in {c} today?"])
            rows.append((q, call("get_weather", city=c)))
        else:
            c = rng.choice(cities)
            q = rng.choice([f"What time is it in {c}?", f"What is the local time in {c} now?"])
            rows.append((q, call("get_time", city=c)))
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}], "needs_tool": True} for q, a in rows]


def plain_rows(capitals, opposites, colours) -> list[dict]:
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in capitals]
    qa += [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in opposites]
    qa += [(f"What colour is {x}?", f"{x[0].upper() + x[1:]} is {y}.") for x, y in colours]
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}], "needs_tool": False} for q, a in qa]


def main() -> None:
    rng = random.Random(0)
    # held out: the last 5 cities, numbers 50-99 (train 2-49), the last 5 capitals/opposites/4 colours
    train = tool_rows(rng, CITIES[:15], range(2, 50), 120) + plain_rows(CAPITALS[:15], OPPOSITES[:15], COLOURS[:12])
    ev = tool_rows(rng, CITIES[15:], range(50, 100), 32) + plain_rows(CAPITALS[15:], OPPOSITES[15:], COLOURS[12:])
    # the plain questions are few: repeat them so a batch holds both kinds about equally
    train += plain_rows(CAPITALS[:15], OPPOSITES[:15], COLOURS[:12])
    rng.shuffle(train)
    rng.shuffle(ev)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tool_calls_train.jsonl", train), ("tool_calls_eval.jsonl", ev)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{OUT / name}: {len(rows)} rows, {sum(r['needs_tool'] for r in rows)} need a tool")


if __name__ == "__main__":
    main()
