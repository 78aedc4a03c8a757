"""l2sp: a penalty on the squared distance of the trained weights to where they started.

L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks"): weight/2 * ||w - w0||^2 over the trainable parameters, w0 their values before the first step. For
full fine-tuning w0 is the base itself; for an adapter it is the adapter's initialisation (LoRA's B = 0, so the
penalty pulls the update towards none). Unlike weight decay (towards 0) it pulls towards the starting point.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Hooks, RemedySpec, register_remedy


@dataclass
class L2SPOptions:
    weight: float = doc("lambda: the penalty is weight/2 x the squared L2 distance to the starting weights",
                        default=0.01)

    def __post_init__(self):
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


class L2SPTerm:
    """weight/2 * sum ||w - w0||^2, split evenly over the step's micro-batches (so a step adds it once)."""

    name = "l2sp"

    def __init__(self, weight: float, params: list, anchors: list):
        self.weight, self.params, self.anchors = weight, params, anchors

    def __call__(self, trainer, batch, n_micro):
        sq = sum(((p.float() - a) ** 2).sum() for p, a in zip(self.params, self.anchors))
        return self.weight / 2 * sq / n_micro, {"distance_sq": float(sq.detach())}


class L2SP(Hooks):
    def __init__(self, options: L2SPOptions):
        self.options = options
        self.term = None

    def setup(self, trainer) -> None:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        anchors = [p.detach().float().clone() for p in params]  # one fp32 copy of the trainable weights
        self.term = L2SPTerm(self.options.weight, params, anchors)

    def provenance(self) -> dict:
        return {"weight": self.options.weight, "anchor": "the trainable weights at step 0"}


register_remedy(RemedySpec("l2sp", L2SPOptions, L2SP,
                           "penalty weight/2 x ||w - w0||^2 towards the starting weights (L2-SP)", "penalty",
                           cite="Li, Grandvalet & Davoine 2018"))
