"""LoRA (Hu et al. 2021), with the DoRA (Liu et al. 2024) and rsLoRA (Kalajdzievski 2023) options."""

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method, register_preset, scope_exclude, targets
from .budget_rules import (BudgetRule, Family, ModelShape, knob, layer_choices, layer_count, layers_label,
                           module_choices, module_names, modules_label, tier, with_layers)


@dataclass
class LoraOptions:
    r: int = doc("rank of the update B·A", default=8)
    alpha: float = doc("scale numerator: the update is (alpha/r)·B·A (alpha/sqrt(r) with rslora)", default=16.0)
    dropout: float = doc("dropout on the LoRA input", default=0.0)
    target_modules: list[str] = doc("module names to adapt; ['all-linear'] = every linear layer but the head",
                                    default_factory=lambda: ["all-linear"])
    use_dora: bool = doc("DoRA: learn a magnitude vector and a LoRA direction", default=False)
    use_rslora: bool = doc("rsLoRA: scale by alpha/sqrt(r) instead of alpha/r", default=False)
    layers: list[int] | None = doc("only these layer indices (null: all layers)", default=None)

    def __post_init__(self):
        check(self.r >= 1, "method.r", f"must be >= 1, got {self.r}")
        check(0.0 <= self.dropout < 1.0, "method.dropout", f"must be in [0, 1), got {self.dropout}")


def apply(model, o: LoraOptions, token_indices: dict[str, list[int]] | None = None):
    """`token_indices`: embedding rows that train too (new tokens), e.g. {'embed_tokens': [49152, 49153]}."""
    from peft import LoraConfig

    cfg = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=targets(o.target_modules),
                     use_dora=o.use_dora, use_rslora=o.use_rslora, layers_to_transform=o.layers,
                     trainable_token_indices=token_indices, exclude_modules=scope_exclude(model),
                     task_type="CAUSAL_LM")
    return peft_wrap(model, cfg)


def count(shape: ModelShape, o) -> int:
    # A (r x in) and B (out x r) per module; DoRA adds a magnitude vector of length out.
    per_layer = 0
    for name in module_names(o.target_modules, shape):
        n_in, n_out = shape.linear(name)
        per_layer += o.r * (n_in + n_out) + (n_out if o.use_dora else 0)
    return per_layer * layer_count(shape, o.layers)


def candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules, shape=shape):
        # A rank above a module's smaller side adds parameters without adding rank.
        r_max = min(min(shape.linear(n)) for n in module_names(mods, shape))
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            fixed = {"target_modules": with_layers(mods, layers, shape), "layers": layers}
            yield Family(tier(m_changed, l_changed), fixed, "r", knob(pinned, "r", o.r, range(1, r_max + 1)))


def describe(shape, o) -> str:
    return f"rank {o.r}{' DoRA' if o.use_dora else ''} on {modules_label(o.target_modules, shape=shape)}, " \
           f"{layers_label(shape, o.layers)}"


# The demo's sweep (DEVELOPERS.md) chose 3e-3 for LoRA at 50k parameters on SmolLM2.
register_method(Method("lora", LoraOptions, apply, "low-rank adapters (LoRA; DoRA and rsLoRA options)",
                       token_rows=True, budget=BudgetRule(count, candidates, describe), default_lr=3e-3))
register_preset("dora", "lora", {"use_dora": True}, "LoRA with DoRA's learned magnitudes (Liu et al. 2024)")
