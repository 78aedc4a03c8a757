"""What a fine-tuning method is, and the registries that hold methods and their presets.

A method is one module that defines an options dataclass (torch-free, so configs validate fast), an
`apply(model, options)` that returns the model ready to train, and registers both with everything else the
rest of sftlab needs to know about it in one `register_method(Method(...))` call: how the budget solver counts
and sizes it (`budget`, a budget_rules.BudgetRule), the learning rate the arena and the demo start from
(`default_lr`), how its update merges into the weights and moves along the path to the base (`merge`, a
merge.py object), and the flags below. Nothing else names a method: the contract tests, the arena, the budget
table, rewinding and the analysis iterate over the registry or ask the registration.

A preset is a registered method with options it implies (`register_preset("dora", "lora", {"use_dora": True})`):
the arena and the budget solver accept its name and train the method it is based on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..registry import METHODS as _METHODS
from ..registry import Registry, RegistryError
from .merge import ADDITIVE, Merge
# a VLM's parts (language model, projector, vision tower); re-exported: methods and the budget walk read them here
from .vlm_parts import language_scope, scope_exclude  # noqa: F401


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # dataclass of this method's knobs (the `method:` section of a config)
    apply: Callable[[Any, Any], Any]  # (model, options) -> model with only its trainable params requiring grad
    description: str
    peft: bool = True  # saved as a PEFT adapter (False: full HF weights)
    packing: bool = True  # False for methods that prepend virtual tokens to every row
    # How an update merges into W and moves along the path to the base (rewinding, studies, the weight
    # analysis): merge.ADDITIVE (W0 + a·dW), merge.ROTATION (OFT/BOFT: scale the skew generators), a method's own
    # merge.Merge, or None (prefix/prompt: virtual tokens, nothing to merge).
    merge: Merge | None = ADDITIVE
    # True when the freshly applied method computes exactly the base model's function (LoRA's B = 0, OFT's
    # R = I, IA3's ones, full): step-0 scores are then the base's and may be shared between runs.
    starts_at_base: bool = True
    # A context manager factory wrapped around loading a saved adapter (e.g. to skip a kernel build).
    load_context: Callable[[], Any] | None = None
    # True when apply(model, options, token_indices={module: [ids]}) trains exactly those embedding rows and
    # saves only them (PEFT's trainable tokens): what model.new_tokens needs from an adapter method. Every
    # built-in PEFT method does (peft_wrap); a method registered elsewhere says so here.
    token_rows: bool = False
    # How the budget solver counts this method's trainable parameters and which knobs it may move
    # (budget_rules.BudgetRule); None: `sftlab budget` and the arena cannot size it.
    budget: Any = None
    # The learning rate the arena's default sweep multiplies (arena.lr_factors) and the demo trains at: the rate
    # the demo's recorded sweep chose where it swept the method (DEVELOPERS.md), a starting point elsewhere.
    default_lr: float = 1e-3


@dataclass(frozen=True)
class Preset:
    """A registered method with options it implies: its name trains `base` with `options` merged under the
    options a config or the arena gives."""

    name: str
    base: str
    options: dict = field(default_factory=dict)
    description: str = ""
    default_lr: float | None = None  # None: the base method's

    def __hash__(self) -> int:
        return hash((self.name, self.base))

    @property
    def method(self) -> Method:
        return METHODS.get(self.base)

    @property
    def lr(self) -> float:
        return self.default_lr if self.default_lr is not None else self.method.default_lr


# Made in registry.py (so config.py can read it without importing this package); filled here.
METHODS: Registry[Method] = _METHODS


PRESETS: Registry[Preset] = Registry("method preset")


def register_method(method: Method) -> Method:
    if method.name in PRESETS:
        raise RegistryError(f"method {method.name!r} is already a preset; pick another name")
    return METHODS.register(method.name, method)


def register_preset(name: str, base: str, options: dict | None = None, description: str = "",
                    default_lr: float | None = None) -> Preset:
    """Register `name` as `base` with `options` (e.g. dora = lora with use_dora); `base` must be registered."""
    if name in METHODS:
        raise RegistryError(f"preset {name!r} is already a method; pick another name")
    spec = METHODS.get(base)
    spec.options(**(options or {}))  # the implied options are valid for the method (a TypeError/ConfigError here)
    return PRESETS.register(name, Preset(name, base, dict(options or {}), description or spec.description,
                                         default_lr))


def resolve(name: str) -> tuple[Method, dict]:
    """(registered method, the options a name implies): a method's own name implies none, a preset its own."""
    if name in PRESETS:
        preset = PRESETS.get(name)
        return preset.method, dict(preset.options)
    return METHODS.get(name), {}


def default_lr(name: str) -> float:
    """The registered default learning rate of a method or preset."""
    return PRESETS.get(name).lr if name in PRESETS else METHODS.get(name).default_lr


def unregister(name: str) -> None:
    """Remove a method (and the presets based on it) or a preset: for tests that register their own."""
    if name in PRESETS:
        PRESETS.unregister(name)
        return
    for preset in [p for p in PRESETS.names() if PRESETS.get(p).base == name]:
        PRESETS.unregister(preset)
    METHODS.unregister(name)


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
