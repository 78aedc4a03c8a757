"""One optimizer step's forward and backward passes, shared by every objective.

`accumulate` runs a step's micro-batches: it counts what the step's loss is normalised by (trained tokens for
SFT, pairs for DPO) over all processes first, so that accumulating equals one large batch and every process
weighs the same; then, per micro-batch, the objective's loss term plus any extra terms (penalties such as
L2-SP or a KL to the base: the forgetting remedies) is back-propagated once. An objective is a `LossTerm`;
the loop never branches on which one it runs.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from ..objectives import forward_hidden, to_device


class LossTerm(Protocol):
    """The objective of a step. `sums`: the names of the additive diagnostics `loss` returns (summed over the
    micro-batches and, except loss_sum, over processes; loss_sum is summed with the step's verdict)."""

    sums: tuple[str, ...]

    def counts(self, micro: list[dict]) -> list[float]:
        """[normaliser, tokens, trained tokens] of this process's micro-batches (the normaliser: what the
        step's loss is a mean over)."""
        ...

    def loss(self, trainer, batch: dict, normaliser: float, autocast) -> tuple[torch.Tensor, dict]:
        """(loss to back-propagate, {name: float} with every name in `sums`); the term decides which part of
        its computation runs under `autocast` (so each objective keeps its own numerics)."""
        ...

    def info(self, sums: dict, counts: list[float]) -> dict:
        """Per-step metrics from the summed diagnostics."""
        ...


class ExtraTerm(Protocol):
    """A term added to every micro-batch's loss (a remedy's penalty). It returns a loss already normalised
    the way the objective's is (its share of the step) and diagnostics to average over micro-batches."""

    name: str

    def __call__(self, trainer, batch: dict, n_micro: int) -> tuple[torch.Tensor, dict]: ...


def accumulate(trainer, micro: list[dict], term: LossTerm,
               extras: Sequence[ExtraTerm] = ()) -> tuple[float, float, dict]:
    """Forward + backward over the step's micro-batches: (summed loss, normaliser of the global step, metrics)."""
    dev, world, model = trainer.dist.device, trainer.dist.world, trainer.model
    counts = torch.tensor([float(c) for c in term.counts(micro)])
    if world > 1:
        counts = counts.to(dev)
        dist.all_reduce(counts)
        counts = counts.cpu()
    normaliser = float(counts[0])
    sums = dict.fromkeys(term.sums, 0.0)
    extra_metrics: dict[str, float] = {}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.cfg.train.precision == "bf16")
    for i, batch in enumerate(micro):
        batch = to_device(batch, dev)
        sync = i == len(micro) - 1 or world == 1
        with model.no_sync() if (world > 1 and not sync) else nullcontext():
            # DDP averages gradients over processes; a normaliser divided by `world` turns that into a sum,
            # so the loss is a mean over the whole global step.
            loss, m = term.loss(trainer, batch, normaliser / world, autocast)
            for extra in extras:
                t0 = time.perf_counter()
                penalty, em = extra(trainer, batch, len(micro))
                loss = loss + penalty
                for k, v in em.items():
                    extra_metrics[f"{extra.name}/{k}"] = extra_metrics.get(f"{extra.name}/{k}", 0.0) + v / len(micro)
                # the term's forward cost per step (its backward is inside the one backward below: the whole
                # step's cost shows in step_time against a run without the term)
                extra_metrics[f"{extra.name}/seconds"] = (extra_metrics.get(f"{extra.name}/seconds", 0.0)
                                                          + time.perf_counter() - t0)
            trainer.last_forward = None  # an extra term may reuse the objective's forward; drop it before backward
            loss.backward()
        for k in term.sums:
            sums[k] += m[k]
    shared = [k for k in term.sums if k != "loss_sum"]
    if world > 1 and shared:
        t = torch.tensor([sums[k] for k in shared], device=dev, dtype=torch.float64)
        dist.all_reduce(t)
        sums.update(zip(shared, t.tolist()))
    return sums["loss_sum"], normaliser, {**term.info(sums, counts.tolist()), **extra_metrics}


class SftTerm:
    """Completion-only cross-entropy, a mean over the step's trained tokens: the trainer's registered
    objective (objectives.sft_loss), looked up at each call."""

    sums = ("loss_sum",)

    def counts(self, micro):
        return [sum(int((b["targets"] != -100).sum()) for b in micro), sum(b["n_tokens"] for b in micro),
                sum(int((b["targets"] != -100).sum()) for b in micro)]

    def loss(self, trainer, batch, normaliser, autocast):
        with autocast:  # the head and its chunked cross-entropy run in bf16 too
            hidden, head = forward_hidden(trainer.model, batch)
            trainer.last_forward = (hidden, head)  # for extra terms on the same batch (the KL penalty)
            return trainer.objective(hidden, batch["targets"], head, normaliser)

    def info(self, sums, counts):
        return {"tokens": int(counts[1]), "trained_tokens": int(counts[2])}
