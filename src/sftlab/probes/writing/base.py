"""What a writing scorer is: a registered name, a documented scale and source, and a function from answers to
per-answer values.

A scorer is built once per probe from `ScorerSettings` (the quality probe's options that concern scorers) and
called on every scored checkpoint with the generated answers, the questions they answer and the device. It
returns a `Scored`: one value per answer (None where the answer cannot be scored, e.g. readability of a text
without words) plus secondary per-answer values (Flesch-Kincaid grade, VADER tone) and counts. The probe turns
each into a mean with a bootstrap interval. Libraries a scorer needs are checked when it is built, so a missing
one fails before any model loads, in one line that says what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ...registry import Registry
from ..base import ProbeError

INSTALL = "pip install 'sftlab[quality]'"


@dataclass
class Scored:
    values: list[float | None]  # one per answer; None: not scorable (left out of the mean)
    extra: dict[str, list[float | None]] = field(default_factory=dict)  # secondary per-answer values
    counts: dict[str, int] = field(default_factory=dict)  # totals over the answers (safety categories, ...)


@dataclass(frozen=True)
class ScorerSettings:
    """The options a scorer may be configured with (fields of the quality probe's options)."""

    safety_classifier: str = ""  # 'package.module:function' -> P(unsafe), or a local text-classification model folder
    safety_label: str = ""  # the classifier label that means unsafe ('' : found by its name)
    judge_model: str = ""  # a model.path-style spec of a local causal LM
    judge_rubric: str = "overall"  # a built-in rubric name or your own criterion text
    judge_dtype: str = "float32"
    batch_size: int = 8


class Scorer(Protocol):
    def __call__(self, answers: list[str], questions: list[str], device) -> Scored: ...


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    build: Callable[[ScorerSettings], Scorer]
    scale: str  # what the numbers mean, e.g. "0-1, higher: more empathic"
    source: str  # where the method comes from (a citation, a library)
    requires: tuple[str, ...] = ()  # importable modules it needs
    install: str = INSTALL  # how to get them
    secondary: tuple[str, ...] = ()  # names of its secondary per-answer values


SCORERS: Registry[ScorerSpec] = Registry("writing scorer")

# The five dimensions of issue 21, in display order; `judge` is the sixth scorer, a model's rating.
DIMENSIONS = ("readability", "empathy", "safety", "actionability", "connection")


def register_scorer(spec: ScorerSpec) -> ScorerSpec:
    return SCORERS.register(spec.name, spec)


def missing_modules(spec: ScorerSpec) -> list[str]:
    return [m for m in spec.requires if importlib.util.find_spec(m) is None]


def build_scorer(name: str, settings: ScorerSettings | None = None, what: str = "probes.quality.dimensions"):
    """The scorer `name`, its libraries checked: a missing one is a one-line ProbeError naming the install."""
    spec = SCORERS.get(name)
    gone = missing_modules(spec)
    if gone:
        raise ProbeError(f"{what}: {name} needs {' and '.join(gone)} (not installed); {spec.install}")
    return spec.build(settings or ScorerSettings())


def clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def load_function(path: str, what: str) -> Callable:
    """Import 'package.module:function' (or 'package.module.function'); a one-line ProbeError if it fails."""
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ProbeError(f"{what}: {path!r} is not a dotted path; write it as 'package.module:function'")
    try:
        obj = importlib.import_module(mod)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ProbeError(f"{what}: cannot import module {mod!r} ({type(e).__name__}: {first_line(e)}); check the "
                         "spelling and that it is on the Python path") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProbeError(f"{what}: module {mod!r} has no {attr!r}; check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ProbeError(f"{what}: {path!r} is a {type(obj).__name__}, not a function taking a string")
    return obj


def call_function(fn: Callable, text: str, path: str, what: str) -> float:
    """fn(text) as a finite float; anything else (an exception, a string, NaN) is a one-line ProbeError."""
    try:
        value = fn(text)
    except Exception as e:
        raise ProbeError(f"{what}: {path} raised {type(e).__name__}: {first_line(e)}") from None
    try:  # ints, floats, numpy / torch scalars; not strings or booleans
        number = float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ProbeError(f"{what}: {path} returned {value!r}; it must return a finite float")
    return number
