"""Full fine-tuning: every weight trains; checkpoints are plain HF safetensors folders."""

from dataclasses import dataclass, field

from ..configtools import doc
from .base import Method, register_method
from .budget_rules import BudgetRule, Family, ModelShape


@dataclass
class FullOptions:
    freeze: list[str] = doc("name substrings of parameters to keep frozen (e.g. ['embed_tokens'])",
                            default_factory=list)


def apply(model, opts: FullOptions):
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in opts.freeze))
    return model


def count(shape: ModelShape, o) -> int:
    return sum(n for name, n in shape.base_params() if not any(s in name for s in o.freeze))


def candidates(shape, o, pinned, search):
    yield Family(1, {})


def describe(shape, o) -> str:
    frozen = f", frozen: {', '.join(o.freeze)}" if o.freeze else ""
    return f"every weight (the reference; its count is fixed){frozen}"


register_method(Method("full", FullOptions, apply, "full fine-tuning of all weights", peft=False,
                       budget=BudgetRule(count, candidates, describe, fixed=True), default_lr=1e-4))
