"""Training objectives: pure functions returning (loss, metrics), and the forward pass that feeds them.

The output layer is applied only at trained positions: a completion-only batch often trains on a
fraction of its tokens, and the (tokens x vocab) logits are the largest activation of a small model.
"""

from __future__ import annotations

import weakref
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


_FROZEN_CASTS: dict = {}  # id(weight) -> (weak ref, key, cast): frozen weights, cast once per run


@contextmanager
def cast_linear_weights(model, dtype: torch.dtype | None):
    """For scoring under autocast (no gradients): every plain nn.Linear's fp32 weight replaced, for the
    duration, by its copy in `dtype` - the very tensor autocast would make, made once per call of this
    context (frozen weights: once per run) instead of once per forward pass. A checkpoint's probes run a
    few forward passes, generation one per new token; the numbers are unchanged (tested)."""
    if dtype is None:
        yield
        return
    swapped = []
    live = set()
    try:
        for mod in model.modules():
            w = mod._parameters.get("weight") if type(mod) is nn.Linear else None
            if w is None or w.dtype != torch.float32 or type(w) is not nn.Parameter:
                continue  # quantized, sharded (DTensor) or already low-precision weights stay as they are
            key = (w.data_ptr(), w._version, dtype)
            hit = _FROZEN_CASTS.get(id(w)) if not w.requires_grad else None
            if hit is not None and hit[0]() is w and hit[1] == key:  # the same tensor, unchanged
                cast = hit[2]
            else:
                cast = nn.Parameter(w.detach().to(dtype), requires_grad=False)
                if not w.requires_grad:
                    _FROZEN_CASTS[id(w)] = (weakref.ref(w), key, cast)
            live.add(id(w))
            mod._parameters["weight"] = cast
            swapped.append((mod, w))
        for k in [k for k in _FROZEN_CASTS if k not in live]:  # another model's: drop
            del _FROZEN_CASTS[k]
        yield
    finally:
        for mod, w in swapped:
            mod._parameters["weight"] = w


def forward_hidden(model, batch: dict):
    """Final hidden states (B, L, H) aligned with batch['input_ids'], and the output layer."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]  # padded rows: positions follow from the mask
    else:
        kwargs["position_ids"] = batch["position_ids"]  # packed rows: restarting positions = per-example attention
    kwargs.update(batch.get("vision") or {})  # a vision-language model's image tensors (data/multimodal.py)
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
    """Tensors of the batch (and of its sub-dicts: the image tensors under "vision") on `device`."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- preferences


def _chunk_logp(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target of one chunk of trained positions: (n,)."""
    logits = head(h).float()  # (n, V)
    return -F.cross_entropy(logits, y, reduction="none")


def sequence_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int = 1024):
    """Summed log-probability of each row's trained tokens, and their count: ((B,), (B,)).

    hidden: (B, L, H); targets: (B, L), shifted, IGNORE where untrained. Like `sft_loss`, the output layer
    runs on trained positions only, one checkpointed (chunk x vocab) block at a time."""
    sel = targets != IGNORE
    rows = sel.nonzero()[:, 0]  # (N,) row of each trained position
    h = hidden[sel]  # (N, H)
    y = targets[sel]  # (N,)
    grad = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for s in range(0, y.numel(), chunk):
        args = (head, h[s:s + chunk], y[s:s + chunk])
        parts.append(checkpoint(_chunk_logp, *args, use_reentrant=False) if grad else _chunk_logp(*args))
    tok = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)  # (N,)
    logps = hidden.new_zeros(targets.shape[0], dtype=torch.float32).index_add(0, rows, tok)  # (B,)
    return logps, sel.sum(-1)


# Each variant maps the per-pair quantities to a per-pair loss (P,). `delta` is the difference of the
# policy/reference log-ratios, (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)); `n_chosen` and
# `n_rejected` count the answers' tokens. The formulas follow TRL's DPOTrainer (tests compare them).
PREFERENCE_LOSSES: Registry = Registry("dpo loss")


def _sigmoid(delta, beta, eps, n_chosen, n_rejected, chosen_ratio, rejected_ratio):
    """DPO (Rafailov et al. 2023, eq. 7); eps > 0: conservative DPO (Mitchell 2023, 'cDPO'), which trains
    towards preference probability 1 - eps instead of 1."""
    z = beta * delta
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _ipo(delta, beta, eps, n_chosen, n_rejected, chosen_ratio, rejected_ratio):
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio gap to 1/(2 tau). As in TRL (agreed with the
    authors) the log-ratios are averaged per token, so beta means the same for short and long answers."""
    gap = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
    return (gap - 1 / (2 * beta)) ** 2


def _hinge(delta, beta, eps, n_chosen, n_rejected, chosen_ratio, rejected_ratio):
    """SLiC-HF's calibration hinge (Zhao et al. 2023) on the reference-normalised margin."""
    return torch.relu(1 - beta * delta)


def _robust(delta, beta, eps, n_chosen, n_rejected, chosen_ratio, rejected_ratio):
    """Robust DPO (Chowdhury et al. 2024, eq. 9): unbiased when a share eps of the labels is flipped."""
    z = beta * delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


for _name, _fn in (("sigmoid", _sigmoid), ("ipo", _ipo), ("hinge", _hinge), ("robust", _robust)):
    PREFERENCE_LOSSES.register(_name, _fn)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor, beta: float = 0.1,
             variant: str = "sigmoid", label_smoothing: float = 0.0, normaliser: float | None = None):
    """Preference loss over P pairs, summed and divided by `normaliser` (default P), and its diagnostics.

    All inputs are (P,): summed answer log-probs under the policy and the reference, and answer token
    counts. Passing the number of pairs of the whole optimizer step (all micro-batches, all processes) as
    `normaliser` makes gradient accumulation equal to one large batch, weighting pairs (not tokens) alike.
    """
    chosen_ratio = policy_chosen - ref_chosen  # (P,)
    rejected_ratio = policy_rejected - ref_rejected  # (P,)
    delta = chosen_ratio - rejected_ratio
    per_pair = PREFERENCE_LOSSES.get(variant)(delta, beta, label_smoothing, n_chosen, n_rejected,
                                              chosen_ratio, rejected_ratio)  # (P,)
    total = per_pair.sum()
    loss = total / float(normaliser if normaliser is not None else max(delta.numel(), 1))
    with torch.no_grad():  # TRL's reward definitions: beta x log-ratio
        r_c, r_r = beta * chosen_ratio, beta * rejected_ratio
        metrics = {"loss_sum": float(total), "pairs": int(delta.numel()),
                   "correct": int((r_c > r_r).sum()), "margin_sum": float((r_c - r_r).sum()),
                   "rewards_chosen_sum": float(r_c.sum()), "rewards_rejected_sum": float(r_r.sum()),
                   "logps_chosen_sum": float(policy_chosen.sum()), "logps_rejected_sum": float(policy_rejected.sum())}
    return loss, metrics


OBJECTIVES.register("dpo", dpo_loss)
