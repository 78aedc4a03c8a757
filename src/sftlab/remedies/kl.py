"""kl: a penalty on the KL divergence from the base's next-token distribution, at the trained positions.

weight x mean over the step's trained positions of KL(base || model), the same direction as the kl_to_base
probe, on the training text itself (the probe measures it on general text). The base's logits come from the
model with its adapter switched off (PEFT methods: no second model in memory, one extra forward pass without
gradients) or, for full fine-tuning, from a frozen copy of the starting model (twice the weights in memory).
Anchoring the fine-tuned distribution to the reference is the KL-regularised objective of RLHF (Ziegler et
al. 2019); here it is applied to supervised fine-tuning.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from ..configtools import check, doc
from .base import Hooks, RemedySpec, register_remedy


@dataclass
class KLOptions:
    weight: float = doc("lambda: weight of the mean KL(base || model) per trained token, added to the loss",
                        default=0.1)
    chunk: int = doc("trained positions per block of (positions x vocabulary) logits", default=512)

    def __post_init__(self):
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check(self.chunk >= 1, "chunk", "must be >= 1")


def _chunk_kl(head, h, base_logp):
    """Summed KL(base || model) over one chunk of positions: h (n, H), base_logp (n, V) -> ()."""
    import torch.nn.functional as F

    lq = F.log_softmax(head(h).float(), -1)  # (n, V)
    return (base_logp.exp() * (base_logp - lq)).sum()


def kl_at_positions(hidden, targets, head, base_hidden, base_head, chunk: int = 512):
    """Sum of KL(base || model) over the trained positions (targets != IGNORE) and their count.

    hidden, base_hidden: (B, L, H) of the model and of the base on the same batch; the heads map them to logits.
    Each chunk's model logits are recomputed in backward (activation checkpointing), as in objectives.sft_loss."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from ..data.tokenize import IGNORE

    sel = targets != IGNORE
    h, bh = hidden[sel], base_hidden[sel]  # (N, H)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        with torch.no_grad():
            base_logp = torch.log_softmax(base_head(bh[s:s + chunk]).float(), -1)  # (n, V)
        total = total + checkpoint(_chunk_kl, head, h[s:s + chunk], base_logp, use_reentrant=False)
    return total, int(h.shape[0])


class KLTerm:
    name = "kl"

    def __init__(self, weight: float, chunk: int, base_forward):
        self.weight, self.chunk, self.base_forward = weight, chunk, base_forward

    def __call__(self, trainer, batch, n_micro):
        import torch

        from ..objectives import forward_hidden

        autocast = torch.autocast(trainer.dist.device.type, dtype=torch.bfloat16,
                                  enabled=trainer.cfg.train.precision == "bf16")
        with autocast:
            cached = getattr(trainer, "last_forward", None)  # the objective's forward on this batch (SftTerm)
            hidden, head = cached if cached is not None else forward_hidden(trainer.model, batch)
            with torch.no_grad():
                base_hidden, base_head = self.base_forward(batch)
            kl, n = kl_at_positions(hidden, batch["targets"], head, base_hidden, base_head, self.chunk)
        mean = kl / max(n, 1)
        return self.weight * mean / n_micro, {"value": float(mean.detach())}


class KL(Hooks):
    def __init__(self, options: KLOptions):
        self.options = options
        self.term = None
        self.reference = ""

    def setup(self, trainer) -> None:
        from ..objectives import forward_hidden

        model = getattr(trainer.model, "module", trainer.model)
        if trainer.method.peft:
            self.reference = "disable_adapter"

            def base_forward(batch):
                with _adapter_off(model):
                    return forward_hidden(model, batch)
        else:
            import copy

            self.reference = "frozen_copy"
            frozen = copy.deepcopy(model).eval()
            frozen.requires_grad_(False)

            def base_forward(batch):
                return forward_hidden(frozen, batch)
        self.term = KLTerm(self.options.weight, self.options.chunk, base_forward)

    def provenance(self) -> dict:
        return {"weight": self.options.weight, "reference": self.reference}


@contextmanager
def _adapter_off(model):
    """The PEFT model with its adapter switched off, in eval mode (no dropout) for the reference pass."""
    was = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
    finally:
        model.train(was)


register_remedy(RemedySpec("kl", KLOptions, KL,
                           "penalty weight x KL(base || model) at the trained positions (adapter off, or a frozen "
                           "copy for full fine-tuning)", "penalty", cite="Ziegler et al. 2019"))
