"""What a forgetting remedy is, and the registry that holds them.

A remedy is one module that defines an options dataclass (torch-free, so configs validate fast) and a `build`
that makes its `Hooks` object for one run. The trainer calls the hooks at fixed points; each remedy uses only
the points it needs:

- `prepare(trainer, data)`: the tokenized training data, before the batch plan (replay adds general text);
- `setup(trainer)`: the model is built (a penalty keeps the base's weights or outputs to pull towards);
- `term`: an `ExtraTerm` added to every micro-batch's loss (train/step.py: KL to the base, L2-SP);
- `objective`: a replacement for the SFT objective, same signature as objectives.sft_loss (DFT);
- `after_update(trainer)`: after each applied optimizer step (EMA: update the average);
- `on_checkpoint(trainer, step)`: after a trajectory checkpoint was written and scored (EMA: its own checkpoint);
- `on_train_end(trainer)`: after the last checkpoint (WiSE-FT: interpolate towards the base);
- `provenance()`: what the remedy did, recorded in provenance.json under `remedies`.

A remedy never edits the loop: it registers by name (`register_remedy`), and config.py validates its options
through the registry (registry.REMEDIES) without importing this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import REMEDIES as _REMEDIES
from ..registry import Registry


@dataclass(frozen=True)
class RemedySpec:
    name: str
    options: type  # torch-free dataclass of the remedy's knobs, fields documented with configtools.doc
    build: Callable[[Any], "Hooks"]  # options -> the hooks of one run
    description: str
    kind: str  # "data" | "penalty" | "loss" | "average"
    cite: str = ""  # the paper it implements (docs/remedies.md)
    objectives: tuple[str, ...] = ("sft", "dpo")  # the objectives it works with
    needs_probes: bool = False  # scores checkpoints of its own (EMA, WiSE-FT)
    needs_merge: bool = False  # moves weights along the path to the base (not for prefix/prompt tuning)


class Hooks:
    """The no-op hooks: a remedy overrides the ones it needs (see the module doc)."""

    term = None  # train.step.ExtraTerm | None
    objective = None  # replacement SFT objective | None

    def prepare(self, trainer, data):
        return data

    def setup(self, trainer) -> None:
        pass

    def after_update(self, trainer) -> None:
        pass

    def on_checkpoint(self, trainer, step: int) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def provenance(self) -> dict:
        return {}


# Made in registry.py (so config.py can read it without importing this package); filled here.
REMEDIES: Registry[RemedySpec] = _REMEDIES


def register_remedy(spec: RemedySpec) -> RemedySpec:
    return REMEDIES.register(spec.name, spec)


def build_remedies(entries) -> list[tuple[str, Hooks]]:
    """(name, hooks) for a config's `remedies:` entries, in order."""
    return [(e.name, REMEDIES.get(e.name).build(e.options)) for e in entries]
