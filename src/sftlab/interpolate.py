"""Rewind between checkpoints: the model a fraction `alpha` of the way from the base to a checkpoint.

- Additive methods (full, LoRA, DoRA, IA3; `Method.merge == "additive"`): W(a) = W0 + a·(Wmerged − W0)
  for every parameter the checkpoint changed. Wmerged comes from PEFT's merge_and_unload (or the full
  checkpoint), so DoRA's normalised update and IA3's rescaling are interpolated in weight space alike.
- Rotation methods (OFT, BOFT; `merge == "rotation"`): the skew-symmetric generator S is scaled by a
  before merging, so each block is R(a) = Cayley(a·S) = (I − aS)(I + aS)^-1, orthogonal for every a
  (exact Cayley; with PEFT's Neumann option it is as orthogonal as the series makes it). PEFT stores
  OFT's S as the packed strict upper triangle (OFTRotationModule.weight, shape (blocks, b(b-1)/2)) and
  BOFT's as a full matrix that it skew-symmetrises, 0.5·(M − M^T) (boft_R, shape (factors, blocks, b, b)),
  so scaling the stored tensor scales S. BOFT also learns a per-output magnitude boft_s (init 1); it is
  interpolated linearly, s(a) = 1 + a·(s − 1), as it multiplies the weight. New-token rows (a non-LoRA
  adapter keeps them in ADAPTER/tokens, tokens.py) move linearly from their init to their trained values.
- Prefix and prompt tuning add virtual tokens, not a weight update: they rewind to checkpoints only.

`Interpolator` holds one model and moves it along the path in place, so scoring a grid of alphas costs
one model plus the update (the delta dict for additive methods; a copy of the small adapter for
rotation methods), not one load per alpha. Additive moves add (a_new − a_old)·Δ, so a round trip
drifts by float rounding only (well under 1e-5 in the logits); rotation moves rewrite the adapter from
its saved copy and are exact at both ends.
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
        """`kind` "additive" on an OFT/BOFT run moves along the dense delta of the merged rotation instead,
        W0 + a·(W0·R − W0): not a rotation for 0 < a < 1 (the comparison `sftlab study` draws)."""
        self.run = run
        self.step = run.checkpoint(step)["step"]
        self.kind = kind or run.method.merge  # "additive" | "rotation" | None
        if kind is not None and kind != run.method.merge and not (kind == "additive" and run.method.merge):
            raise SftlabError(f"method {run.method.name!r} cannot move along a {kind!r} path; it is "
                              f"{run.method.merge or 'virtual tokens: checkpoints only'}")
        self.alpha = 1.0
        self.tokenizer = run.tokenizer()  # the base's, or with new tokens the run's saved one
        self.token_rows = []  # a rotation adapter's new-token rows (ADAPTER/tokens): moved linearly, like boft_s
        if self.kind == "additive":
            self.model, self.delta = _additive_delta(run, self.step)
            self.alpha = 0.0  # _additive_delta leaves the model at the base weights
        elif self.kind == "rotation":
            path = run.dir / run.checkpoint(self.step)["path"]
            self.model, self.token_rows = run.load_adapter(run.load_initial(), path)
            self.generators, self.scales = _rotation_params(self.model)
        else:
            self.model, _ = run.load(self.step, merge=False)
        self.model.eval()

    def at(self, alpha: float):
        """Move the held model to `alpha` (in place) and return it: a plain HF model for additive methods,
        the PEFT model (unmerged) for rotation methods and at alpha 1 for prefix/prompt."""
        import torch

        a = check_alpha(alpha)
        if self.kind is None and a != 1.0:
            _refuse_virtual(self.run, a)
        if self.model is None:
            raise SftlabError("this Interpolator's adapter was merged away by merged(); make a new one")
        with torch.no_grad():
            if self.kind == "additive":
                for p, d in self.delta:
                    p.add_(d, alpha=a - self.alpha)  # W0 + a·Δ, moved from the current alpha
            elif self.kind == "rotation":
                for p, s in self.generators:
                    p.copy_(s * a)  # a·S: Cayley(a·S) stays a rotation
                for p, s in self.scales:
                    p.copy_(torch.lerp(torch.ones_like(s), s, a))  # exact at both ends
                for rows in self.token_rows:
                    rows.at(a)  # init + a·(trained − init), exact at both ends
        self.alpha = a
        return self.model

    def merged(self, alpha: float):
        """A plain HF model at `alpha` (rotation adapters merged; consumes the held PEFT model)."""
        model = self.at(alpha)
        if self.kind == "rotation":
            model = model.merge_and_unload()
            self.model = None  # the adapter is gone; this Interpolator cannot move any more
        elif self.kind is None:
            raise SftlabError(f"method {self.run.method.name!r} adds virtual tokens, it has no weights to merge; "
                              "export it without --merge (as an adapter)")
        return model


def _additive_delta(run, step: int):
    """(base model, [(param, Wmerged − W0)]) over the parameters the checkpoint changed."""
    import torch

    merged, _ = run.load(step, merge=True)  # full checkpoint, or base + adapter merged by PEFT
    target = dict(merged.named_parameters())
    model = run.load_initial()  # W0: the base (+ new-token rows), or the checkpoint a DPO run started from
    delta = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = target.pop(name, None)
            if w is None or w.shape != p.shape:
                raise SftlabError(f"{run.dir}: checkpoint step {step} does not fit the base model at {name!r} "
                                  f"(missing or reshaped); interpolation needs the same architecture")
            if not torch.equal(w, p):
                delta.append((p, w - p))
    del merged, target  # one model plus the delta from here on
    return model, delta


def _rotation_params(model):
    """([(generator param, its trained value)], [(BOFT magnitude param, its trained value)])."""
    from peft.tuners.boft.layer import BOFTLayer
    from peft.tuners.oft.layer import OFTRotationModule

    gens, scales = [], []
    for module in model.modules():
        if isinstance(module, OFTRotationModule):
            gens.append(module.weight)
        elif isinstance(module, BOFTLayer):
            gens.extend(module.boft_R.values())
            scales.extend(module.boft_s.values())
    if not gens:
        raise SftlabError("no OFT/BOFT rotation found in the checkpoint; is its adapter_config.json an OFT or "
                          "BOFT adapter?")
    _check_rotation_only(model)
    return [(p, p.detach().clone()) for p in gens], [(p, p.detach().clone()) for p in scales]


def _check_rotation_only(model) -> None:
    """Refuse adapters that also train something rotations do not cover (biases, modules_to_save)."""
    for cfg in getattr(model, "peft_config", {}).values():
        extra = [k for k in ("modules_to_save",) if getattr(cfg, k, None)]
        if getattr(cfg, "bias", "none") not in (None, "none"):
            extra.append(f"bias={cfg.bias}")
        if extra:
            raise SftlabError(f"this OFT/BOFT adapter also trains {', '.join(extra)}; rewinding scales only the "
                              "rotations, so it would misplace those: rewind to checkpoints instead")


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


def export_at(run, step: int | None, alpha: float, out: str | Path, merge: bool = True) -> Path:
    """Write the model at `alpha` like `sftlab export`: a merged model folder (merge=True), or for OFT/BOFT
    a PEFT adapter holding the scaled generator; plus tokenizer, chat template, generation config and
    sftlab_export.json (which records alpha). Alpha 1 is the checkpoint itself: `runs.export` writes it."""
    a = check_alpha(alpha)
    kind = run.method.merge
    if kind is None and a != 1.0:
        _refuse_virtual(run, a)
    if merge and kind is None:
        raise SftlabError(f"method {run.method.name!r} adds virtual tokens, it has no weights to merge; "
                          "export it without --merge (as an adapter)")
    if not merge and run.method.peft and kind == "additive" and a != 1.0:
        raise SftlabError(f"an interpolated {run.method.name!r} update (alpha {a:g}) is written merged only; "
                          "export with --merge")
    if a == 1.0:  # the checkpoint itself
        from .runs import export

        return export(str(run.dir), step, str(out), merge)
    from .runs import atomic_folder

    with atomic_folder(out) as tmp:
        _write_at(run, step, a, tmp, merge or not run.method.peft)
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
