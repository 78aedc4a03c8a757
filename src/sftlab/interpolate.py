"""Rewind between checkpoints: the model a fraction `alpha` of the way from the base to a checkpoint.

How a method's update moves is its registration's `Method.merge` object (methods/merge.py: additive for full,
LoRA, DoRA, IA3; rotation for OFT, BOFT, whose generators are scaled so every point is a rotation). Methods
without one (prefix and prompt tuning add virtual tokens, not a weight update) rewind to checkpoints only.

`Interpolator` holds one model and moves it along the path in place, so scoring a grid of alphas costs
one model plus the update (the delta dict for additive methods; a copy of the small adapter for
rotation methods), not one load per alpha.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from .errors import SftlabError
from .faults import fault
from .trajectory import Choice, Point, rewind


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise SftlabError(f"alpha must be in [0, 1] (0: the base model, 1: the checkpoint), got {alpha}")
    return a


def _refuse_virtual(run, alpha: float) -> None:
    raise SftlabError(f"method {run.method.name!r} adds virtual tokens, not a weight update, so it rewinds to "
                      f"checkpoints only (alpha 1); pick an earlier --step instead of alpha {alpha:g}")


class Interpolator:
    """The model at base + alpha·(checkpoint − base) for one checkpoint of a run; `at(alpha)` moves it."""

    def __init__(self, run, step: int | None = None, kind: str | None = None):
        """`kind`: another path the method's merge offers (Merge.also), e.g. "additive" on an OFT/BOFT run moves
        along the dense delta of the merged rotation, W0 + a·(W0·R − W0): not a rotation for 0 < a < 1 (the
        comparison `sftlab study` draws)."""
        from .methods.merge import paths_of

        self.run = run
        self.step = run.checkpoint(step)["step"]
        own = run.method.merge
        merge = own if kind is None else next((m for m in paths_of(own) if m.kind == kind), None)
        if kind is not None and merge is None:
            raise SftlabError(f"method {run.method.name!r} cannot move along a {kind!r} path; it is "
                              f"{own.kind if own else 'virtual tokens: checkpoints only'}")
        self.kind = merge.kind if merge else None  # "additive" | "rotation" | a method's own | None
        self.tokenizer = run.tokenizer()  # the base's, or with new tokens the run's saved one
        if merge is None:
            self.path = None
            self.model, _ = run.load(self.step, merge=False)
            self.alpha, self.token_rows = 1.0, []
        else:
            self.path = merge.path(run, self.step)
            self.model, self.alpha = self.path.model, self.path.alpha
            self.token_rows = self.path.token_rows  # new-token rows beside an adapter, moved with it
        self.model.eval()

    def at(self, alpha: float):
        """Move the held model to `alpha` (in place) and return it: a plain HF model for additive methods,
        the PEFT model (unmerged) for rotation methods and at alpha 1 for prefix/prompt."""
        import torch

        a = check_alpha(alpha)
        if self.path is None and a != 1.0:
            _refuse_virtual(self.run, a)
        if self.model is None:
            raise SftlabError("this Interpolator's adapter was merged away by merged(); make a new one")
        if self.path is not None:
            with torch.no_grad():
                self.path.at(a)
        self.alpha = a
        return self.model

    def merged(self, alpha: float):
        """A plain HF model at `alpha` (a rotation adapter is merged: consumes the held PEFT model)."""
        model = self.at(alpha)
        if self.path is None:
            raise SftlabError(f"method {self.run.method.name!r} adds virtual tokens, it has no weights to merge; "
                              "export it without --merge (as an adapter)")
        model = self.path.merged()
        self.model = self.path.model  # None when merging consumed it: this Interpolator cannot move any more
        return model


# ---- public entry points --------------------------------------------------------------------------

def model_at(run, step: int | None, alpha: float):
    """(plain HF model, tokenizer) at `alpha` between the base and checkpoint `step`.

    Prefix/prompt runs accept only alpha 1 and return the PEFT model (virtual tokens cannot merge)."""
    a = check_alpha(alpha)
    if run.method.merge is None and a != 1.0:
        _refuse_virtual(run, a)
    interp = Interpolator(run, step)
    model = interp.model if run.method.merge is None else interp.merged(a)
    return model, interp.tokenizer


def export_at(run, step: int | None, alpha: float, out: str | Path, merge: bool = True, finish=None) -> Path:
    """Write the model at `alpha` like `sftlab export`: a merged model folder (merge=True), or for OFT/BOFT
    a PEFT adapter holding the scaled generator; plus tokenizer, chat template, generation config and
    sftlab_export.json (which records alpha). Alpha 1 is the checkpoint itself: `runs.export` writes it."""
    a = check_alpha(alpha)
    own = run.method.merge
    if own is None and a != 1.0:
        _refuse_virtual(run, a)
    if merge and own is None:
        raise SftlabError(f"method {run.method.name!r} adds virtual tokens, it has no weights to merge; "
                          "export it without --merge (as an adapter)")
    if not merge and a != 1.0 and run.method.peft and not own.holds_adapter:
        raise SftlabError(f"an interpolated {run.method.name!r} update (alpha {a:g}) is written merged only; "
                          "export with --merge")
    if a == 1.0:  # the checkpoint itself
        from .runs import export

        return export(str(run.dir), step, str(out), merge, finish)
    from .runs import atomic_folder

    with atomic_folder(out) as tmp:
        _write_at(run, step, a, tmp, merge or not run.method.peft)
        if finish is not None:  # runs.export's hook: the model card
            finish(tmp, run.checkpoint(step))
    return Path(out)


def _write_at(run, step, alpha: float, tmp: Path, merged: bool) -> None:
    from .runs import finish_export, point_adapter_at_base

    interp = Interpolator(run, step)
    entry = run.checkpoint(interp.step)
    base = run.base_ref()
    model = interp.merged(alpha) if merged else interp.at(alpha)
    # an adapter: no embedding matrices (PEFT would add the whole resized ones after new tokens)
    model.save_pretrained(str(tmp), safe_serialization=True, **({} if merged else {"save_embedding_layers": False}))
    fault("rewind_export", entry["step"], half_written=tmp)
    if not merged:  # an adapter folder: point it at the base this run used
        point_adapter_at_base(tmp, base.location)
        if interp.token_rows:  # the new rows at alpha, beside it as in a checkpoint (tokens.py)
            from .tokens import TOKEN_ADAPTER_DIR, write_token_adapter

            write_token_adapter(tmp / TOKEN_ADAPTER_DIR, {r.name: r.weight[r.ids] for r in interp.token_rows},
                                interp.token_rows[0].ids, base.location, model.get_base_model())
    finish_export(tmp, run, entry, base, interp.tokenizer, merged, alpha=alpha)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    choice: Choice
    points: list[Point]  # every scored alpha, in order (alpha 0 first unless a base point was given)


ScoreFn = Callable[..., Point]  # (model, tokenizer, step, alpha) -> Point


def search(run, step: int | None, alphas: Iterable[float], score_fn: ScoreFn, policy: str,
           base: Point | None = None, **policy_params) -> SearchResult:
    """Score the model at each alpha with `score_fn` and choose among them with a rewind policy.

    The base (alpha 0) is the policies' reference: pass its Point as `base` (e.g. step 0 of the
    trajectory) or alpha 0 is scored too. Returned points carry this checkpoint's step and their alpha.
    """
    grid = sorted({check_alpha(a) for a in alphas})
    if base is None and 0.0 not in grid:
        grid.insert(0, 0.0)
    if run.method.merge is None and grid != [1.0]:
        _refuse_virtual(run, next(a for a in grid if a != 1.0))
    interp = Interpolator(run, step)
    points = [] if base is None else [base]
    for a in grid:
        p = score_fn(interp.at(a), interp.tokenizer, interp.step, a)
        points.append(dataclasses.replace(p, step=interp.step, alpha=a))
    return SearchResult(rewind(points, policy, **policy_params), points)
