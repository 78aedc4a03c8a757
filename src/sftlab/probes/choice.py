"""choice: multiple-choice accuracy by log-likelihood (as lm-evaluation-harness's `acc` / `acc_norm`).

Rows: `question` (or `prompt` / `messages`), `choices` (a list of strings) and `answer` (the index of
the right choice). Each choice is scored as the assistant's answer to the question (sum of its token
log-probs, plus the end-of-turn token under a chat template); the highest wins. `acc_norm` divides
each score by the choice's length in UTF-8 bytes first, so long choices are not penalised for having
more tokens (lm-eval's `acc_norm`). Both are computed; `length_normalised` picks the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from ..errors import DataError
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset


@dataclass
class ChoiceOptions:
    path: str = doc("JSONL/JSON/CSV/Parquet rows with question, choices (list) and answer (index)", default="")
    length_normalised: bool = doc("score = log-likelihood per byte of the choice (acc_norm) instead of the sum",
                                  default=False)
    kind: Literal["task", "retention"] = doc("what the accuracy measures", default="task")
    limit: int = doc("score a fixed seeded subset of this many questions (0: all)", default=0)
    max_length: int = doc("maximum tokens per question + choice", default=512)
    template: Literal["auto", "chat", "raw"] = doc("how questions are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: choice)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "choice needs the data file to score")
        check(self.limit >= 0, "limit", "must be >= 0")


def parse_row(row: dict, place: str) -> tuple[list[str], int]:
    choices, answer = row.get("choices"), row.get("answer")
    if isinstance(choices, str):  # CSV cells hold the list as JSON text
        import json

        try:
            choices = json.loads(choices)
        except ValueError:
            pass
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{place}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{place}: 'answer' must be the index (0 to {len(choices) - 1}) of the right choice, "
                        f"got {answer!r}")
    return choices, answer


class Choice(BaseProbe):
    registered = "choice"
    higher_is_better = True
    cheap = True

    def score(self, model, tokenizer, ctx: ProbeContext):
        from pathlib import Path

        from .likelihood import group_logprobs, memo_answer_examples, pad_id, vision_maker
        from .texts import prompt_and_images, read_rows

        o = self.options
        rows = read_rows(o.path, "probes.choice.path")
        rows = [rows[i] for i in subset(len(rows), o.limit, ctx.seed)]
        items, images = [], []  # (prompt messages, choices, answer, place); each question's images
        for place, row in rows:
            choices, answer = parse_row(row, place)
            msgs, refs = prompt_and_images(row, place, Path(o.path).expanduser().parent)
            items.append((msgs, choices, answer, place))
            images += [refs] * len(choices)
        flat = [(msgs, c, place) for msgs, choices, _, place in items for c in choices]
        examples = memo_answer_examples(self, tokenizer, [f[0] for f in flat], [f[1] for f in flat], o.template,
                                        o.max_length, [f[2] for f in flat], images)
        groups, at = [], 0
        for _, choices, _, _ in items:  # a question's choices share its prompt
            groups.append(examples[at:at + len(choices)])
            at += len(choices)
        res = group_logprobs(model, groups, pad_id(tokenizer), ctx.batch_size, ctx.resolve_device(model),
                             vision=vision_maker(tokenizer))
        acc, acc_norm = [], []
        for (_, choices, answer, _), row in zip(items, res):
            ll = [r[0] for r in row]
            norm = [s / len(c.encode("utf-8")) for s, c in zip(ll, choices)]
            acc.append(float(max(range(len(ll)), key=lambda j: (ll[j], -j)) == answer))
            acc_norm.append(float(max(range(len(norm)), key=lambda j: (norm[j], -j)) == answer))
        values = acc_norm if o.length_normalised else acc
        chance = sum(1 / len(c) for _, c, _, _ in items) / len(items)
        return self.make_score(sum(values) / len(values), len(values),
                               bootstrap_ci(values, n_boot=ctx.n_boot, seed=ctx.seed),
                               acc=sum(acc) / len(acc), acc_norm=sum(acc_norm) / len(acc_norm),
                               metric="acc_norm" if o.length_normalised else "acc", chance=chance)


register_probe("choice", ChoiceOptions, Choice, "multiple-choice accuracy by log-likelihood (acc, acc_norm)")
