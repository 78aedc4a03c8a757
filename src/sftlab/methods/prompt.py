"""Prompt tuning (Lester et al. 2021): learned input embeddings prepended to every row.

A fair start (init: text, the default): the soft prompt begins as the embeddings of real text, a neutral
instruction (Lester et al. find vocabulary-based inits train better than random vectors). The text's
tokens are repeated to fill num_virtual_tokens and cut from the front, so its ending (a blank line) is
what the row follows. On the demo (87 tokens) this starts at KL 0.33 to the base instead of 0.84; no init
measured reached 0.25 at that length (docs/methods.md: every virtual token of context costs some KL).
"""

from dataclasses import dataclass
from typing import Literal

from ..configtools import ConfigError, check, doc
from .base import Method, peft_wrap, register_method
from .budget_rules import BudgetRule, Family, ModelShape, virtual_tokens

# The opening of the Alpaca instruction template: plain, task-free, and followed by a blank line.
NEUTRAL_TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n")


@dataclass
class PromptOptions:
    num_virtual_tokens: int = doc("number of learned soft-prompt tokens", default=16)
    init: Literal["text", "random"] = doc("start from the embeddings of init_text, or randomly", default="text")
    init_text: str = doc("text whose token embeddings start the prompt (init: text; repeated or cut from the "
                         "front to num_virtual_tokens tokens)", default=NEUTRAL_TEXT)
    tokenizer_name_or_path: str = doc("tokenizer for init_text (empty: the model's own)", default="")

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", "must be >= 1")
        check(self.init != "text" or bool(self.init_text), "method.init_text", "set it when init is 'text'")


def apply(model, o: PromptOptions, token_indices: dict[str, list[int]] | None = None):
    import torch
    from peft import PromptTuningConfig

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens)
    model = peft_wrap(model, cfg, token_indices)
    if o.init == "text" and not on_meta(model):
        ids = text_token_ids(model, o.init_text, o.num_virtual_tokens, o.tokenizer_name_or_path)
        weight = model.prompt_encoder[model.active_adapter].embedding.weight  # (n, hidden)
        embed = model.get_base_model().get_input_embeddings().weight  # (V, hidden)
        with torch.no_grad():
            weight.copy_(embed[torch.tensor(ids, device=embed.device)].to(weight.dtype))
    return model


def on_meta(model) -> bool:
    """True for a model built on the meta device (budget.measure_trainable): nothing to initialise."""
    return any(p.is_meta for p in model.parameters())


def text_token_ids(model, text: str, n: int, tokenizer: str = "") -> list[int]:
    """n token ids of `text` (the model's tokenizer unless `tokenizer`), repeated as needed and cut from the
    front, so that the text's ending comes last, next to the row."""
    from transformers import AutoTokenizer

    path = tokenizer or getattr(model.get_base_model().config, "_name_or_path", "")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.init: cannot load the tokenizer of {path or 'the model'} to tokenize init_text "
                          f"({str(e).splitlines()[0]}); set method.init: random") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"method.init_text: {text!r} has no tokens")
    return (ids * (n // len(ids) + 1))[-n:]


def count(shape: ModelShape, o) -> int:
    return o.num_virtual_tokens * shape.hidden


def candidates(shape, o, pinned, search):
    yield Family(1, {}, "num_virtual_tokens", virtual_tokens(o, pinned, search))


def describe(shape, o) -> str:
    return f"{o.num_virtual_tokens} virtual input tokens"


register_method(Method("prompt", PromptOptions, apply, "prompt tuning (learned soft-prompt embeddings)",
                       packing=False, merge=None, starts_at_base=False, token_rows=True,
                       budget=BudgetRule(count, candidates, describe), default_lr=3e-2))
