"""How a method's update merges into the base weights, and how it is moved a fraction of the way there.

A method registers one of these objects as `Method.merge` (None: virtual tokens, nothing to merge; such runs
rewind to checkpoints only). Everything that moves a model between the base and a checkpoint (interpolate.py,
`sftlab rewind`, `sftlab study`) and the weight analysis ask the object, not the method's name:

- `kind`: the path's name in files, tables and messages ("additive", "rotation", or a new method's own);
- `rotation`: whether the merged weight is W0·R (the analysis then also reports how far R is from a rotation);
- `holds_adapter`: whether the path moves the adapter itself (so a point on it exports as an adapter, unmerged);
- `also`: other paths a study compares for the same run (a rotation's dense additive delta);
- `path(run, step)`: a `MergePath`, the model held at alpha (0: the base, 1: the checkpoint) and moved in place.

`run` is a runs.Run (read through load, load_initial, load_adapter, checkpoint, dir); this module imports no
layer above the methods.

- Additive (full, LoRA, DoRA, IA3): W(a) = W0 + a·(Wmerged − W0) for every parameter the checkpoint changed.
  Wmerged comes from PEFT's merge_and_unload (or the full checkpoint), so DoRA's normalised update and IA3's
  rescaling are interpolated in weight space alike. Moves add (a_new − a_old)·Δ, so a round trip drifts by
  float rounding only (well under 1e-5 in the logits).
- Rotation (OFT, BOFT): the skew-symmetric generator S is scaled by a before merging, so each block is
  R(a) = Cayley(a·S) = (I − aS)(I + aS)^-1, orthogonal for every a (exact Cayley; with PEFT's Neumann option it
  is as orthogonal as the series makes it). PEFT stores OFT's S as the packed strict upper triangle
  (OFTRotationModule.weight, shape (blocks, b(b-1)/2)) and BOFT's as a full matrix that it skew-symmetrises,
  0.5·(M − M^T) (boft_R, shape (factors, blocks, b, b)), so scaling the stored tensor scales S. BOFT also learns
  a per-output magnitude boft_s (init 1); it is interpolated linearly, s(a) = 1 + a·(s − 1), as it multiplies
  the weight. New-token rows (a non-LoRA adapter keeps them in ADAPTER/tokens, tokens.py) move linearly from
  their init to their trained values. Moves rewrite the adapter from its saved copy: exact at both ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import SftlabError


class MergePath(Protocol):
    """One model held between the base (alpha 0) and a checkpoint (alpha 1), moved in place."""

    model: Any  # None once merged() consumed it
    alpha: float  # where the held model is now
    token_rows: list  # new-token rows that move with it (tokens.TokenRows), written beside an exported adapter

    def at(self, alpha: float) -> None: ...

    def merged(self) -> Any:
        """A plain HF model at the current alpha (may consume the held model: then self.model is None)."""


class Merge(Protocol):
    kind: str
    rotation: bool
    holds_adapter: bool
    also: tuple

    def path(self, run, step: int) -> MergePath: ...


@dataclass(frozen=True)
class AdditiveMerge:
    """W0 + a·ΔW: every method whose checkpoint loads as (or merges into) plain weights."""

    kind: str = "additive"
    rotation: bool = False
    holds_adapter: bool = False  # the path holds the merged weights: a point on it exports merged only
    also: tuple = ()

    def path(self, run, step: int) -> "AdditivePath":
        return AdditivePath(run, step)


@dataclass(frozen=True)
class RotationMerge:
    """OFT/BOFT: scale the rotations' skew generators; a study also draws the dense additive path."""

    kind: str = "rotation"
    rotation: bool = True
    holds_adapter: bool = True  # the scaled generators: a point on the path is still an OFT/BOFT adapter
    also: tuple = (AdditiveMerge(),)

    def path(self, run, step: int) -> "RotationPath":
        return RotationPath(run, step)


ADDITIVE = AdditiveMerge()
ROTATION = RotationMerge()


def paths_of(merge) -> list:
    """The merge objects a run can move along: its own first, then `also` (none for virtual tokens)."""
    return [] if merge is None else [merge, *merge.also]


class AdditivePath:
    def __init__(self, run, step: int):
        self.model, self.delta = additive_delta(run, step)
        self.alpha = 0.0  # additive_delta leaves the model at the base weights
        self.token_rows: list = []

    def at(self, alpha: float) -> None:
        for p, d in self.delta:
            p.add_(d, alpha=alpha - self.alpha)  # W0 + a·Δ, moved from the current alpha
        self.alpha = alpha

    def merged(self):
        return self.model


class RotationPath:
    def __init__(self, run, step: int):
        path = run.dir / run.checkpoint(step)["path"]
        self.model, self.token_rows = run.load_adapter(run.load_initial(), path)
        self.generators, self.scales = rotation_params(self.model)
        self.alpha = 1.0

    def at(self, alpha: float) -> None:
        import torch

        for p, s in self.generators:
            p.copy_(s * alpha)  # a·S: Cayley(a·S) stays a rotation
        for p, s in self.scales:
            p.copy_(torch.lerp(torch.ones_like(s), s, alpha))  # exact at both ends
        for rows in self.token_rows:
            rows.at(alpha)  # init + a·(trained − init), exact at both ends
        self.alpha = alpha

    def merged(self):
        model, self.model = self.model.merge_and_unload(), None  # the adapter is gone: no more moves
        return model


def additive_delta(run, step: int):
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


def rotation_params(model):
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
    check_rotation_only(model)
    return [(p, p.detach().clone()) for p in gens], [(p, p.detach().clone()) for p in scales]


def check_rotation_only(model) -> None:
    """Refuse adapters that also train something rotations do not cover (biases, modules_to_save)."""
    for cfg in getattr(model, "peft_config", {}).values():
        extra = [k for k in ("modules_to_save",) if getattr(cfg, k, None)]
        if getattr(cfg, "bias", "none") not in (None, "none"):
            extra.append(f"bias={cfg.bias}")
        if extra:
            raise SftlabError(f"this OFT/BOFT adapter also trains {', '.join(extra)}; rewinding scales only the "
                              "rotations, so it would misplace those: rewind to checkpoints instead")
