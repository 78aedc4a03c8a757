"""classify: label scoring - each label's verbalizer scored as the assistant's answer, argmax wins.

Rows hold a prompt (`prompt`, or `messages` whose final assistant turn, if any, is dropped) and a
gold `label` (or, without one, the final assistant turn of `messages`: a chat eval file works as is).
For every row and every label, the log-likelihood of that label's verbalizer as the answer (sum of
its token log-probs, plus the end-of-turn token under a chat template) is computed in batched
forward passes (each prompt run once, its key/value cache shared by the labels); the prediction is the
label with the highest score, so the model never has to produce the exact string. This is the usual
form for sentence-level categorisation.

Value: accuracy (bootstrap CI over rows). Extra: macro-F1 (with CI), per-class F1, confusion counts,
and the majority-class baseline (accuracy of always answering the most frequent gold label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from ..errors import DataError
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset
from .metrics import confusion, macro_f1, majority_baseline


@dataclass
class ClassifyOptions:
    path: str = doc("JSONL/JSON/CSV/Parquet rows with 'prompt' (or 'messages') and the gold label", default="")
    labels: list[str] = doc("the label set, in tie-break order (empty: the sorted gold labels of the file)",
                            default_factory=list)
    verbalizers: dict[str, str] = doc("label -> the answer text scored for it (default: the label itself)",
                                      default_factory=dict)
    label_field: str = doc("field holding the gold label (absent: the final assistant turn of 'messages')",
                           default="label")
    kind: Literal["task", "retention"] = doc("what the accuracy measures", default="task")
    limit: int = doc("score a fixed seeded subset of this many rows (0: all)", default=0)
    max_length: int = doc("maximum tokens per prompt + answer (prompts are left-truncated first)", default=512)
    template: Literal["auto", "chat", "raw"] = doc("how prompts are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: classify)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "classify needs the data file to score")
        check(self.limit >= 0, "limit", "must be >= 0")
        unknown = sorted(set(self.verbalizers) - set(self.labels)) if self.labels else []
        check(not unknown, "verbalizers", f"{unknown} are not in labels; add them or fix the names")
        check(len(set(self.labels)) == len(self.labels), "labels", "has duplicates")


def encode_pairs(gold: list[str], pred: list[str], labels: list[str]) -> list[float]:
    """(gold, pred) pairs as one number each, so the bootstrap can resample them together."""
    index = {lab: i for i, lab in enumerate(labels)}
    return [float(index[g] * len(labels) + index[p]) for g, p in zip(gold, pred)]


def macro_f1_stat(n_labels: int):
    """A numpy statistic: macro-F1 (over classes present) of encoded (gold, pred) pairs."""
    import numpy as np

    def stat(codes) -> float:
        codes = np.asarray(codes, dtype=np.int64)
        g, p = codes // n_labels, codes % n_labels
        tp = np.bincount(g[g == p], minlength=n_labels)
        ng, npred = np.bincount(g, minlength=n_labels), np.bincount(p, minlength=n_labels)
        present = (ng + npred) > 0
        return float((2 * tp[present] / (ng + npred)[present]).mean())

    return stat


class Classify(BaseProbe):
    registered = "classify"
    higher_is_better = True
    cheap = True

    def rows(self, seed: int):
        from pathlib import Path

        from .texts import prompt_and_images, read_rows, reference

        o = self.options
        rows = read_rows(o.path, "probes.classify.path")
        rows = [rows[i] for i in subset(len(rows), o.limit, seed)]
        prompts, gold, places, images = [], [], [], []
        for place, row in rows:
            lab = reference(row, place, (o.label_field,))  # or the final assistant turn of `messages`
            msgs, refs = prompt_and_images(row, place, Path(o.path).expanduser().parent)  # refs: its images
            prompts.append(msgs)
            images.append(refs)
            gold.append(lab)
            places.append(place)
        labels = list(o.labels) or sorted(set(gold))
        for place, g in zip(places, gold):
            if g not in labels:
                raise DataError(f"{place}: label {g!r} is not in the label set ({', '.join(labels)}); add it to "
                                "probes.classify.labels or fix the row")
        return prompts, gold, places, labels, images

    def label_scores(self, model, tokenizer, ctx: ProbeContext, prompts, places, labels,
                     images=None) -> list[list[float]]:
        """Per row, per label: log-likelihood of the label's verbalizer as the answer (`images`: each row's)."""
        from .likelihood import group_logprobs, memo_answer_examples, pad_id, vision_maker

        o = self.options
        verbal = [o.verbalizers.get(lab, lab) for lab in labels]
        L = len(labels)
        images = images or [[] for _ in prompts]
        examples = memo_answer_examples(self, tokenizer, [p for p in prompts for _ in range(L)],
                                        verbal * len(prompts), o.template, o.max_length,
                                        [pl for pl in places for _ in range(L)], [r for r in images for _ in range(L)])
        groups = [examples[i * L:(i + 1) * L] for i in range(len(prompts))]  # a row's labels share its prompt
        res = group_logprobs(model, groups, pad_id(tokenizer), ctx.batch_size, ctx.resolve_device(model),
                             vision=vision_maker(tokenizer))
        return [[r[0] for r in row] for row in res]

    def score(self, model, tokenizer, ctx: ProbeContext):
        prompts, gold, places, labels, images = self.rows(ctx.seed)
        scores = self.label_scores(model, tokenizer, ctx, prompts, places, labels, images)
        pred = [labels[max(range(len(labels)), key=lambda j: (s[j], -j))] for s in scores]
        correct = [float(g == p) for g, p in zip(gold, pred)]
        f1, per_class = macro_f1(gold, pred, labels)
        f1_ci = bootstrap_ci(encode_pairs(gold, pred, labels), stat=macro_f1_stat(len(labels)), n_boot=ctx.n_boot,
                             seed=ctx.seed)
        maj_label, maj_acc = majority_baseline(gold)
        return self.make_score(sum(correct) / len(correct), len(correct),
                               bootstrap_ci(correct, n_boot=ctx.n_boot, seed=ctx.seed),
                               macro_f1=f1, macro_f1_ci=list(f1_ci), per_class_f1=per_class,
                               confusion=confusion(gold, pred), labels=labels, majority_label=maj_label,
                               majority_baseline=maj_acc)


register_probe("classify", ClassifyOptions, Classify,
               "label scoring: log-likelihood of each label's verbalizer, argmax; accuracy and macro-F1")
