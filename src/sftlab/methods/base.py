"""What a fine-tuning method is, and the registry that holds them.

A method is one module that defines an options dataclass (torch-free, so configs validate
fast) and an `apply(model, options)` that returns the model ready to train. Registering it
is one `register_method(...)` call; the contract tests iterate over the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import METHODS as _METHODS
from ..registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # dataclass of this method's knobs (the `method:` section of a config)
    apply: Callable[[Any, Any], Any]  # (model, options) -> model with only its trainable params requiring grad
    description: str
    peft: bool = True  # saved as a PEFT adapter (False: full HF weights)
    packing: bool = True  # False for methods that prepend virtual tokens to every row
    # How an update merges into W (used by rewinding along the path): "additive" (W0 + dW),
    # "rotation" (OFT/BOFT: scale the skew generator), or None (prefix/prompt: nothing to merge).
    merge: str | None = "additive"
    # True when the freshly applied method computes exactly the base model's function (LoRA's B = 0, OFT's
    # R = I, IA3's ones, full): step-0 scores are then the base's and may be shared between runs.
    starts_at_base: bool = True
    # A context manager factory wrapped around loading a saved adapter (e.g. to skip a kernel build).
    load_context: Callable[[], Any] | None = None
    # True when apply(model, options, token_indices={module: [ids]}) trains exactly those embedding rows and
    # saves only them (PEFT's trainable tokens): what model.new_tokens needs from an adapter method. Every
    # built-in PEFT method does (peft_wrap); a method registered elsewhere says so here.
    token_rows: bool = False


# Made in registry.py (so config.py can read it without importing this package); filled here.
METHODS: Registry[Method] = _METHODS


def register_method(method: Method) -> Method:
    return METHODS.register(method.name, method)


def peft_wrap(model, peft_config, token_indices: dict[str, list[int]] | None = None):
    """Wrap `model` with a PEFT config; the one place PEFT's get_peft_model is called. `token_indices`
    ({module: [ids]}, new tokens): those embedding rows train too, through PEFT's trainable tokens, whether or not
    the config has a field for them (tokens.attach_trainable_rows)."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config)
    if token_indices:
        from ..tokens import attach_trainable_rows

        attach_trainable_rows(model, token_indices)
    return model


def targets(value: list[str]) -> Any:
    """Config list -> PEFT target_modules: ['all-linear'] means every linear layer but the output head."""
    if value == ["all-linear"]:
        return "all-linear"
    return list(value)
