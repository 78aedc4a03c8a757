"""actionability and connection: documented surface rules, no library.

actionability - can the reader act on the answer? Four signals, each saturating, weighted:

    actionability = 0.3 * min(1, steps / 3) + 0.3 * min(1, imperatives / 3)
                  + 0.2 * min(1, next_actions / 2) + 0.2 * min(1, concrete / 2)

steps: lines that start a numbered or bulleted item ("1.", "2)", "-", "*", "Step 3:"); imperatives: sentences
or items that open with a verb of instruction (IMPERATIVE_VERBS, after an optional "please", "first",
"then", "next", "finally"); next_actions: phrases that hand the reader a next move ("start by", "the next step",
"make sure", "I recommend", "today", "this week"); concrete: quantities and times with a unit ("10 minutes",
"2 cups", "3 times a week", "at 7 pm", "20%"). Source: the US Federal Plain Language Guidelines
(plainlanguage.gov, rev. 2011), which advise instructions as lists of steps in order, in the imperative, and
the "where to next?" (feed forward) question of J. Hattie and H. Timperley, "The Power of Feedback", Review of
Educational Research 77(1), 2007; the rules and weights are sftlab's.

connection - does the answer speak to this reader? Three signals:

    connection = 0.4 * min(1, you_rate / 0.05) + 0.3 * min(1, acknowledgements / 2) + 0.3 * min(1, questions)

you_rate: second-person words (you, your, yourself, you're, ...) per word, one in twenty saturates;
acknowledgements: phrases that reflect the reader's situation back ("it sounds like you", "you mentioned", "in
your situation", "since you"); questions: sentences ending in "?" that ask the reader something (they
contain a second-person word or start with do/does/would/could/can/have/is/are/what/how/which/when). Source:
reader-centred writing (the same Plain Language Guidelines advise addressing the reader as "you"), the
*reflections* and *open questions* of motivational interviewing (W. R. Miller and S. Rollnick, Motivational
Interviewing, 3rd ed., 2013) and EPITOME's explorations (Sharma et al. 2020); the rules and weights are sftlab's.

Limits (both): English surface patterns. They reward the form of help, not its correctness: a confident list of
wrong steps is very actionable, and "you" in every sentence connects on paper. The saturation points make
longer answers score higher up to a point. Use the `judge` scorer with a larger model for a reading of content.
"""

from __future__ import annotations

import re

from .base import ScorerSettings, Scored, ScorerSpec, register_scorer

# Verbs that open an instruction in everyday help text (second person, imperative mood).
IMPERATIVE_VERBS = frozenset("""
add adjust allow apply arrange ask avoid back be begin block book boil breathe bring build buy calculate call
cancel change charge check choose clean clear click close combine compare connect consider contact copy count
cover create cut decide delete describe disable divide do download drink drive drop eat email enable enter
exercise fill find finish fix focus follow get give go heat help hold identify include install keep label
leave let limit list listen log look make mark measure meet mix move note open order organise organize pack
pay pick place plan plug pour practice practise prepare press print put read reach record reduce refer
register reinstall remember remove repeat replace report request reset rest restart return review rinse run
save schedule search select send set share sign sleep slow sort speak spend split start stay step stir stop
store switch take talk tell test think tighten track try turn type unplug update upload use verify visit wait
walk wash watch wear write
""".split())
_LEAD = re.compile(r"^(?:(?:please|first|firstly|second|secondly|then|next|finally|now|also|and|lastly|"
                   r"after that|afterwards|to start)\b[,:]?\s+)+", re.IGNORECASE)
_ITEM = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022]|step \d+[:.)]?)\s+", re.IGNORECASE | re.MULTILINE)
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
NEXT_ACTIONS = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?:start|begin) (?:by|with)\b", r"\b(?:the )?(?:next|first) step\b", r"\bmake sure\b",
    r"\bi (?:would )?(?:recommend|suggest)\b",
    r"\byou (?:should|could|can) (?:try|start|begin|call|contact|book|use)\b",
    r"\b(?:today|tonight|tomorrow|this week|this weekend|right now|right away)\b", r"\bgo ahead and\b",
    r"\bonce (?:you(?:'ve| have)|that'?s|this is) done\b",
)]
_UNITS = (r"(?:seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|times?|%|percent|mg|g|kg|"
          r"grams?|ml|l|litres?|liters?|cups?|tablespoons?|tbsp|teaspoons?|tsp|steps?|km|miles?|metres?|meters?|"
          r"reps?|sets?|pages?|words?|dollars?|euros?|°[cf]?|degrees?)")
CONCRETE = [re.compile(p, re.IGNORECASE) for p in (
    rf"\b\d+(?:[.,]\d+)?(?:\s*(?:-|to)\s*\d+(?:[.,]\d+)?)?\s*{_UNITS}(?![a-z])",
    r"\b\d{1,2}(?::\d{2})?\s*(?:am|pm)\b", r"\b\d{1,2}:\d{2}\b", r"[$\u20ac\u00a3]\s?\d+",
)]
_YOU = re.compile(r"\b(?:you|your|yours|yourself|yourselves|you're|you've|you'll|you'd)\b", re.IGNORECASE)
_WORDS = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
SITUATION = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?:it )?sounds like (?:you|your)\b", r"\bit (?:seems|looks) like (?:you|your)\b",
    r"\byou(?:'ve)? (?:mentioned|said|described|told me|wrote)\b", r"\bin your (?:case|situation|position|shoes)\b",
    r"\b(?:given|since|because) (?:that )?you(?:'re| are| have|'ve)?\b",
    r"\bfrom what you(?:'ve)? (?:said|described|wrote)\b",
    r"\bi hear (?:that |you)\b", r"\bi understand (?:that )?(?:you|your)\b", r"\bi see (?:that )?you\b",
    r"\bthanks? (?:you )?for (?:asking|reaching out|sharing|your question)\b",
)]
_QUESTION_START = re.compile(r"^(?:do|does|did|would|could|can|have|has|is|are|what|how|which|when|where|who|why)\b",
                             re.IGNORECASE)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SPLIT.split(text) if s and s.strip()]


def count(patterns: list[re.Pattern], text: str) -> int:
    return sum(len(p.findall(text)) for p in patterns)


def imperative(sentence: str) -> bool:
    """Does the sentence (or list item) open with a verb of instruction?"""
    body = _LEAD.sub("", _ITEM.sub("", sentence)).lstrip("*_ \t")
    first = re.match(r"[A-Za-z]+", body)
    return bool(first) and first.group(0).lower() in IMPERATIVE_VERBS


def actionability_parts(text: str) -> dict[str, float]:
    steps = len(_ITEM.findall(text))
    imperatives = sum(imperative(s) for s in sentences(text))
    nxt, concrete = count(NEXT_ACTIONS, text), count(CONCRETE, text)
    value = (0.3 * min(1.0, steps / 3) + 0.3 * min(1.0, imperatives / 3) + 0.2 * min(1.0, nxt / 2)
             + 0.2 * min(1.0, concrete / 2))
    return {"actionability": value, "steps": steps, "imperatives": imperatives, "next_actions": nxt,
            "concrete": concrete}


def connection_parts(text: str) -> dict[str, float]:
    words = _WORDS.findall(text)
    you = len(_YOU.findall(text))
    rate = you / len(words) if words else 0.0
    ack = count(SITUATION, text)
    questions = sum(1 for s in sentences(text) if s.endswith("?") and (_YOU.search(s) or _QUESTION_START.match(s)))
    value = 0.4 * min(1.0, rate / 0.05) + 0.3 * min(1.0, ack / 2) + 0.3 * min(1.0, questions)
    return {"connection": value, "you_rate": rate, "acknowledgements": ack, "questions": questions}


class Actionability:
    def __call__(self, answers: list[str], questions: list[str], device=None) -> Scored:
        parts = [actionability_parts(t) for t in answers]
        return Scored([p["actionability"] for p in parts], {},
                      {k: int(sum(p[k] for p in parts)) for k in ("steps", "imperatives", "next_actions", "concrete")})


class Connection:
    def __call__(self, answers: list[str], questions: list[str], device=None) -> Scored:
        parts = [connection_parts(t) for t in answers]
        return Scored([p["connection"] for p in parts], {},
                      {k: int(sum(p[k] for p in parts)) for k in ("acknowledgements", "questions")})


def _actionability(settings: ScorerSettings) -> Actionability:
    return Actionability()


def _connection(settings: ScorerSettings) -> Connection:
    return Connection()


register_scorer(ScorerSpec(
    "actionability", _actionability, scale="0-1, higher: steps, imperatives, next actions, concrete amounts",
    source="rules after the US Federal Plain Language Guidelines (2011) and Hattie & Timperley 2007; "
           "weights are sftlab's"))
register_scorer(ScorerSpec(
    "connection", _connection, scale="0-1, higher: addresses the reader, reflects their situation, asks back",
    source="rules after the Plain Language Guidelines (address the reader as you), motivational interviewing's "
           "reflections and open questions (Miller & Rollnick 2013) and EPITOME explorations (Sharma et al. 2020)"))
