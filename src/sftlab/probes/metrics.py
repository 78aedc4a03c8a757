"""Text metrics for probes: pure functions on strings, no dependencies.

- exact match and normalised match (case, whitespace and punctuation ignored);
- macro-F1 over a label set and confusion counts;
- ROUGE-L F1 from the longest common subsequence of word tokens (Lin 2004, "ROUGE: A Package for
  Automatic Evaluation of Summaries", sec. 3.1, with beta = 1);
- Flesch reading ease (Flesch 1948): 206.835 - 1.015 words/sentences - 84.6 syllables/words, with a
  vowel-group syllable heuristic (exact for most common words, off by one on some).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Lower case, punctuation removed (every Unicode P* character), whitespace collapsed and stripped."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return _WS.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace (nothing else forgiven)."""
    return prediction.strip() == reference.strip()


def normalised_match(prediction: str, reference: str) -> bool:
    return normalise_text(prediction) == normalise_text(reference)


def words(text: str) -> list[str]:
    return normalise_text(text).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) x len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on normalised word tokens: 2PR/(P+R) with P = LCS/|pred|, R = LCS/|ref|; 1.0 if both empty."""
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def confusion(gold: list[str], pred: list[str]) -> dict[str, dict[str, int]]:
    """gold label -> predicted label -> count."""
    out: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, pred):
        row = out.setdefault(g, {})
        row[p] = row.get(p, 0) + 1
    return {g: dict(sorted(r.items())) for g, r in sorted(out.items())}


def macro_f1(gold: list[str], pred: list[str], labels: list[str] | None = None) -> tuple[float, dict[str, float]]:
    """Mean per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in gold or predictions.

    With `labels`, only those classes are averaged; a prediction outside the label set is a miss for
    its gold class (a false negative) and a false positive for no class (scikit-learn's `labels=`).
    """
    seen = set(gold) | set(pred)
    classes = [c for c in (labels if labels is not None else sorted(seen)) if c in seen]
    if not classes:
        return 0.0, {}
    per = {}
    for c in classes:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        per[c] = 2 * tp / (2 * tp + fp + fn)
    return sum(per.values()) / len(per), per


def majority_baseline(gold: list[str]) -> tuple[str, float]:
    """The most frequent gold label (ties: alphabetically first) and the accuracy of always answering it."""
    if not gold:
        return "", 0.0
    counts = Counter(gold)
    label = min(counts, key=lambda c: (-counts[c], c))
    return label, counts[label] / len(gold)


# ------------------------------------------------------------------------------------------ readability

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def syllables(word: str) -> int:
    """Vowel groups, minus a silent final e / -es / -ed; at least 1 (numbers count 1 per digit group)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 1
    n = len(re.findall(r"[aeiouy]+", w))
    if n > 1 and ((w.endswith("e") and not w.endswith(("le", "ee", "ye")))
                  or (w.endswith("es") and not w.endswith(("ses", "zes", "ces", "ges", "xes", "shes", "ches")))
                  or (w.endswith("ed") and not w.endswith(("ted", "ded")))):
        n -= 1
    return max(1, n)


def text_stats(text: str) -> dict[str, int]:
    ws = _WORD.findall(text)
    sentences = max(1, len(_SENTENCE_END.findall(text.strip()))) if ws else 0
    return {"words": len(ws), "sentences": sentences, "syllables": sum(syllables(w) for w in ws)}


def flesch_reading_ease(text: str) -> float | None:
    """206.835 - 1.015 (words / sentences) - 84.6 (syllables / words); None for text without words.

    Higher reads easier: 90-100 a child of 11, 60-70 plain English, below 30 academic prose. A text
    without a sentence-ending mark counts as one sentence.
    """
    s = text_stats(text)
    if s["words"] == 0:
        return None
    return 206.835 - 1.015 * s["words"] / s["sentences"] - 84.6 * s["syllables"] / s["words"]
