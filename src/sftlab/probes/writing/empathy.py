"""empathy: does the answer acknowledge the reader's feelings, warmly and without dismissing them?

Source: the two affective mechanisms of the EPITOME framework, A. Sharma et al., "A Computational Approach to
Understanding Empathy Expressed in Text-Based Mental Health Support", EMNLP 2020: *emotional reactions*
(expressing sorrow, concern or warmth: "I'm so sorry", "I feel for you") and *interpretations* (showing
that the feelings are understood and legitimate: "that sounds really hard", "it's understandable to feel
..."), written here as a hand-made phrase lexicon (EMPATHY below); the third mechanism, explorations
(questions back), is counted by `connection`. Tone comes from VADER, C. J. Hutto and E. Gilbert, "VADER: A
Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM 2014 (vaderSentiment, its
lexicon ships inside the package).

Per answer, on 0-1 (higher: more empathic):

    empathy = clip(0.75 * min(1, acknowledgements / 2) + 0.25 * min(1, vader_pos / 0.25) - 0.5 * dismissals)

acknowledgements: matches of EMPATHY; vader_pos: VADER's share of the text in positive words (warmth);
dismissals: matches of DISMISSIVE ("calm down", "get over it", "stupid question"). Two acknowledgements
saturate the first term. VADER's compound valence (-1 to 1) is reported beside it as `tone` and is not part
of the score: sympathy mirrors the reader's distress in negative words ("sorry", "painful"), so valence
alone would rank "Great question! Python is awesome!" above a condolence.

Limits: phrase matching, English only; an empathic answer in words the lexicon lacks scores low, and a
formulaic "I'm sorry to hear that" scores like a sincere one; it cannot tell whether empathy fits the
question (a request for a recipe needs none). Use the `judge` scorer with a larger model to do better.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .base import ScorerSettings, Scored, ScorerSpec, clip01, register_scorer

INSTALL = "pip install 'sftlab[quality]' (or: pip install 'vaderSentiment>=3.3.2,<4')"

_FEEL = (r"(?:hard|difficult|tough|painful|stressful|frustrating|overwhelming|scary|frightening|exhausting|"
         r"upsetting|lonely|rough|heartbreaking|devastating|a lot)")
_ADV = r"(?:really |so |very |incredibly |truly |completely |totally |perfectly |deeply )?"

# Emotional reactions and interpretations (EPITOME); "I'm sorry, but ..." is a refusal, not sympathy.
EMPATHY = [re.compile(p, re.IGNORECASE) for p in (
    rf"\bi(?:'m| am) {_ADV}sorry\b(?!,? but\b)(?! (?:for|about) (?:the|any) (?:confusion|inconvenience|error))",
    r"\bsorry (?:to hear|for your loss|that you|you(?:'re| are) (?:going|dealing|feeling))",
    rf"\b(?:that|this|it) (?:sounds|must be|must have been|must feel|seems) (?:like )?{_ADV}{_FEEL}\b",
    rf"\b(?:it'?s|it is) {_ADV}(?:understandable|normal|natural|okay|ok|human) to (?:feel|cry|grieve|worry|"
    r"struggle|miss|be (?:upset|sad|angry|scared|afraid|anxious|nervous|worried|overwhelmed|frustrated|hurt))\b",
    rf"\b(?:that'?s|that is|it'?s|it is) {_ADV}(?:understandable|valid)\b",
    r"\bit makes (?:complete |total )?sense (?:that you|to feel|you feel|you'?d)\b",
    r"\byou(?:'re| are) not alone\b",
    r"\bi (?:can )?(?:only )?imagine how\b", r"\bi understand how (?:you|hard|difficult|painful|much)\b",
    r"\byour (?:feelings|emotions|concerns) are (?:valid|understandable|normal|real)\b",
    r"\bthank you for (?:sharing|telling|trusting|opening up)\b",
    r"\b(?:be|being) (?:kind|gentle|patient) (?:to|with) yourself\b", r"\btake care of yourself\b",
    r"\btake (?:all )?the time you need\b", r"\bmy (?:condolences|sympathies)\b", r"\bi feel for you\b",
    rf"\bhow {_FEEL} (?:this|that|it) (?:is|must be)\b", r"\bi(?:'m| am) (?:glad|happy) you reached out\b",
)]

# Dismissal and contempt: each match takes 0.5 off.
DISMISSIVE = [re.compile(p, re.IGNORECASE) for p in (
    r"\bget over it\b", r"\bcalm down\b", r"\bstop (?:complaining|whining|crying|worrying|being so)\b",
    r"\bnot (?:a|that) big (?:of a )?deal\b", r"\byour (?:own )?fault\b", r"\bwho cares\b", r"\bdeal with it\b",
    r"\bman up\b", r"\bdon'?t be (?:so )?(?:dramatic|sensitive|silly|ridiculous)\b",
    r"\b(?:you'?re|you are) (?:overreacting|being (?:dramatic|ridiculous|silly))\b",
    r"\b(?:stupid|dumb|idiotic|silly|pathetic) (?:question|idea)\b", r"\bfigure it out yourself\b",
    r"\bnot my problem\b",
)]


def count(patterns: list[re.Pattern], text: str) -> int:
    return sum(len(p.findall(text)) for p in patterns)


@lru_cache(maxsize=1)
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads vader_lexicon.txt from the package folder: no download


def empathy_parts(text: str) -> dict[str, float]:
    """The score and what it is made of, for one answer."""
    polarity = vader().polarity_scores(text)
    ack, dismiss = count(EMPATHY, text), count(DISMISSIVE, text)
    value = clip01(0.75 * min(1.0, ack / 2) + 0.25 * min(1.0, polarity["pos"] / 0.25) - 0.5 * dismiss)
    return {"empathy": value, "tone": polarity["compound"], "acknowledgements": ack, "dismissals": dismiss}


class Empathy:
    def __call__(self, answers: list[str], questions: list[str], device=None) -> Scored:
        parts = [empathy_parts(t) for t in answers]
        return Scored([p["empathy"] for p in parts], {"tone": [p["tone"] for p in parts]},
                      {"acknowledgements": sum(p["acknowledgements"] for p in parts),
                       "dismissals": sum(p["dismissals"] for p in parts)})


def build(settings: ScorerSettings) -> Empathy:
    return Empathy()


register_scorer(ScorerSpec(
    "empathy", build, scale="0-1, higher: acknowledges the reader's feelings, warmly (tone: VADER compound, -1 to 1)",
    source="EPITOME emotional reactions and interpretations (Sharma et al. 2020) as a phrase lexicon; "
           "VADER (Hutto & Gilbert 2014) for warmth and tone",
    requires=("vaderSentiment",), install=INSTALL, secondary=("tone",)))
