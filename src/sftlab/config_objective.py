"""The `objective:` section: what the training loop minimises (SFT cross-entropy, or DPO and its variants).

Torch-free like the rest of the config (config.py re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .configtools import check, doc


@dataclass
class ObjectiveSection:
    """`objective: {name: dpo, loss: sigmoid, beta: 0.1}`: what the loop minimises."""

    name: Literal["sft", "dpo"] = doc(
        "sft: token cross-entropy on completions; dpo: direct preference optimisation on prompt/chosen/rejected "
        "pairs (data.train and data.eval are then preference files)", default="sft")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = doc(
        "dpo variant: sigmoid (DPO; with label_smoothing > 0 conservative DPO), ipo, hinge (SLiC), robust "
        "(robust DPO, unbiased under label_smoothing = flip rate)", default="sigmoid")
    beta: float = doc("dpo: strength of the pull towards the reference (IPO: its tau)", default=0.1)
    label_smoothing: float = doc("dpo: assumed share of flipped preference labels (sigmoid, robust), in [0, 0.5)",
                                 default=0.0)
    reference: Literal["cached", "disable_adapter"] = doc(
        "dpo reference model = the starting model. cached: its log-probs on the pairs are computed once and kept "
        "in the cache root (no second model in memory; works after full fine-tuning); disable_adapter: computed "
        "live each step with the new adapter switched off (PEFT methods only)", default="cached")

    def __post_init__(self):
        check(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, "objective.label_smoothing",
              f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.label_smoothing == 0 or self.loss in ("sigmoid", "robust"), "objective.label_smoothing",
              f"only the sigmoid and robust losses use it; set it to 0 for {self.loss!r}")
