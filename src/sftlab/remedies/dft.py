"""dft: Dynamic Fine-Tuning, each trained token's cross-entropy scaled by the model's own probability of it.

Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification"
(arXiv:2508.05629): the SFT gradient equals a policy gradient whose implicit reward is 1/p(token), which blows
up on tokens the model finds unlikely. DFT rectifies it by weighting each token's loss by sg(p(token)) (stop-
gradient), so the loss is sum_t sg(p_t) * (-log p_t) / N and its gradient is sum_t p_t * grad(-log p_t) / N
= -grad(sum_t p_t) / N: unlikely tokens pull less, which the paper reports to generalise better and to move the
model less from its prior. The logged `loss` stays the plain cross-entropy (comparable with runs without it);
`dft/weighted` is what was minimised.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configtools import doc
from .base import Hooks, RemedySpec, register_remedy


@dataclass
class DFTOptions:
    chunk: int = doc("trained positions per block of (positions x vocabulary) logits", default=1024)


def _chunk_dft(head, h, y):
    """One chunk: (sum of sg(p) * CE, sum of CE, correct argmax count)."""
    import torch.nn.functional as F

    logits = head(h).float()  # (n, V)
    ce = F.cross_entropy(logits, y, reduction="none")  # (n,)
    p = (-ce).exp().detach()  # the model's probability of each target, no gradient through the weight
    return (p * ce).sum(), ce.sum().detach(), (logits.argmax(-1) == y).sum()


def dft_loss(hidden, targets, head, normaliser: float | None = None, chunk: int = 1024):
    """The DFT loss over trained positions, divided by `normaliser` (default: their count), and diagnostics.

    hidden: (B, L, H); targets: (B, L), shifted, IGNORE where untrained. Same contract as objectives.sft_loss:
    metrics["loss_sum"] is the plain summed cross-entropy (so logged losses compare with plain SFT)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from ..data.tokenize import IGNORE

    sel = targets != IGNORE
    h, y = hidden[sel], targets[sel]  # (N, H), (N,)
    n = y.numel()
    weighted = hidden.new_zeros((), dtype=torch.float32)
    plain, correct = 0.0, 0
    grad = torch.is_grad_enabled() and h.requires_grad
    for s in range(0, n, chunk):
        args = (head, h[s:s + chunk], y[s:s + chunk])
        w, ce, ok = checkpoint(_chunk_dft, *args, use_reentrant=False) if grad else _chunk_dft(*args)
        weighted = weighted + w
        plain += float(ce)
        correct += int(ok)
    denom = float(normaliser if normaliser is not None else max(n, 1))
    return weighted / denom, {"loss_sum": plain, "trained_tokens": n, "correct": correct,
                              "dft_weighted_sum": float(weighted.detach())}


class DFT(Hooks):
    def __init__(self, options: DFTOptions):
        self.options = options
        chunk = options.chunk

        def objective(hidden, targets, head, normaliser=None):
            return dft_loss(hidden, targets, head, normaliser, chunk)

        self.objective = objective

    def provenance(self) -> dict:
        return {"loss": "sum_t sg(p_t) * CE_t / trained tokens"}


register_remedy(RemedySpec("dft", DFTOptions, DFT,
                           "loss-side: each token's cross-entropy scaled by the model's own (detached) probability "
                           "of it (DFT)", "loss", cite="Wu et al. 2025", objectives=("sft",)))
