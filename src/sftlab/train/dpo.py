"""DPO in the training loop: preference pairs -> token rows, the reference log-probs, one step, evaluation.

A pair is two completion-only examples (prompt + chosen, prompt + rejected), tokenized exactly like SFT
data, so chat templates and answer masks are the SFT ones. A micro-batch of P pairs is one padded batch
of 2P rows, chosen rows first (as in TRL), scored in one forward pass; the output layer runs on answer
tokens only (`objectives.sequence_logps`).

The reference model is the starting model (the SFT result). By default its log-probs on every pair are
computed once, before the new method is applied, and kept in the cache root under a key made of the
starting model's identity, the tokenized pairs and the numerics; a rerun, a resumed run or another run on
the same pairs reuses them, and no second model is held in memory. `objective.reference=disable_adapter`
computes them live instead, with the new adapter switched off (the starting weights are merged below it).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field

import torch

from .. import tokens
from ..data.collate import BatchPlan, pad_batch
from ..data.formats import Record
from ..data.preferences import Preference, read_preferences
from ..data.tokenize import Example, TokenizeStats, fit_length, tokenize_record, use_chat_template
from ..errors import DataError, SftlabError
from ..faults import fault
from ..objectives import dpo_loss, forward_hidden, sequence_logps, to_device

REF_VERSION = 1


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    source: str
    ref: tuple[float, float] | None = None  # reference log-probs (chosen, rejected), when cached

    @property
    def input_ids(self) -> list[int]:  # BatchPlan reads lengths through this (packing is off for pairs)
        return self.chosen.input_ids


@dataclass
class PreparedPairs:
    train: list[PairExample]
    eval: list[PairExample]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats
    reference: dict = field(default_factory=dict)  # how the reference log-probs were obtained

    def stats_dict(self) -> dict:
        def d(s: TokenizeStats):
            return {"pairs": s.examples, "tokens": s.tokens, "trained_tokens": s.trained_tokens,
                    "truncated": s.truncated, "dropped": len(s.dropped)}

        return {"train_stats": d(self.train_stats), "eval_stats": d(self.eval_stats), "reference": self.reference}


# ---------------------------------------------------------------------------------------------- data


def _records(p: Preference) -> tuple[Record, Record]:
    if p.kind == "chat":
        return (Record("chat", p.source, messages=list(p.prompt) + list(p.chosen)),
                Record("chat", p.source, messages=list(p.prompt) + list(p.rejected)))
    return (Record("prompt_completion", p.source, prompt=p.prompt, completion=p.chosen),
            Record("prompt_completion", p.source, prompt=p.prompt, completion=p.rejected))


def tokenize_pairs(prefs: list[Preference], tokenizer, d) -> tuple[list[PairExample], TokenizeStats]:
    """Both answers of each pair with SFT's masks; a pair whose answers do not both fit is dropped (or an error)."""
    chat = use_chat_template(tokenizer, d.template)
    stats, out = TokenizeStats(), []
    for p in prefs:
        rc, rr = _records(p)
        full = [tokenize_record(tokenizer, r, chat, d) for r in (rc, rr)]
        fitted = [fit_length(e, d.max_length) for e in full]
        if None in fitted:
            if d.overlong == "error":
                raise DataError(f"{p.source}: an answer alone is longer than data.max_length={d.max_length} tokens; "
                                "raise data.max_length or set data.overlong=drop")
            stats.dropped.append(p.source)
            continue
        stats.truncated += sum(f is not e for f, e in zip(fitted, full))
        out.append(PairExample(fitted[0], fitted[1], p.source))
        stats.examples += 1
        stats.tokens += sum(len(e.input_ids) for e in fitted)
        stats.trained_tokens += sum(e.n_trained for e in fitted)
    return out, stats


def _read(sources, seed: int) -> list[Preference]:
    rng = random.Random(seed)
    out: list[Preference] = []
    for src in sources:
        prefs = read_preferences(src)
        n = max(1, math.floor(src.weight * len(prefs) + 0.5))  # as load_records mixes SFT sources
        whole, extra = divmod(n, len(prefs))
        out += prefs * whole + [prefs[i] for i in sorted(rng.sample(range(len(prefs)), extra))]
    return out


def prepare_pairs(cfg, tokenizer) -> PreparedPairs:
    d = cfg.data
    if not d.train:
        raise DataError("data.train: no preference pairs; add a source of prompt/chosen/rejected rows")
    prefs = _read(d.train, cfg.run.seed)
    if d.limit:
        prefs = prefs[: d.limit]
    held = _read(d.eval, cfg.run.seed) if d.eval else []
    if d.eval_fraction:
        order = list(range(len(prefs)))
        random.Random(cfg.run.seed).shuffle(order)
        cut = set(order[:max(1, int(round(d.eval_fraction * len(prefs))))])
        held = [p for i, p in enumerate(prefs) if i in cut]
        prefs = [p for i, p in enumerate(prefs) if i not in cut]
    train, train_stats = tokenize_pairs(prefs, tokenizer, d)
    if not train:
        raise DataError(f"data.train: every pair was dropped as longer than data.max_length={d.max_length}; "
                        "raise data.max_length")
    ev, eval_stats = tokenize_pairs(held, tokenizer, d)
    return PreparedPairs(train, ev, train_stats, eval_stats)


def pair_batch(pairs: list[PairExample], pad_id: int) -> dict:
    """P pairs -> one padded batch of 2P rows (chosen rows first), plus cached reference log-probs (P,)."""
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["pairs"] = len(pairs)
    if all(p.ref is not None for p in pairs):
        batch["ref_chosen"] = torch.tensor([p.ref[0] for p in pairs], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([p.ref[1] for p in pairs], dtype=torch.float32)
    return batch


class PairPlan(BatchPlan):
    """The SFT batch plan over pairs (one pair per 'row'), collated into chosen + rejected rows."""

    def collate(self, batch: list[list[int]], pad_id: int) -> dict:
        return pair_batch([self.examples[row[0]] for row in batch], pad_id)


# ---------------------------------------------------------------------------------------------- log-probs


def pair_logps(model, batch: dict):
    """(chosen logps (P,), rejected logps (P,), chosen counts (P,), rejected counts (P,)) under `model`."""
    hidden, head = forward_hidden(model, batch)  # (2P, L, H)
    logps, counts = sequence_logps(hidden, batch["targets"], head)  # (2P,), (2P,)
    P = batch["pairs"]
    return logps[:P], logps[P:], counts[:P], counts[P:]


@torch.no_grad()
def live_reference(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs with the new adapter switched off: the starting model, merged below it."""
    inner = getattr(model, "module", model)
    was = inner.training
    inner.eval()  # the reference is a fixed function: no dropout
    try:
        # new-token rows at their init too (PEFT's disable_adapter leaves them on for prefix/prompt tuning)
        with inner.disable_adapter(), tokens.rows_at_init(inner):
            c, r, _, _ = pair_logps(inner, batch)
    finally:
        inner.train(was)
    return c, r


@torch.no_grad()
def compute_reference(model, pairs: list[PairExample], pad_id: int, batch_size: int, device, precision: str,
                      progress: bool = False) -> torch.Tensor:
    """Reference log-probs of every pair, (N, 2): batched, in eval mode, shortest pairs together."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].chosen.input_ids) + len(pairs[i].rejected.input_ids))
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    was = model.training
    model.eval()
    steps = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="reference log-probs", unit="batch")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        for s in steps:
            idx = order[s:s + batch_size]
            batch = to_device(pair_batch([pairs[i] for i in idx], pad_id), device)
            with autocast:
                c, r, _, _ = pair_logps(model, batch)
            out[idx, 0], out[idx, 1] = c.float().cpu(), r.float().cpu()
    finally:
        model.train(was)
    return out


def reference_key(start_id: str, cfg, tokenizer, pairs: list[PairExample]) -> str:
    """Starting model x tokenized pairs x numerics: any change in what the reference computes is a new key."""
    h = hashlib.sha256()
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(json.dumps([e.input_ids, e.labels]).encode())
    key = {"version": REF_VERSION, "start": start_id, "tokens": h.hexdigest(), "dtype": cfg.model.dtype,
           "precision": cfg.train.precision, "attn": cfg.model.attn_implementation,
           "tokenizer": [len(tokenizer), tokenizer.pad_token_id]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def attach_reference(trainer, model) -> None:
    """Fill each pair's `ref` from the cache, computing and caching what is missing (cached mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ..models import cache_root

    cfg, data = trainer.cfg, trainer.data
    pairs = data.train + data.eval
    key = reference_key(trainer.start_id, cfg, trainer.tokenizer, pairs)
    path = cache_root() / "dpo_reference" / f"{key}.safetensors"
    table = None
    if path.is_file():
        try:
            table = load_file(str(path))["logps"]
        except (OSError, SafetensorError, KeyError):
            table = None  # a torn or foreign file: recompute and replace it
        if table is not None and tuple(table.shape) != (len(pairs), 2):
            table = None
    status = "reused" if table is not None else "computed"
    if table is None:
        model.to(trainer.dist.device)
        table = compute_reference(model, pairs, trainer.tokenizer.pad_token_id, cfg.scoring.batch_size,
                                  trainer.dist.device, cfg.train.precision, progress=trainer.dist.main)
        if trainer.dist.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"logps": table.contiguous()}, str(tmp), metadata={"start": trainer.start_id})
            fault("dpo_reference", half_written=tmp)
            tmp.replace(path)
    for p, row in zip(pairs, table.tolist()):
        p.ref = (row[0], row[1])
    data.reference = {"mode": "cached", "file": str(path), "status": status, "start": trainer.start_id}


# ---------------------------------------------------------------------------------------------- step, eval


def _reference(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "ref_chosen" in batch:
        return batch["ref_chosen"], batch["ref_rejected"]
    if trainer.cfg.objective.reference != "disable_adapter":
        raise SftlabError("dpo: pairs without reference log-probs in cached mode (please report this)")
    return live_reference(trainer.model, batch)


METRIC_SUMS = ("loss_sum", "correct", "margin_sum", "rewards_chosen_sum", "rewards_rejected_sum",
               "logps_chosen_sum", "logps_rejected_sum")


def summarise(sums: dict, pairs: float, prefix: str = "") -> dict:
    """Per-pair means of the summed diagnostics, under TRL's metric names."""
    n = max(pairs, 1.0)
    return {f"{prefix}rewards/accuracy": sums["correct"] / n, f"{prefix}rewards/margin": sums["margin_sum"] / n,
            f"{prefix}rewards/chosen": sums["rewards_chosen_sum"] / n,
            f"{prefix}rewards/rejected": sums["rewards_rejected_sum"] / n,
            f"{prefix}logps/chosen": sums["logps_chosen_sum"] / n,
            f"{prefix}logps/rejected": sums["logps_rejected_sum"] / n}


class DpoTerm:
    """The DPO loss (and variants) of a micro-batch of pairs, a mean over the step's pairs, so accumulation
    equals one large batch and each pair weighs the same whatever its length (train/step.accumulate)."""

    sums = METRIC_SUMS

    def __init__(self, objective):
        self.o = objective

    def counts(self, micro):
        return [sum(b["pairs"] for b in micro), sum(b["n_tokens"] for b in micro),
                sum(int((b["targets"] != -100).sum()) for b in micro)]

    def loss(self, trainer, batch, normaliser, autocast):
        o = self.o
        with autocast:
            ref_c, ref_r = _reference(trainer, batch)
            c, r, nc, nr = pair_logps(trainer.model, batch)
        return dpo_loss(c, r, ref_c.float(), ref_r.float(), nc, nr, o.beta, o.loss, o.label_smoothing, normaliser)

    def info(self, sums, counts):
        n = float(counts[0])
        return {"tokens": int(counts[1]), "trained_tokens": int(counts[2]), "pairs": int(n), **summarise(sums, n)}


def eval_batches(trainer) -> list[dict]:
    ex = sorted(trainer.data.eval, key=lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids))
    bs, pad = trainer.cfg.train.batch_size, trainer.tokenizer.pad_token_id
    return [pair_batch(ex[i:i + bs], pad) for i in range(0, len(ex), bs)]


@torch.no_grad()
def evaluate(trainer) -> dict:
    """Held-out pairs: mean loss, reward accuracy and margin, log-probs (eval_ prefixed)."""
    model, o, dev = trainer.model, trainer.cfg.objective, trainer.dist.device
    was = model.training
    model.eval()
    sums, n = dict.fromkeys(METRIC_SUMS, 0.0), 0
    try:
        for batch in trainer.eval_batches:
            batch = to_device(batch, dev)
            ref_c, ref_r = _reference(trainer, batch)
            c, r, nc, nr = pair_logps(model, batch)
            _, m = dpo_loss(c, r, ref_c.float(), ref_r.float(), nc, nr, o.beta, o.loss, o.label_smoothing, 1.0)
            for k in METRIC_SUMS:
                sums[k] += m[k]
            n += m["pairs"]
    finally:
        model.train(was)
    return {"eval_loss": sums["loss_sum"] / max(n, 1), "eval_pairs": n, "eval_correct": int(sums["correct"]),
            **summarise(sums, n, "eval_")}
