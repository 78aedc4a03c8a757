"""What a probe is: a small object with one `score(model, tokenizer, ctx) -> Score` method.

A probe declares whether it measures the task being learned or retained general ability (`kind`),
which direction is better, and whether it is `cheap` (likelihood-based: one forward pass per
example, run on every checkpoint) or generation-based (run on chosen checkpoints). Probes register
by name with an options dataclass, like methods, so configs validate before torch loads and
`sftlab config --show` can list every option. This module imports nothing heavy.

Every score carries its sample count and a percentile-bootstrap confidence interval over examples
(Efron & Tibshirani 1993, ch. 13); token-level losses resample whole examples and recompute the
token-weighted mean, so long examples keep their weight and tokens of one example stay together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..configtools import ConfigError, from_dict
from ..errors import SftlabError
from ..models import cache_root
from ..registry import PROBES as _PROBES
from ..registry import Registry

class ProbeError(SftlabError):
    """A probe that cannot run as configured (bad data file, bad scorer path, no base model, ...)."""


@dataclass
class Score:
    name: str
    value: float
    kind: str  # "task" | "retention"
    higher_is_better: bool
    n: int  # examples scored (the bootstrap resamples these)
    ci_low: float = math.nan
    ci_high: float = math.nan
    extra: dict = field(default_factory=dict)  # JSON-serialisable diagnostics (other metrics, samples, ...)

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "kind": self.kind, "higher_is_better": self.higher_is_better,
                "n": self.n, "ci_low": self.ci_low, "ci_high": self.ci_high, "extra": dict(self.extra)}


def _default_cache() -> Path:
    return cache_root() / "base_outputs"


@dataclass
class ProbeContext:
    """What every probe may use besides the model: where, how big a batch, which seed, the base model."""

    device: Any = None  # None: the device of the model's first parameter
    batch_size: int = 8
    seed: int = 0  # fixed subsets (`limit`) and bootstrap resampling
    cache_dir: Path = field(default_factory=_default_cache)  # cached base outputs (KL-to-base)
    base_id: str = ""  # identity of the original pretrained base (its weights' sha256); '' = fingerprint it
    base_model: Any = None  # the base model itself, when already loaded
    load_base: Callable[[], Any] | None = None  # or how to load it (only called when the cache misses)
    n_boot: int = 1000  # bootstrap resamples per score
    precision: str = "fp32"  # "bf16": forward passes under bf16 autocast (score_model applies it)

    def resolve_device(self, model):
        if self.device is not None:
            return self.device
        try:
            return next(model.parameters()).device
        except (StopIteration, AttributeError):
            return "cpu"


@runtime_checkable
class Probe(Protocol):
    name: str  # the score's name in trajectory.jsonl
    kind: str  # "task" | "retention"
    higher_is_better: bool
    cheap: bool  # likelihood-based: runs on every checkpoint

    def score(self, model, tokenizer, ctx: ProbeContext) -> Score: ...


class BaseProbe:
    """Shared plumbing for the built-in probes: name, kind and direction from the options."""

    registered: str = ""  # the registry name; set by subclasses
    higher_is_better: bool = False
    cheap: bool = True

    def __init__(self, options) -> None:
        self.options = options
        self.name = getattr(options, "score_name", "") or self.registered
        self.kind = getattr(options, "kind", "task")

    def make_score(self, value: float, n: int, ci: tuple[float, float], **extra) -> Score:
        return Score(self.name, float(value), self.kind, self.higher_is_better, int(n), float(ci[0]), float(ci[1]),
                     extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    options: type  # torch-free dataclass of this probe's knobs, fields documented with configtools.doc
    factory: Callable[[Any], Probe]  # options -> probe
    description: str
    cheap: bool = True


# Made in registry.py (so config.py can read it without importing this package); filled here.
PROBES: Registry[ProbeSpec] = _PROBES


def register_probe(name: str, options: type, factory: Callable[[Any], Probe], description: str,
                   cheap: bool = True) -> ProbeSpec:
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"probe {name!r}: options must be a dataclass")
    return PROBES.register(name, ProbeSpec(name, options, factory, description, cheap))


def build_probe(name: str, options: Any = None) -> Probe:
    """A probe from its registered name and options (a dict as in a config, or the options dataclass)."""
    from ..registry import RegistryError

    try:
        spec = PROBES.get(name)
    except RegistryError as e:
        raise ConfigError(f"probes[].name: {e}") from None
    if not isinstance(options, spec.options):
        options = from_dict(spec.options, options or {}, f"probes.{name}")
    return spec.factory(options)


# ---------------------------------------------------------------------------------------- statistics


def weighted_mean(values, weights=None) -> float:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    if weights is None:
        return float(v.mean())
    w = np.asarray(weights, dtype=np.float64)
    return float((v * w).sum() / w.sum()) if w.sum() > 0 else math.nan


def bootstrap_ci(values: Sequence[float], stat: Callable | None = None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `stat` over per-example `values`.

    stat None: the mean, or with `weights` the weighted mean sum(v*w)/sum(w) (per-example mean losses
    weighted by their token counts = the token-level mean, resampled by example). A custom `stat`
    gets the resampled values (and the resampled weights, when given) as numpy arrays.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    n = v.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        one = float(stat(v, w) if (stat and w is not None) else stat(v) if stat else v[0])
        return one, one
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, 2_000_000 // n)  # at most ~16 MB of indices at a time
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - s), n))
        if stat is None and w is None:
            stats.append(v[idx].mean(axis=1))
        elif stat is None:
            ww = w[idx]
            stats.append((v[idx] * ww).sum(axis=1) / np.maximum(ww.sum(axis=1), 1e-300))
        else:
            stats.append(np.array([stat(v[i], w[i]) if w is not None else stat(v[i]) for i in idx]))
    allstats = np.concatenate(stats)
    lo, hi = np.quantile(allstats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------- helpers


def model_fingerprint(model) -> str:
    """sha256 of every parameter and buffer of the (unwrapped) model: an identity when no hash is given."""
    import torch

    from ..objectives import unwrap

    h = hashlib.sha256()
    base = unwrap(model)
    for name, t in sorted(list(base.state_dict().items())):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def subset(n: int, limit: int, seed: int) -> list[int]:
    """A fixed subset of range(n): all when limit is 0 or >= n, else `limit` indices drawn with `seed`, sorted."""
    import random

    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))
