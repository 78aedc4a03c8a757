"""Full fine-tuning: every weight trains; checkpoints are plain HF safetensors folders."""

from dataclasses import dataclass, field

from ..configtools import doc
from .base import Method, register_method


@dataclass
class FullOptions:
    freeze: list[str] = doc("name substrings of parameters to keep frozen (e.g. ['embed_tokens'])",
                            default_factory=list)


def apply(model, opts: FullOptions):
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in opts.freeze))
    return model


register_method(Method("full", FullOptions, apply, "full fine-tuning of all weights", peft=False))
