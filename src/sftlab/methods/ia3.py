"""IA3 (Liu et al. 2022): learned rescaling vectors on keys, values and the MLP input."""

from dataclasses import dataclass

from ..configtools import doc
from .base import Method, peft_wrap, register_method, targets


@dataclass
class IA3Options:
    target_modules: list[str] | None = doc("modules to rescale (null: PEFT's default for the architecture)",
                                           default=None)
    feedforward_modules: list[str] | None = doc("which of target_modules are feed-forward (scaled on input)",
                                                default=None)


def apply(model, o: IA3Options):
    from peft import IA3Config

    cfg = IA3Config(task_type="CAUSAL_LM",
                    target_modules=targets(o.target_modules) if o.target_modules else None,
                    feedforward_modules=list(o.feedforward_modules) if o.feedforward_modules else None)
    return peft_wrap(model, cfg)


register_method(Method("ia3", IA3Options, apply, "IA3 rescaling vectors"))
