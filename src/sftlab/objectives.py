"""Training objectives: pure functions returning (loss, metrics), and the forward pass that feeds them.

The output layer is applied only at trained positions: a completion-only batch often trains on a
fraction of its tokens, and the (tokens x vocab) logits are the largest activation of a small model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data.tokenize import IGNORE
from .registry import Registry

OBJECTIVES: Registry = Registry("objective")


def unwrap(model):
    """The HF PreTrainedModel under DDP and PEFT wrappers."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def head_removed(model):
    """Temporarily replace the output layer by identity, so the model returns hidden states."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    base.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def forward_hidden(model, batch: dict):
    """Final hidden states (B, L, H) aligned with batch['input_ids'], and the output layer."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]  # padded rows: positions follow from the mask
    else:
        kwargs["position_ids"] = batch["position_ids"]  # packed rows: restarting positions = per-example attention
    with head_removed(model) as head:
        hidden = model(**kwargs).logits  # (B, L [+ virtual tokens], H)
    L = batch["input_ids"].shape[1]
    if hidden.shape[1] != L:  # prompt tuning prepends its virtual tokens
        hidden = hidden[:, -L:]
    return hidden, head


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor):
    """Summed cross-entropy and correct-argmax count of one chunk of trained positions."""
    logits = head(h).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum()


def sft_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, normaliser: float | None = None,
             chunk: int = 1024):
    """Sum of token cross-entropies over trained positions, divided by `normaliser` (default: their count).

    hidden: (B, L, H); targets: (B, L) already shifted, IGNORE where untrained. Passing the number of
    trained tokens of the whole optimizer step (all micro-batches, all processes) as `normaliser`
    makes gradient accumulation exactly equal to one large batch.

    Each chunk's logits are recomputed in backward instead of kept (activation checkpointing), so the
    output layer costs one (chunk x vocab) block of memory, not (trained tokens x vocab) in two dtypes.
    """
    sel = targets != IGNORE
    h = hidden[sel]  # (N, H)
    y = targets[sel]  # (N,)
    n = y.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    grad = torch.is_grad_enabled() and h.requires_grad
    for s in range(0, n, chunk):
        args = (head, h[s:s + chunk], y[s:s + chunk])
        if grad:
            ce, ok = checkpoint(_chunk_ce, *args, use_reentrant=False)
        else:
            ce, ok = _chunk_ce(*args)
        total = total + ce
        correct += int(ok)
    denom = float(normaliser if normaliser is not None else max(n, 1))
    loss = total / denom
    return loss, {"loss_sum": float(total.detach()), "trained_tokens": n, "correct": correct}


OBJECTIVES.register("sft", sft_loss)


@torch.no_grad()
def eval_loss(model, batches, device) -> dict:
    """Token-averaged held-out loss (and perplexity, next-token accuracy) over batches."""
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
        hidden, head = forward_hidden(model, batch)
        _, m = sft_loss(hidden, batch["targets"], head, normaliser=1.0)
        total += m["loss_sum"]
        n += m["trained_tokens"]
        correct += m["correct"]
    model.train(was_training)
    mean = total / max(n, 1)
    return {"eval_loss": mean, "eval_ppl": float(torch.tensor(mean).exp()), "eval_acc": correct / max(n, 1),
            "eval_tokens": n}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
