"""Forgetting remedies: replay, penalties towards the base (KL, L2-SP), a loss-side remedy (DFT), averaging
along the path (EMA, WiSE-FT). Importing this package registers every built-in remedy; it imports no torch."""

from . import dft, ema, kl, l2sp, replay, wise  # noqa: F401  (registration side effects)
from .base import REMEDIES, Hooks, RemedySpec, build_remedies, register_remedy

__all__ = ["REMEDIES", "Hooks", "RemedySpec", "build_remedies", "register_remedy"]
