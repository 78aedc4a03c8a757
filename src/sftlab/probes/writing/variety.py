"""variety: is the answer text, or a loop? A guard for the other scorers, which degenerate text can game.

Short sentences repeated, or a run of empty bullets, read as very easy (Flesch) and look like steps; DPO on
readability pairs produced exactly that on SmolLM2-135M (docs/writing-quality.md). `variety` measures it:

    variety = distinct_3 x (1 - repeated_lines)

distinct_3: distinct word trigrams over all word trigrams of the answer (1: no trigram said twice); answers of
fewer than three words count 1. repeated_lines: the share of the answer's non-blank lines that repeat an earlier
line (after lower-casing and collapsing spaces) or carry no word at all ("*", "-", "1."). 0-1, higher: less
repetition. Source: distinct-n (J. Li, M. Galley, C. Brockett, J. Gao and B. Dolan, "A Diversity-Promoting
Objective Function for Neural Conversation Models", NAACL 2016) computed within one answer, as the sequence-level
repetition of S. Welleck et al., "Neural Text Generation with Unlikelihood Training", ICLR 2020; the line rule
and the product are sftlab's.

Limits: surface repetition only. Legitimate parallel structure ("Step 1: ... Step 2: ...") repeats a little and
costs a little; a paraphrased loop passes. Read it beside readability and actionability, not as quality alone.
"""

from __future__ import annotations

import re

from .base import Scored, ScorerSpec, register_scorer

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPACE = re.compile(r"\s+")


def variety_parts(text: str) -> dict[str, float]:
    """{'distinct_3', 'repeated_lines', 'variety'} of one answer."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    lines = [_SPACE.sub(" ", ln.strip().lower()) for ln in text.splitlines() if ln.strip()]
    seen, bad = set(), 0
    for ln in lines:
        if ln in seen or not _WORD.search(ln):
            bad += 1
        seen.add(ln)
    repeated = bad / len(lines) if lines else 0.0
    return {"distinct_3": distinct, "repeated_lines": repeated, "variety": distinct * (1.0 - repeated)}


def _variety(settings):
    def score(answers: list[str], questions: list[str], device) -> Scored:
        parts = [variety_parts(a) for a in answers]
        return Scored([p["variety"] for p in parts], extra={"distinct_3": [p["distinct_3"] for p in parts]})

    return score


register_scorer(ScorerSpec(
    "variety", _variety, scale="0-1, higher: less repetition (distinct word trigrams x non-repeated lines)",
    source="distinct-n (Li et al. 2016) within one answer, as Welleck et al. 2020's sequence-level repetition; "
           "the line rule is sftlab's", secondary=("distinct_3",)))
