"""Examples -> batches, padded or packed, with targets already shifted per example.

Targets are shifted inside each example (target[t] = label[t+1], and IGNORE at an example's last
position), so in a packed row the last token of one example never learns to predict the first
token of the next.

Packing puts several examples in one row with position ids restarting at 0 per example and
`attention_mask=None`. transformers then builds a block-diagonal causal mask from the position
ids (per-example attention) - but only with `use_cache=False`; the training forward sets it, and
`tests/unit/test_packing.py` proves packed logits equal each example's logits alone.
"""

from __future__ import annotations

import random

import torch

from ..errors import DataError
from .tokenize import IGNORE, Example


def shifted_targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def pad_batch(examples: list[Example], pad_id: int, length: int = 0, vision=None) -> dict:
    """Right-padded batch: input_ids, targets, attention_mask, position_ids, all (B, L); L is the longest
    example, or `length` when that is longer (a fixed bucket length for compiled graphs). `vision(rows of
    ImageRefs, sources) -> {name: tensor}` (a vision-language model: multimodal.vision_batch) adds the batch's
    image tensors under "vision" (pixel_values, image_grid_thw, pixel_attention_mask, ... as the processor makes
    them), which the forward pass hands to the model."""
    L = max(length, max(len(e.input_ids) for e in examples))
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        tgt[i, :n] = torch.tensor(shifted_targets(e.labels))
        mask[i, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "targets": tgt, "attention_mask": mask, "position_ids": pos,
             "n_tokens": int(mask.sum())}
    if vision is not None and any(e.images for e in examples):
        batch["vision"] = vision([e.images or [] for e in examples], [e.source for e in examples])
        for key in sorted({k for e in examples for k in (e.token_inputs or {})}):  # (B, L), 0 where absent
            extra = torch.zeros((len(examples), L), dtype=torch.long)
            for i, e in enumerate(examples):
                if key in (e.token_inputs or {}):
                    extra[i, :len(e.input_ids)] = torch.tensor(e.token_inputs[key])
            batch["vision"][key] = extra
    return batch


def pack_rows(batch_rows: list[list[Example]], pad_id: int, length: int = 0) -> dict:
    """Rows of several examples each: (B, L) tensors with position ids restarting per example; L is the
    longest row, or `length` when that is longer."""
    rows = [sum((e.input_ids for e in row), []) for row in batch_rows]
    L = max(length, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    n_tokens = 0
    for i, row in enumerate(batch_rows):
        t = 0
        for e in row:
            n = len(e.input_ids)
            ids[i, t:t + n] = torch.tensor(e.input_ids)
            tgt[i, t:t + n] = torch.tensor(shifted_targets(e.labels))
            pos[i, t:t + n] = torch.arange(n)
            t += n
        n_tokens += t
        # The pad tail restarts its positions too: it becomes its own "document" that attends
        # only to itself and carries no targets.
        pos[i, t:] = torch.arange(L - t)
    return {"input_ids": ids, "targets": tgt, "attention_mask": None, "position_ids": pos, "n_tokens": n_tokens}


def plan_packed_rows(lengths: list[int], max_length: int, order: list[int]) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each row <= max_length tokens."""
    by_len = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    rows: list[list[int]] = []
    room: list[int] = []
    for i in by_len:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


class BatchPlan:
    """Deterministic epoch plans: which examples form each micro-batch, from (seed, epoch) alone.

    A run resumes at any micro-batch index because the plan is a pure function of the seed, the
    epoch and the data, not of an iterator's hidden state. With `pad_to_multiple` > 0 each batch's
    length is rounded up to a multiple of it (at most max_length): compiled graphs then see a few
    fixed lengths instead of one per step.
    """

    def __init__(self, examples: list[Example], batch_size: int, packing: bool, max_length: int, seed: int,
                 rank: int = 0, world: int = 1, pad_to_multiple: int = 0, vision=None):
        self.examples = examples
        self.batch_size = batch_size
        self.packing = packing
        self.max_length = max_length
        self.seed = seed
        self.rank, self.world = rank, world
        self.pad_to_multiple = pad_to_multiple
        self.vision = vision  # pad_batch's image tensors maker (vision-language models), else None
        self._cache: dict[int, list[list[list[int]]]] = {}

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """Micro-batches of this rank: a list of batches, each a list of rows, each a list of example indices."""
        if epoch not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.packing:
                rows = plan_packed_rows([len(e.input_ids) for e in self.examples], self.max_length, order)
                rng.shuffle(rows)
            else:
                rows = [[i] for i in order]
            per_step = self.batch_size * self.world
            n_full = len(rows) // per_step  # every rank gets the same number of full batches
            batches = []
            for b in range(n_full):
                chunk = rows[b * per_step:(b + 1) * per_step]
                batches.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
            if not batches:
                what = "packed rows" if self.packing else "examples"
                raise DataError(f"data.train: only {len(rows)} {what} for train.batch_size={self.batch_size} x "
                                f"{self.world} processes, not one full batch; lower train.batch_size or add data")
            self._cache = {epoch: batches}
        return self._cache[epoch]

    def collate(self, batch: list[list[int]], pad_id: int) -> dict:
        rows = [[self.examples[i] for i in row] for row in batch]
        longest = max(sum(len(e.input_ids) for e in row) for row in rows)
        length = bucket_length(longest, self.pad_to_multiple, self.max_length)
        if self.packing:
            return pack_rows(rows, pad_id, length)
        return pad_batch([row[0] for row in rows], pad_id, length, self.vision)


def bucket_length(length: int, multiple: int, cap: int) -> int:
    """`length` rounded up to a multiple of `multiple` (0: unchanged), never above max(cap, length)."""
    if multiple <= 0:
        return length
    up = -(-length // multiple) * multiple
    return max(length, min(up, cap))
