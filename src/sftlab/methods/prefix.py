"""Prefix tuning (Li & Liang 2021): learned key/value prefixes at every layer.

A fair start (init: text, the default): the prefix begins as the keys and values the base model itself
computes for real tokens (Li & Liang report that initialising with real words' activations trains better
than random), not PEFT's random vectors. The tokens are `init_text`'s last `num_virtual_tokens` (repeated
when it is shorter; prompt.text_token_ids). Their keys carry the rotary positions 0..n-1 and the row's own
tokens then sit at n, n+1, ... (PEFT extends the attention mask and the cache), so the fresh prefix makes
the model compute exactly what the base computes for `init_text` followed by the row. On the demo it
starts at KL 0.22 to the base instead of 3.84 nats/token (docs/methods.md).
"""

from dataclasses import dataclass
from typing import Literal

from ..configtools import ConfigError, check, doc
from .base import Method, peft_wrap, register_method
from .budget_rules import BudgetRule, Family, ModelShape, knob, virtual_tokens
from .prompt import NEUTRAL_TEXT, on_meta, text_token_ids


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = doc("length of the learned prefix", default=16)
    projection: bool = doc("reparametrise the prefix through an MLP (more stable, more parameters)", default=False)
    encoder_hidden_size: int = doc("hidden size of that MLP", default=256)
    init: Literal["text", "random"] = doc("start from the base's own keys and values for init_text, or from "
                                          "PEFT's random vectors (projection: always random)", default="text")
    init_text: str = doc("text whose keys and values start the prefix (init: text; repeated or cut from "
                         "the front to num_virtual_tokens tokens)", default=NEUTRAL_TEXT)

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", "must be >= 1")
        check(self.init != "text" or bool(self.init_text), "method.init_text", "set it when init is 'text'")


def apply(model, o: PrefixOptions, token_indices: dict[str, list[int]] | None = None):
    from peft import PrefixTuningConfig

    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
                             prefix_projection=o.projection, encoder_hidden_size=o.encoder_hidden_size)
    model = peft_wrap(model, cfg, token_indices)
    if o.init == "text" and not o.projection and not on_meta(model):
        init_from_text(model, text_token_ids(model, o.init_text, o.num_virtual_tokens))
    return model


def base_key_values(base, ids: list[int]):
    """The base's keys and values for `ids` at positions 0..n-1: (layers, 2, kv_heads, n, head_dim)."""
    import inspect

    import torch
    from transformers import DynamicCache

    emb = base.get_input_embeddings().weight
    # A plain cache keeps every position's keys; the model's own (Gemma-3's) drops those beyond a sliding window.
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # renamed in 5.2x
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids], device=emb.device), use_cache=True, **{name: DynamicCache()})
    cache = out.cache if "cache" in out else out.past_key_values  # transformers >= 5.2x renamed it
    layers = getattr(cache, "layers", None)
    pairs = ([(lay.keys, lay.values) for lay in layers] if layers is not None
             else [(cache[i][0], cache[i][1]) for i in range(len(cache))])  # older transformers: tuples
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])  # (L, 2, H_kv, n, D)


def init_from_text(model, ids: list[int]) -> None:
    """Set the PEFT prefix to the base's own keys and values for `ids` (len(ids) == num_virtual_tokens).

    PEFT's get_prompt views the embedding (n, L*2*H_kv*D) as (n, L*2, H_kv, D) and hands layer l the slices
    2l (keys) and 2l + 1 (values), so the layout is (n, L, 2, H_kv, D) flattened."""
    import torch

    encoder = model.prompt_encoder[model.active_adapter]
    weight = encoder.embedding.weight  # (n, L*2*H_kv*D)
    base = model.get_base_model()  # prompt learning leaves the base's modules untouched
    was_training = base.training
    base.eval()  # no dropout in the keys and values
    try:
        kv = base_key_values(base, ids)  # (L, 2, H_kv, n, D)
    finally:
        base.train(was_training)
    flat = kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)  # (n, L*2*H_kv*D)
    if flat.shape != weight.shape:
        raise ConfigError(f"method.init: the base's keys and values for init_text have shape {tuple(flat.shape)}, "
                          f"the prefix {tuple(weight.shape)}; set method.init: random")
    with torch.no_grad():
        weight.copy_(flat.to(weight.dtype))


def width(shape: ModelShape) -> int:
    # PEFT sizes each layer's key (and value) prefix to the KV heads (grouped-query attention, peft#1901).
    return shape.kv_heads * shape.head_dim


def count(shape: ModelShape, o) -> int:
    d, out = width(shape), 2 * shape.layers * width(shape)  # keys and values at every layer
    if not o.projection:
        return o.num_virtual_tokens * out
    h = o.encoder_hidden_size  # embedding (tokens x d) -> Linear(d, h) -> tanh -> Linear(h, out)
    return o.num_virtual_tokens * d + (d * h + h) + (h * out + out)


def candidates(shape, o, pinned, search):
    if not o.projection:
        yield Family(1, {}, "num_virtual_tokens", virtual_tokens(o, pinned, search))
        return
    widths = knob(pinned, "encoder_hidden_size", o.encoder_hidden_size,
                  sorted({2 ** k for k in range(3, 13)} | set(range(64, 2049, 64))))
    for h in widths:
        yield Family(1, {"encoder_hidden_size": h}, "num_virtual_tokens", virtual_tokens(o, pinned, search))


def describe(shape, o) -> str:
    how = f", through an MLP of width {o.encoder_hidden_size}" if o.projection else ""
    return f"{o.num_virtual_tokens} virtual tokens of keys and values at all {shape.layers} layers{how}"


register_method(Method("prefix", PrefixOptions, apply, "prefix tuning (learned per-layer key/value prefixes)",
                       packing=False, merge=None, starts_at_base=False, token_rows=True,
                       budget=BudgetRule(count, candidates, describe), default_lr=1e-2))
