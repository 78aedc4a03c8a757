"""LoRA (Hu et al. 2021), with the DoRA (Liu et al. 2024) and rsLoRA (Kalajdzievski 2023) options."""

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method, targets


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
                     trainable_token_indices=token_indices, task_type="CAUSAL_LM")
    return peft_wrap(model, cfg)


register_method(Method("lora", LoraOptions, apply, "low-rank adapters (LoRA; DoRA and rsLoRA options)",
                       token_rows=True))
