"""Prompt tuning (Lester et al. 2021): learned input embeddings prepended to every row."""

from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method


@dataclass
class PromptOptions:
    num_virtual_tokens: int = doc("number of learned soft-prompt tokens", default=16)
    init: Literal["random", "text"] = doc("initialise randomly or from the embeddings of init_text", default="random")
    init_text: str = doc("text whose token embeddings initialise the prompt (init: text)", default="")
    tokenizer_name_or_path: str = doc("tokenizer for init_text (filled in from the model when empty)", default="")

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", "must be >= 1")
        check(self.init != "text" or bool(self.init_text), "method.init_text", "set it when init is 'text'")


def apply(model, o: PromptOptions, token_indices: dict[str, list[int]] | None = None):
    from peft import PromptTuningConfig

    kw = {}
    if o.init == "text":
        path = o.tokenizer_name_or_path or getattr(model.config, "_name_or_path", "")
        kw = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=o.init_text, tokenizer_name_or_path=path)
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens, **kw)
    return peft_wrap(model, cfg, token_indices)


register_method(Method("prompt", PromptOptions, apply, "prompt tuning (learned soft-prompt embeddings)",
                       packing=False, merge=None, starts_at_base=False, token_rows=True))
