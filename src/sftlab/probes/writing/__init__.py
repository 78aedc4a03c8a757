"""Writing-quality scorers for generated answers: readability, empathy, safety, actionability, connection, judge,
and variety (a guard against repetition, which games the others).

Each scorer is registered by name with its scale, its source and the libraries it needs (`SCORERS`); the
`quality` probe runs the ones its `dimensions` option lists on every generation it scores and reports each as a
mean with a bootstrap interval. What each measures, where it comes from and where it fails: the docstring of its
module and docs/writing-quality.md. Importing this package registers them all and imports neither torch nor
the scorers' libraries (textstat, vaderSentiment), which load on first use.
"""

from . import empathy, judge, readability, rules, safety, variety  # noqa: F401  (importing registers the scorers)
from .base import (DIMENSIONS, SCORERS, Scored, ScorerSettings, ScorerSpec, build_scorer, missing_modules,
                   register_scorer)

__all__ = ["DIMENSIONS", "SCORERS", "Scored", "ScorerSettings", "ScorerSpec", "build_scorer", "missing_modules",
           "register_scorer"]
