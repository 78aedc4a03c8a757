"""The optimizer and the learning-rate schedule of the training loop (train/loop.py)."""

from __future__ import annotations

import math

import torch

from . import speed


def build_optimizer(model, cfg):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # no decay on norms, biases, IA3 vectors, and on matrices with frozen rows (tokens.py: exact zeros)
            (decay if p.ndim >= 2 and not getattr(p, "_sftlab_no_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    return speed.adamw([g for g in groups if g["params"]], cfg.train.lr, cfg.train.betas,
                       cfg.train.fused_optimizer, device)


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f
