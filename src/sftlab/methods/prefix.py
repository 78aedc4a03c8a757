"""Prefix tuning (Li & Liang 2021): learned key/value prefixes at every layer."""

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = doc("length of the learned prefix", default=16)
    projection: bool = doc("reparametrise the prefix through an MLP (more stable, more parameters)", default=False)
    encoder_hidden_size: int = doc("hidden size of that MLP", default=256)

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", "must be >= 1")


def apply(model, o: PrefixOptions, token_indices: dict[str, list[int]] | None = None):
    from peft import PrefixTuningConfig

    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
                             prefix_projection=o.projection, encoder_hidden_size=o.encoder_hidden_size)
    return peft_wrap(model, cfg, token_indices)


register_method(Method("prefix", PrefixOptions, apply, "prefix tuning (learned per-layer key/value prefixes)",
                       packing=False, merge=None, starts_at_base=False, token_rows=True))
