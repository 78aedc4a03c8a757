"""Trainer hooks: exact points where tests and tools may act on a run (train/loop.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Hooks:
    """For tests and tools that must act at exact points (not callbacks: a hook may mutate or raise, e.g. to
    poison gradients or simulate a crash; callbacks only observe). Each is called with the trainer unless said.

    after_setup: the model, data and optimizer are built, nothing has run.
    after_backward: the step's gradients are accumulated and reduced, before the finite check and clipping.
    before_optimizer_step: the gradients are final (reduced and clipped) and about to be applied (not called
        for a skipped non-finite step).
    after_step(trainer, step, metrics): after that step's logging and checkpoint.
    before_rename(tmp_checkpoint_dir): a checkpoint's files are written, before its rename.
    """

    after_setup: object = None
    after_backward: object = None
    before_optimizer_step: object = None
    after_step: object = None
    before_rename: object = None

    @classmethod
    def of(cls, hooks) -> "Hooks":
        """A Hooks from a Hooks, a {name: fn} dict (a misspelt name is an error, not a hook that never runs)
        or None."""
        if hooks is None or isinstance(hooks, cls):
            return hooks or cls()
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(hooks) - set(known))
        if unknown:
            raise TypeError(f"unknown trainer hook(s) {unknown}; known: {known}")
        return cls(**hooks)

    def get(self, name: str):
        return getattr(self, name)
