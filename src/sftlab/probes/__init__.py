"""Probes: score a model for the task it learns and the general ability it keeps.

Importing this package registers every built-in probe; it imports no torch (options validate fast).
`build_probe(name, options)` makes one; `probe.score(model, tokenizer, ProbeContext(...))` scores.
"""

from . import choice, classify, generate, heldout, kl, lmeval, perplexity, quality, toolcall  # noqa: F401
from .base import (PROBES, BaseProbe, Probe, ProbeContext, ProbeError, ProbeSpec, Score, bootstrap_ci, build_probe,
                   register_probe)

__all__ = ["PROBES", "BaseProbe", "Probe", "ProbeContext", "ProbeError", "ProbeSpec", "Score", "bootstrap_ci",
           "build_probe", "register_probe"]
