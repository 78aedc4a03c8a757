"""sftlab.data.collate: packing without cross-example attention, shifted targets, deterministic batch plans.

The key proof: a packed row, run through the model the way training runs it (`forward_hidden`: position ids
restarting per example, `attention_mask=None`, `use_cache=False`), gives every example exactly the hidden
states and logits it gets alone. Negative controls show the comparison can fail: with a cache, or with an
all-ones attention mask, transformers does not build the per-example mask and later examples see earlier ones.
"""

from __future__ import annotations

import random

import pytest
import torch

from sftlab.data.collate import BatchPlan, pack_rows, pad_batch, plan_packed_rows, shifted_targets
from sftlab.data.tokenize import IGNORE, Example
from sftlab.objectives import forward_hidden

VOCAB = 128
PAD = 0
LENGTHS = [7, 13, 4, 10]
MAX_LENGTH = 24  # first-fit-decreasing: rows [13, 10] and [7, 4] (+ a pad tail of 12)


def make_examples(lengths, seed=1, vocab=VOCAB) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        # a prompt/answer split: the first third is prompt
        k = n // 3
        out.append(Example(ids, [IGNORE] * k + ids[k:], f"ex:{i}"))
    return out


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=request.param, dtype=torch.float32).eval()
    assert m.config._attn_implementation == request.param
    return m


def packed_batch():
    examples = make_examples(LENGTHS)
    plan = BatchPlan(examples, batch_size=2, packing=True, max_length=MAX_LENGTH, seed=0)
    (rows,) = plan.epoch(0)  # 4 examples -> 2 rows -> one batch of 2
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]
    assert any(len(row) > 1 for row in rows), "the test needs rows holding several examples"
    return examples, rows, plan.collate(rows, PAD)


def segments(rows, examples):
    """(row, offset, example index) for every example of every packed row."""
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            yield r, t, i
            t += len(examples[i].input_ids)


@torch.no_grad()
def test_packed_row_equals_each_example_alone(model):
    examples, rows, batch = packed_batch()
    assert batch["attention_mask"] is None
    hidden, head = forward_hidden(model, batch)  # (2, L, H), exactly as the training step calls it
    logits = head(hidden)
    checked = 0
    for r, t, i in segments(rows, examples):
        e = examples[i]
        n = len(e.input_ids)
        alone_hidden, _ = forward_hidden(model, pad_batch([e], PAD))  # (1, n, H)
        torch.testing.assert_close(hidden[r, t:t + n], alone_hidden[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[r, t:t + n], head(alone_hidden[0]), atol=1e-5, rtol=0)
        # and against a plain HF forward of the example alone (no sftlab code involved)
        ref = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[r, t:t + n], ref, atol=1e-5, rtol=0)
        checked += 1
    assert checked == len(LENGTHS)


@torch.no_grad()
@pytest.mark.parametrize("leak", ["use_cache", "ones_mask"])
def test_negative_control_cross_example_attention_is_detected(model, leak):
    """Without the per-example mask the second example of a row sees the first: the comparison above must fail."""
    examples, rows, batch = packed_batch()
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if leak == "use_cache":
        kwargs["use_cache"] = True  # a cache switches off transformers' packed-sequence detection
    else:
        kwargs.update(use_cache=False, attention_mask=torch.ones_like(batch["input_ids"]))
    logits = model(**kwargs).logits
    first_diff, later_diff = [], []
    for r, t, i in segments(rows, examples):
        e = examples[i]
        n = len(e.input_ids)
        ref = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
        diff = float((logits[r, t:t + n] - ref).abs().max())
        (first_diff if t == 0 else later_diff).append(diff)
    assert max(first_diff) < 1e-5  # the first example of a row has nothing before it to leak from
    assert min(later_diff) > 1e-3  # every later example is contaminated


def test_plan_packed_rows_fits_and_uses_every_example_once():
    rng = random.Random(0)
    for trial in range(50):
        max_length = rng.randint(8, 64)
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 40))]
        order = list(range(len(lengths)))
        rng.shuffle(order)
        rows = plan_packed_rows(lengths, max_length, order)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
        assert all(row for row in rows)


def test_packed_targets_stay_inside_each_example():
    examples, rows, batch = packed_batch()
    tgt, pos, ids = batch["targets"], batch["position_ids"], batch["input_ids"]
    covered = torch.zeros_like(tgt, dtype=torch.bool)
    for r, t, i in segments(rows, examples):
        e = examples[i]
        n = len(e.input_ids)
        assert ids[r, t:t + n].tolist() == e.input_ids
        assert pos[r, t:t + n].tolist() == list(range(n))  # positions restart per example
        assert tgt[r, t:t + n].tolist() == e.labels[1:] + [IGNORE]
        assert tgt[r, t + n - 1] == IGNORE  # the last token never predicts the next example's first
        covered[r, t:t + n] = True
    assert (tgt[~covered] == IGNORE).all()  # the pad tail carries no targets
    assert batch["n_tokens"] == sum(LENGTHS)


def test_pack_rows_matches_shifted_targets_by_hand():
    a = Example([5, 6, 7], [IGNORE, 6, 7], "a")
    b = Example([8, 9], [IGNORE, 9], "b")
    batch = pack_rows([[a, b], [b]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, PAD, PAD, PAD]]
    assert batch["targets"].tolist() == [[6, 7, IGNORE, 9, IGNORE], [9, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert shifted_targets([1, 2, 3]) == [2, 3, IGNORE]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_plan_deterministic_and_sharded(packing):
    examples = make_examples([random.Random(i).randint(2, 20) for i in range(40)], seed=3)

    def plan(seed=0, rank=0, world=1):
        return BatchPlan(examples, batch_size=2, packing=packing, max_length=32, seed=seed, rank=rank, world=world)

    assert plan().epoch(0) == plan().epoch(0)
    assert plan().epoch(1) == plan().epoch(1)
    assert plan().epoch(0) != plan().epoch(1)
    assert plan(seed=0).epoch(0) != plan(seed=1).epoch(0)
    p = plan()
    e1 = p.epoch(1)
    assert p.epoch(0) == plan().epoch(0) and p.epoch(1) == e1  # independent of which epochs were asked before

    r0, r1 = plan(rank=0, world=2).epoch(0), plan(rank=1, world=2).epoch(0)
    assert len(r0) == len(r1) > 0  # same number of micro-batches on every rank
    seen0 = [i for batch in r0 for row in batch for i in row]
    seen1 = [i for batch in r1 for row in batch for i in row]
    assert not set(seen0) & set(seen1)
    assert len(set(seen0)) == len(seen0) and len(set(seen1)) == len(seen1)
    if packing:
        for batch in r0 + r1:
            assert all(sum(len(examples[i].input_ids) for i in row) <= 32 for row in batch)


def test_batch_plan_too_few_rows_is_a_data_error():
    from sftlab.errors import DataError

    with pytest.raises(DataError, match=r"data\.train: only 3 examples for train\.batch_size=2 x 2 processes"):
        BatchPlan(make_examples([4, 5, 6]), batch_size=2, packing=False, max_length=32, seed=0, world=2).epoch(0)
